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

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ropekit.apply.extend import RECORD, extended_record, load_model, load_tokenizer
from ropekit.apply.patch import apply, model_spec
from ropekit.data.documents import read_documents, tokenize_documents
from ropekit.errors import Interrupted, RopekitError
from ropekit.output import set_normal_permissions
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.registry import plan as make_plan
from ropekit.plan.scaling import Plan
from ropekit.train.checkpoints import latest_checkpoint, resume_checkpoint, save_checkpoint
from ropekit.train.config import TrainConfig
from ropekit.train.data import mix_passkey, pack_windows, window_indices
from ropekit.train.pose import pose_rng, pose_sample
from ropekit.train.run_dir import (
    append_record,
    claim_run_dir,
    loss_curve,
    start_run_dir,
    sync_manifest,
    truncate_log,
    write_loss_csv,
    write_loss_csv_on_main,
)
from ropekit.train.signals import GracefulStop, any_rank

if TYPE_CHECKING:
    from accelerate import Accelerator
    from tqdm import tqdm
    from transformers import PreTrainedTokenizerBase


@dataclass
class _Run:
    """Everything `_setup` builds for one fine-tuning run; the step, checkpoint and finish functions read it.

    Conventions: steps are counted from 1 in logs, checkpoints and the record (`start_step` is the
    number of steps already done, 0 for a fresh run); `end_step` is where this invocation stops
    (`cfg.steps`, or earlier with `stop_after`); one optimizer step sees `cfg.global_batch`
    windows over all `world` processes, as `accumulation` micro-batches of `cfg.micro_batch` each."""

    cfg: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # the prepared model (DDP/FSDP/DeepSpeed-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tokenizer: PreTrainedTokenizerBase
    plan: Plan
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
    """Validate, check the run directory, build the accelerator, data, model and optimizer (in this order:
    the seed is set after the accelerator and before anything draws random numbers), and only then write
    into the run directory: a refused run writes nothing."""
    from accelerate import PartialState
    from accelerate.utils import set_seed

    spec = RopeSpec.from_pretrained(cfg.model)
    cfg.validate(spec.context_length)
    check_environment(cfg)
    target = claim_run_dir(cfg)  # checks only: nothing is written before every check has passed
    make_plan(spec, cfg.target_length, cfg.method, **cfg.method_params)  # a plan that cannot be made: refused now
    # accelerate only builds a gloo process group under torchrun when told cpu=True on a machine without CUDA
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    world, rank = state.num_processes, state.process_index
    accumulation = _accumulation(cfg, world)
    accelerator = _setup_accelerator(cfg, cpu=cpu, accumulation=accumulation)
    set_seed(cfg.seed)
    tokenizer, windows, passkey_windows = _setup_data(cfg, accelerator)
    model, optimizer, scheduler, plan = _setup_model(cfg, accelerator)
    if not cfg.resume:
        if state.is_main_process:
            start_run_dir(target)
        state.wait_for_everyone()
    start_step = resume_checkpoint(accelerator, cfg) if cfg.resume else 0
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


def check_environment(cfg: TrainConfig) -> None:
    """Refuse settings this machine cannot honour, instead of recording them while doing something else."""
    import importlib.util

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise RopekitError(
            "--mixed-precision fp16 needs a CUDA GPU (on the CPU accelerate would train in fp32 while the run "
            "recorded fp16); use --mixed-precision no, or bf16"
        )
    if cfg.report_to != "auto":
        missing = [t for t in _trackers(cfg.report_to) if importlib.util.find_spec(t) is None]
        if missing:
            raise RopekitError(
                f"--report-to {missing[0]}: {missing[0]} is not installed (pip install {missing[0]}), "
                "or use --report-to none (losses always go to logs/)"
            )


