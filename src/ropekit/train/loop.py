"""The fine-tuning loop: a plain accelerate loop (see README, "Fine-tune", for why not Trainer).

Layout of `out/` (a normal extended model once the run completes):
    config.json, model.safetensors, tokenizer files, ropekit.json   (written at the end)
    checkpoints/step-000050/ …   accelerate state + trainer_state.json
    checkpoints/latest           name of the newest complete checkpoint (atomically replaced)
    logs/train_log.jsonl, logs/loss_curve.csv, logs/data_rank{r}.jsonl

Read top-down, as a torchtune recipe: `finetune` = `_setup` (config, run directory, accelerator,
data, model, resume), `_train` (`_train_step` + `_log_step` per optimizer step, checkpoints, Ctrl-C),
`_finish` (the final model, or a checkpoint to resume from).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ropekit._version import __version__
from ropekit.apply.extend import RECORD, extended_record, load_model, load_tokenizer
from ropekit.apply.patch import apply, model_spec
from ropekit.data.documents import jsonl_records, read_documents, tokenize_documents
from ropekit.errors import Interrupted, RopekitError
from ropekit.output import (
    MARKER,
    SIGNATURE,
    default_modes,
    prepare_output,
    remove_replaced,
    set_normal_permissions,
)
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.registry import plan as make_plan
from ropekit.train.data import mix_passkey, pack_windows, window_indices
from ropekit.train.pose import pose_rng, pose_sample

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


RESUME_KEYS = (
    "model",
    "method",
    "method_params",
    "target_length",
    "train_length",
    "pose",
    "pose_chunks",
    "pose_text_skip",
    "passkey_mix",
    "global_batch",
    "micro_batch",
    "lr",
    "weight_decay",
    "warmup_steps",
    "seed",
    "steps",
    "data",
)


@dataclass
class TrainConfig:
    model: str  # model directory or hub id
    out: Path  # run directory; becomes the extended model
    data: str  # text file, folder, or JSONL with 'text'
    target_length: int  # L' the plan extends to
    method: str = "dprope"
    method_params: dict[str, Any] = field(default_factory=dict)
    train_length: int | None = None  # window length; default L' (full-length), < L' with PoSE
    pose: bool = False
    pose_chunks: int = 2
    pose_text_skip: int = 0  # PoSE text skipping: windows are cut from spans of train_length + this many tokens
    passkey_mix: float = 0.0  # share of training windows that are passkey examples (see ropekit.train.data)
    steps: int = 100  # optimizer steps
    global_batch: int = 8  # windows per optimizer step, over all processes
    micro_batch: int = 1  # windows per forward pass per process
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    stop_after: int | None = None  # stop cleanly after this many steps in this run (resume later)
    resume: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    report_to: str = "auto"  # tensorboard/wandb trackers; auto: tensorboard if installed
    max_tokens: int | None = None  # tokens read per document
    progress: bool = True
    overwrite: bool = False  # start again over an earlier ropekit run in `out` (never anything else)

    def window(self) -> int:
        return self.train_length or self.target_length

    def validate(self, context_length: int) -> None:
        """Refuse settings that cannot run, before any work; `context_length` is the model's (`RopeSpec`)."""
        if self.target_length <= context_length:
            raise RopekitError(
                f"target length {self.target_length} must exceed the model's context length {context_length}"
            )
        if self.pose and (self.train_length is None or self.train_length >= self.target_length):
            raise RopekitError("--pose needs --train-length below --target-length (e.g. the original length)")
        if self.pose_text_skip and not self.pose:
            raise RopekitError("--pose-text-skip needs --pose")
        if self.pose_text_skip < 0:
            raise RopekitError("--pose-text-skip must be ≥ 0 tokens")
        if not (math.isfinite(self.passkey_mix) and 0.0 <= self.passkey_mix < 1.0):
            raise RopekitError(f"--passkey-mix must be a share in [0, 1), got {self.passkey_mix}")
        if self.passkey_mix and self.pose_text_skip:
            raise RopekitError(
                "--passkey-mix and --pose-text-skip do not combine (a text skip could cut the needle out)"
            )
        if not self.pose and self.window() != self.target_length and self.window() > self.target_length:
            raise RopekitError(f"training length {self.window()} exceeds the target length {self.target_length}")
        for name in ("steps", "global_batch", "micro_batch", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise RopekitError(f"--{name.replace('_', '-')} must be ≥ 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RopekitError(f"--lr must be a finite positive number, got {self.lr}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise RopekitError(
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        trackers = [t for t in self.report_to.split(",") if t]
        if (
            not trackers
            or any(t not in REPORT_TO for t in trackers)
            or len(trackers) > 1
            and {"auto", "none"} & set(trackers)
        ):
            raise RopekitError(
                f"--report-to must be auto, none, or a comma-separated list of "
                f"tensorboard, wandb; got {self.report_to!r}"
            )


LATER_RESUME_KEYS = {"pose_text_skip": 0, "passkey_mix": 0.0}  # options added after 0.1: their value when absent
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
REPORT_TO = ("auto", "none", "tensorboard", "wandb")


class _TiedWeightsNote(logging.Filter):
    """accelerate's save_state warns "Removed shared tensor" for tied input/output embeddings: they
    are one tensor, saved once and tied again on load (the resume tests check the weights)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()  # accelerate prefixes "[RANK r] "


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())


@dataclass
class _Run:
    """Everything `_setup` builds for one fine-tuning run; the step, checkpoint and finish functions read it.

    Conventions: steps are counted from 1 in logs, checkpoints and the record (`start_step` is the
    number of steps already done, 0 for a fresh run); `end_step` is where this invocation stops
    (`cfg.steps`, or earlier with `stop_after`); one optimizer step sees `cfg.global_batch`
    windows over all `world` processes, as `accumulation` micro-batches of `cfg.micro_batch` each."""

    cfg: TrainConfig
    accelerator: Any
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokenizer: Any
    plan: Any
    windows: np.ndarray  # (num_windows, window + pose_text_skip) token ids: text windows, then passkey windows
    passkey_windows: int  # how many of `windows` (the last ones) are passkey examples
    world: int
    rank: int
    accumulation: int
    start_step: int
    end_step: int

    @property
    def logs(self) -> Path:
        return self.cfg.out / "logs"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.global_batch * self.cfg.window()


def finetune(cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune `cfg.model` extended by `cfg.method` to `cfg.target_length`; returns the training record.

    The record is also `ropekit.json`'s "training" entry once the run completes (see `_training_record`).
    Ctrl-C once: finish the step, checkpoint, raise `Interrupted`; twice: raise `Interrupted` at once."""
    run = _setup(cfg)
    elapsed = _train(run)
    return _finish(run, elapsed)


# ---- setup ------------------------------------------------------------------------------------------


def _setup(cfg: TrainConfig) -> _Run:
    """Validate, claim the run directory, then build the accelerator, data, model and optimizer (in this
    order: the seed is set after the accelerator and before anything draws random numbers)."""
    from accelerate import PartialState
    from accelerate.utils import set_seed

    spec = RopeSpec.from_pretrained(cfg.model)
    cfg.validate(spec.context_length)
    target = _check_out_dir(cfg)
    # accelerate only builds a gloo process group under torchrun when told cpu=True on a machine without CUDA
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    world, rank = state.num_processes, state.process_index
    if not cfg.resume:
        if state.is_main_process:
            _start_run_dir(target)
        state.wait_for_everyone()
    accumulation = _accumulation(cfg, world)
    accelerator = _setup_accelerator(cfg, cpu=cpu, accumulation=accumulation)
    set_seed(cfg.seed)
    tokenizer, windows, passkey_windows = _setup_data(cfg, accelerator)
    model, optimizer, scheduler, plan = _setup_model(cfg, accelerator)
    start_step = _resume(accelerator, cfg) if cfg.resume else 0
    end_step = cfg.steps if cfg.stop_after is None else min(cfg.steps, start_step + cfg.stop_after)
    run = _Run(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        tokenizer=tokenizer,
        plan=plan,
        windows=windows,
        passkey_windows=passkey_windows,
        world=world,
        rank=rank,
        accumulation=accumulation,
        start_step=start_step,
        end_step=end_step,
    )
    _setup_logs(run)
    return run


def _check_out_dir(cfg: TrainConfig):
    """The output contract (ropekit.output) for a run directory written in place."""
    out = Path(cfg.out)
    if not cfg.resume and not cfg.overwrite and latest_checkpoint(out) is not None:
        raise RopekitError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to start "
            "it again, or choose another --out"
        )
    target = prepare_output(
        out, overwrite=cfg.overwrite, inputs=(cfg.model, cfg.data), in_place=True, existing_ok=cfg.resume
    )
    if cfg.resume and latest_checkpoint(out) is None:
        raise RopekitError(f"{out}: no complete checkpoint to resume from")
    return target


def _start_run_dir(target) -> None:
    """Main process: remove the earlier ropekit run `--overwrite` replaces (only that one), then sign the new one."""
    remove_replaced(target)
    dir_mode, _ = default_modes()
    target.path.mkdir(parents=True, exist_ok=True)
    os.chmod(target.path, dir_mode)
    marker = target.path / MARKER
    marker.write_text(
        json.dumps(
            {
                **SIGNATURE,
                "ropekit_version": __version__,
                "status": "fine-tuning; this becomes the model record when the run completes",
            }
        )
        + "\n"
    )


def _accumulation(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step on each process: global batch = micro batch × processes × this."""
    if cfg.global_batch % (cfg.micro_batch * world):
        raise RopekitError(
            f"global batch {cfg.global_batch} is not a multiple of micro batch × processes "
            f"({cfg.micro_batch} × {world})"
        )
    return cfg.global_batch // (cfg.micro_batch * world)


def _setup_accelerator(cfg: TrainConfig, *, cpu: bool, accumulation: int):
    """The Accelerator; it owns gradient accumulation, so DeepSpeed's engine and FSDP step only at sync points."""
    from accelerate import Accelerator

    return Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=accumulation,
        mixed_precision=_mixed_precision(cfg.mixed_precision),
        log_with=_trackers(cfg.report_to) or None,
        project_dir=str(cfg.out / "logs"),
    )


def _mixed_precision(choice: str) -> str:
    """accelerate's mixed_precision for --mixed-precision: auto is bf16 on a GPU that supports it, else no."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _trackers(choice: str) -> list[str]:
    """accelerate trackers for --report-to: auto is tensorboard when installed, else none."""
    import importlib.util

    if choice == "none":
        return []
    if choice == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    return [t for t in choice.split(",") if t]


def _setup_data(cfg: TrainConfig, accelerator) -> tuple[Any, np.ndarray, int]:
    """The tokenizer, the packed training windows (documents joined by EOS, then the passkey mix, see
    `ropekit.train.data`) and how many of them are passkey examples."""
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise RopekitError(f"{cfg.model}: no tokenizer beside the model")
    with accelerator.main_process_first():  # one process fills the tokenisation cache
        documents = tokenize_documents(read_documents(cfg.data), tokenizer)
    documents = [d[: cfg.max_tokens] for d in documents] if cfg.max_tokens else documents
    windows = pack_windows(documents, cfg.window() + cfg.pose_text_skip, eos_id=tokenizer.eos_token_id)
    mixed = mix_passkey(windows, cfg.passkey_mix, tokenizer, seed=cfg.seed, eos_id=tokenizer.eos_token_id)
    return tokenizer, mixed, len(mixed) - len(windows)


def _setup_model(cfg: TrainConfig, accelerator) -> tuple[Any, torch.optim.Optimizer, Any, Any]:
    """The model (float32 master weights) with the plan applied, AdamW and a linear-warmup schedule, prepared.

    The scheduler is not prepared (a prepared one advances once per process; ours advances once per
    optimizer step) but is registered, so checkpoints carry it."""
    model = load_model(cfg.model, dtype="float32")
    plan = make_plan(model_spec(model), cfg.target_length, cfg.method, **cfg.method_params)
    apply(model, plan)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return model, optimizer, scheduler, plan


def _setup_logs(run: _Run) -> None:
    """Cut the logs back to the resumed step (so they read as one uninterrupted run) and start the trackers."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        run.logs.mkdir(parents=True, exist_ok=True)
        _truncate_log(run.logs / "train_log.jsonl", run.start_step)
    accelerator.wait_for_everyone()
    _truncate_log(run.logs / f"data_rank{run.rank}.jsonl", run.start_step)
    accelerator.init_trackers(
        "ropekit-finetune",
        config={k: str(v) for k, v in asdict(run.cfg).items()},
        init_kwargs={"wandb": {"dir": str(run.logs)}},  # wandb's default is ./wandb in the working directory
    )


def _truncate_log(path: Path, keep_until_step: int) -> None:
    """Drop log lines past the resumed step, so the curve is what one uninterrupted run writes."""
    if not path.is_file():
        return
    kept = [r for _, r in jsonl_records(path) if r["step"] <= keep_until_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


# ---- training ---------------------------------------------------------------------------------------


def _train(run: _Run) -> float:
    """Steps `start_step` … `end_step - 1` (0-based), checkpointing every `save_every` steps and at the
    last step; returns the seconds spent.

    Raises `Interrupted` on Ctrl-C: the first finishes the step and checkpoints it (every rank stops
    at the same step), a second stops at once and keeps the latest complete checkpoint."""
    cfg = run.cfg
    progress = _progress_bar(run)
    started = time.perf_counter()
    completed = run.start_step  # steps whose checkpoint, if due, is written
    try:
        with GracefulStop() as stop:
            for step in range(run.start_step, run.end_step):
                loss, seen = _train_step(run, step)
                _log_step(run, step + 1, loss, seen, started)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}")
                if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                    _save_checkpoint(run.accelerator, cfg, step + 1)
                completed = step + 1
                if _any_rank(run.accelerator, stop.requested) and completed < cfg.steps:
                    _stop_requested(run, completed)
    except KeyboardInterrupt:  # a second Ctrl-C
        _abort(run, completed)
    finally:
        if progress is not None:
            progress.close()
    return time.perf_counter() - started


def _progress_bar(run: _Run):
    """A tqdm bar over all `cfg.steps` (starting at `start_step`) on each node's main process, or None."""
    if not (run.cfg.progress and run.accelerator.is_local_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=run.cfg.steps,
        initial=run.start_step,
        desc=f"fine-tune {run.plan.method} @ {run.cfg.window()}",
        unit="step",
    )


def _train_step(run: _Run, step: int) -> tuple[float, list[int]]:
    """One optimizer step (0-based `step`): `accumulation` forward/backward passes, then clip, step, zero.

    Returns the loss averaged over the step's micro-batches and all ranks, and the window indices this
    rank trained on (see `ropekit.train.data.window_indices`)."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    loss_sum = torch.zeros((), device=accelerator.device)
    seen = []
    for micro in range(run.accumulation):
        idx = window_indices(
            step,
            micro,
            run.rank,
            num_windows=len(run.windows),
            micro_batch=cfg.micro_batch,
            world=run.world,
            accumulation=run.accumulation,
            seed=cfg.seed,
        )
        seen += idx
        ids, positions = _batch(cfg, run.windows, idx, step)
        ids = ids.to(accelerator.device)  # (micro_batch, window)
        positions = None if positions is None else positions.to(accelerator.device)
        with accelerator.accumulate(model):  # syncs and steps only on the last micro-batch
            loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
            accelerator.backward(loss)  # scales by 1/accumulation
            if cfg.max_grad_norm and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            run.optimizer.step()
            if accelerator.sync_gradients:
                run.scheduler.step()
            run.optimizer.zero_grad()
        loss_sum += loss.detach() / run.accumulation
    return float(accelerator.reduce(loss_sum, "mean")), seen


def _batch(cfg: TrainConfig, windows, idx: list[int], step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (micro_batch, window) and, with PoSE, their position ids (and text-skipped token choice)."""
    if not cfg.pose:
        return torch.from_numpy(windows[idx]), None
    samples = [
        pose_sample(
            cfg.window(),
            cfg.target_length,
            pose_rng(cfg.seed, i, step),
            chunks=cfg.pose_chunks,
            text_skip=cfg.pose_text_skip,
        )
        for i in idx
    ]
    ids = np.stack([windows[i][s.token_index] for i, s in zip(idx, samples)])
    return torch.from_numpy(ids), torch.stack([s.position_ids for s in samples])


def _log_step(run: _Run, step: int, loss: float, seen: list[int], started: float) -> None:
    """After step `step` (1-based): this rank's windows to data_rank{r}.jsonl, the loss, learning rate,
    tokens so far and seconds since this invocation started to train_log.jsonl (main process), trackers."""
    lr = run.scheduler.get_last_lr()[0]
    record = {
        "step": step,
        "loss": loss,
        "lr": lr,
        "tokens": step * run.tokens_per_step,
        "seconds": time.perf_counter() - started,
    }
    _append(run.logs / f"data_rank{run.rank}.jsonl", {"step": step, "windows": seen})
    if run.accelerator.is_main_process:
        _append(run.logs / "train_log.jsonl", record)
    run.accelerator.log({"loss": loss, "lr": lr}, step=step)


def _append(path: Path, record: dict) -> None:
    """One JSON line appended to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


class GracefulStop:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: abort at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if any rank asked to stop (one scalar all-reduce per step)."""
    if accelerator.num_processes == 1:
        return flag
    return float(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")) > 0


def _stop_requested(run: _Run, completed: int) -> None:
    """First Ctrl-C, seen after step `completed`: checkpoint it (unless just done), write the loss curve, raise."""
    if completed % run.cfg.save_every:
        _save_checkpoint(run.accelerator, run.cfg, completed)
    _write_loss_csv_on_main(run.accelerator, run.logs)
    raise Interrupted(
        f"interrupted after step {completed}; its checkpoint is complete and the loss "
        f"curve so far is in {run.logs / 'loss_curve.csv'}; continue with --resume"
    )


def _abort(run: _Run, completed: int) -> None:
    """Second Ctrl-C, during step `completed + 1`: keep the latest complete checkpoint and the loss curve, raise."""
    latest = latest_checkpoint(run.cfg.out)
    where = f"the latest complete checkpoint is {latest.name}" if latest else "no checkpoint was completed"
    _write_loss_csv_on_main(run.accelerator, run.logs)
    raise Interrupted(f"aborted during step {completed + 1}; {where}") from None


# ---- checkpoints ------------------------------------------------------------------------------------


def _checkpoint_root(out: Path) -> Path:
    """Where a run in `out` keeps its checkpoints."""
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (the `latest` pointer), or None."""
    pointer = _checkpoint_root(out) / "latest"
    if not pointer.is_file():
        return None
    path = _checkpoint_root(out) / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def _save_checkpoint(accelerator, cfg: TrainConfig, step: int) -> None:
    """Checkpoint after step `step` (1-based) as checkpoints/step-NNNNNN: written under a .partial name,
    renamed, and only then does `latest` point at it; the newest `keep_checkpoints` are kept."""
    root = _checkpoint_root(cfg.out)
    partial, final = root / f".step-{step:06d}.partial", root / f"step-{step:06d}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        state = {"step": step, **{k: getattr(cfg, k) for k in RESUME_KEYS}}
        (partial / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        pointer_tmp = root / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, root / "latest")  # the pointer moves only to a complete checkpoint
        for old in sorted(root.glob("step-*"))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _resume(accelerator, cfg: TrainConfig) -> int:
    """Load the latest complete checkpoint; returns the steps it holds. Refuses a run whose RESUME_KEYS
    differ from the checkpoint's (except `steps`, which may grow)."""
    checkpoint = latest_checkpoint(cfg.out)
    if checkpoint is None:  # _claim_run_directory refuses --resume without one; a race could remove it
        raise RopekitError(f"{cfg.out}: no complete checkpoint to resume from")
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, TypeError, KeyError):
        raise RopekitError(
            f"{checkpoint / 'trainer_state.json'}: not a ropekit trainer state (damaged?); "
            "remove this checkpoint to resume from an earlier one, or start again with --overwrite"
        ) from None
    for key in RESUME_KEYS:
        if key == "steps":
            continue
        saved = state.get(key, LATER_RESUME_KEYS.get(key))  # checkpoints from before these options
        if json.dumps(saved, default=str) != json.dumps(getattr(cfg, key), default=str):
            raise RopekitError(
                f"cannot resume: the checkpoint was made with {key}={state.get(key)!r}, "
                f"this run has {getattr(cfg, key)!r}"
            )
    accelerator.load_state(str(checkpoint))
    return int(state["step"])


# ---- finish -----------------------------------------------------------------------------------------


def _finish(run: _Run, elapsed: float) -> dict[str, Any]:
    """After the last step of this invocation: the final model when the run is complete, else a
    checkpoint of the last step (`stop_after`: keep the work) and the loss curve; returns the record."""
    cfg = run.cfg
    done = run.end_step >= cfg.steps
    record = _training_record(
        cfg, run.start_step, run.end_step, elapsed, run.tokens_per_step, run.world, run.accumulation, done
    )
    record["windows"] = {"text": len(run.windows) - run.passkey_windows, "passkey": run.passkey_windows}
    if done:
        _save_final(run.accelerator, run.model, run.tokenizer, run.plan, cfg, record)
    else:
        if run.end_step % cfg.save_every:
            _save_checkpoint(run.accelerator, cfg, run.end_step)
        _write_loss_csv_on_main(run.accelerator, run.logs)
    run.accelerator.end_training()
    return record


def _training_record(cfg, start, end, elapsed, tokens_per_step, world, accumulation, done) -> dict[str, Any]:
    """`finetune`'s return value and ropekit.json's "training": the config, steps done in all (`end`) and in
    this invocation (`end - start`), and this invocation's throughput (None when it ran no step)."""
    steps_run = end - start
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "processes": world,
        "gradient_accumulation": accumulation,
        "steps_completed": end,
        "steps_this_run": steps_run,
        "completed": done,
        "tokens_per_second": steps_run * tokens_per_step / elapsed if elapsed > 0 and steps_run else None,
        "loss_curve": "logs/loss_curve.csv",
        "document_boundaries": "EOS token between documents",
    }


def _save_final(
    accelerator,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan,
    cfg: TrainConfig,
    record: dict[str, Any],
) -> None:
    """Write the extended, fine-tuned model into `out/` (files staged, then moved in)."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards
    unwrapped = accelerator.unwrap_model(model)
    if cfg.gradient_checkpointing:
        unwrapped.gradient_checkpointing_disable()
        unwrapped.config.use_cache = True
    staging = cfg.out / ".final.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped.save_pretrained(staging, state_dict=state_dict, save_function=accelerator.save)
        tokenizer.save_pretrained(staging)
        full = extended_record(plan, source=cfg.model, training=record)
        (staging / RECORD).write_text(json.dumps(full, indent=2) + "\n")
        _write_loss_csv(cfg.out / "logs")
        set_normal_permissions(staging)
        for item in staging.iterdir():
            os.replace(item, cfg.out / item.name)
        staging.rmdir()
    accelerator.wait_for_everyone()


def _write_loss_csv_on_main(accelerator, logs: Path) -> None:
    """logs/loss_curve.csv from train_log.jsonl, on the main process, once a step has been logged."""
    if accelerator.is_main_process and (logs / "train_log.jsonl").is_file():
        _write_loss_csv(logs)


def _write_loss_csv(logs: Path) -> None:
    """logs/loss_curve.csv: step, loss, lr, tokens, seconds, one row per step in train_log.jsonl."""
    rows = [r for _, r in jsonl_records(logs / "train_log.jsonl")]
    with (logs / "loss_curve.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "loss", "lr", "tokens", "seconds"])
        writer.writeheader()
        writer.writerows(rows)


def loss_curve(out: Path) -> list[float]:
    """Losses per step from a run's log."""
    path = Path(out) / "logs" / "train_log.jsonl"
    return [r["loss"] for _, r in jsonl_records(path)]


__all__ = ["TrainConfig", "finetune", "latest_checkpoint", "loss_curve"]