def _accumulation(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step on each process: global batch = micro batch × processes × this."""
    if cfg.global_batch % (cfg.micro_batch * world):
        raise RopekitError(
            f"global batch {cfg.global_batch} is not a multiple of micro batch × processes "
            f"({cfg.micro_batch} × {world})"
        )
    return cfg.global_batch // (cfg.micro_batch * world)


def _setup_accelerator(cfg: TrainConfig, *, cpu: bool, accumulation: int) -> Accelerator:
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


def _setup_data(cfg: TrainConfig, accelerator: Accelerator) -> tuple[PreTrainedTokenizerBase, np.ndarray, int]:
    """The tokenizer, the packed training windows (documents joined by EOS, then the passkey mix, see
    `ropekit.train.data`) and how many of them are passkey examples."""
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise RopekitError(f"{cfg.model}: no tokenizer beside the model")
    with accelerator.main_process_first():  # one process fills the tokenisation cache
        documents = tokenize_documents(read_documents(cfg.data), tokenizer)
    documents = [d[: cfg.max_tokens] for d in documents] if cfg.max_tokens is not None else documents
    windows = pack_windows(documents, cfg.window() + cfg.pose_text_skip, eos_id=tokenizer.eos_token_id)
    mixed = mix_passkey(windows, cfg.passkey_mix, tokenizer, seed=cfg.seed, eos_id=tokenizer.eos_token_id)
    if cfg.global_batch > len(mixed):
        raise RopekitError(
            f"--global-batch {cfg.global_batch} exceeds the {len(mixed)} windows of {cfg.window()} tokens the data "
            f"gives, so every step would see each window many times; use --global-batch ≤ {len(mixed)} or more data"
        )
    return tokenizer, mixed, len(mixed) - len(windows)


def _setup_model(
    cfg: TrainConfig, accelerator: Accelerator
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, Plan]:
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
        truncate_log(run.logs / "train_log.jsonl", run.start_step)
    accelerator.wait_for_everyone()
    truncate_log(run.logs / f"data_rank{run.rank}.jsonl", run.start_step)
    accelerator.init_trackers(
        "ropekit-finetune",
        config={k: str(v) for k, v in asdict(run.cfg).items()},
        init_kwargs={"wandb": {"dir": str(run.logs)}},  # wandb's default is ./wandb in the working directory
    )


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
                loss, grad_norm, seen = _train_step(run, step)
                _log_step(run, step + 1, loss, seen, started)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}")
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    _diverged(run, step + 1, loss, grad_norm)
                if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                    _checkpoint(run, step + 1)
                completed = step + 1
                if any_rank(run.accelerator, stop.requested) and completed < cfg.steps:
                    _stop_requested(run, completed, stop.signal_number)
    except KeyboardInterrupt as exc:  # a second Ctrl-C or SIGTERM
        _abort(run, completed, getattr(exc, "exit_code", 130) - 128)
    finally:
        if progress is not None:
            progress.close()
    return time.perf_counter() - started


def _progress_bar(run: _Run) -> tqdm | None:
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


def _train_step(run: _Run, step: int) -> tuple[float, float, list[int]]:
    """One optimizer step (0-based `step`): `accumulation` forward/backward passes, then clip, step, zero.

    Returns the loss averaged over the step's micro-batches and all ranks, the gradient norm before
    clipping (0 when not clipping), and the window indices this rank trained on (see
    `ropekit.train.data.window_indices`)."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    loss_sum = torch.zeros((), device=accelerator.device)
    grad_norm = 0.0
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
                norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                grad_norm = 0.0 if norm is None else float(norm)
            run.optimizer.step()
            if accelerator.sync_gradients:
                run.scheduler.step()
            run.optimizer.zero_grad()
        loss_sum += loss.detach() / run.accumulation
    return float(accelerator.reduce(loss_sum, "mean")), grad_norm, seen


def _batch(
    cfg: TrainConfig, windows: np.ndarray, idx: list[int], step: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    append_record(run.logs / f"data_rank{run.rank}.jsonl", {"step": step, "windows": seen})
    if run.accelerator.is_main_process:
        append_record(run.logs / "train_log.jsonl", record)
    run.accelerator.log({"loss": loss, "lr": lr}, step=step)


def _checkpoint(run: _Run, step: int) -> None:
    """Checkpoint after step `step` (every rank), then record the run's files in its manifest (main process)."""
    save_checkpoint(run.accelerator, run.cfg, step)
    _sync_manifest(run)


def _sync_manifest(run: _Run, also: tuple[str, ...] = ()) -> None:
    """Main process: the loss curve so far, then the run's files in its manifest."""
    write_loss_csv_on_main(run.accelerator, run.logs)
    if run.accelerator.is_main_process:
        sync_manifest(run.cfg.out, also)


def _diverged(run: _Run, step: int, loss: float, grad_norm: float) -> None:
    """The loss or the gradient norm of step `step` is NaN or inf: stop without saving that step."""
    latest = latest_checkpoint(run.cfg.out)
    _sync_manifest(run)
    kept = f"the last good checkpoint is {latest.name}" if latest else "no checkpoint was saved before it"
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    raise RopekitError(
        f"training diverged: {what} at step {step}, so the run stopped there without saving it; {kept} "
        f"(the loss curve is in {run.logs / 'loss_curve.csv'}); start again with a lower --lr (now {run.cfg.lr:g})"
    )


def _stop_requested(run: _Run, completed: int, signal_number: int) -> None:
    """First Ctrl-C or SIGTERM, seen after step `completed`: checkpoint it (unless just done), write the loss
    curve, raise."""
    if completed % run.cfg.save_every:
        save_checkpoint(run.accelerator, run.cfg, completed)
    _sync_manifest(run)
    raise Interrupted(
        f"interrupted after step {completed}; its checkpoint is complete and the loss "
        f"curve so far is in {run.logs / 'loss_curve.csv'}; continue with --resume",
        signal_number=signal_number,
    )


def _abort(run: _Run, completed: int, signal_number: int) -> None:
    """Second Ctrl-C or SIGTERM, during step `completed + 1`: keep the latest complete checkpoint and the loss
    curve, raise."""
    latest = latest_checkpoint(run.cfg.out)
    where = f"the latest complete checkpoint is {latest.name}" if latest else "no checkpoint was completed"
    if run.accelerator.num_processes == 1:  # other ranks may be mid-write: their next run's checkpoint records them
        _sync_manifest(run)
    raise Interrupted(f"aborted during step {completed + 1}; {where}", signal_number=signal_number) from None


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
            save_checkpoint(run.accelerator, cfg, run.end_step)
        _sync_manifest(run)
    run.accelerator.end_training()
    return record


def _training_record(
    cfg: TrainConfig,
    start: int,
    end: int,
    elapsed: float,
    tokens_per_step: int,
    world: int,
    accumulation: int,
    done: bool,
) -> dict[str, Any]:
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
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    plan: Plan,
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
        write_loss_csv(cfg.out / "logs")
        set_normal_permissions(staging)
        names = tuple(item.name for item in staging.iterdir())
        for name in names:
            os.replace(staging / name, cfg.out / name)
        staging.rmdir()
        sync_manifest(cfg.out, names)
    accelerator.wait_for_everyone()


__all__ = ["TrainConfig", "finetune", "latest_checkpoint", "loss_curve"]
