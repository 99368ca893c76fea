"""Checkpoints of a fine-tuning run: `checkpoints/step-NNNNNN/` (accelerate state + trainer_state.json)
and the `latest` pointer, which moves only to a complete checkpoint; resuming refuses other settings."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ropekit.errors import RopekitError
from ropekit.train.config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

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


LATER_RESUME_KEYS = {"pose_text_skip": 0, "passkey_mix": 0.0}  # options added after 0.1: their value when absent


class _TiedWeightsNote(logging.Filter):
    """accelerate's save_state warns "Removed shared tensor" for tied input/output embeddings: they
    are one tensor, saved once and tied again on load (the resume tests check the weights)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()  # accelerate prefixes "[RANK r] "


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())


def checkpoint_root(out: Path) -> Path:
    """Where a run in `out` keeps its checkpoints."""
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (the `latest` pointer), or None."""
    pointer = checkpoint_root(out) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(out) / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def save_checkpoint(accelerator: Accelerator, cfg: TrainConfig, step: int) -> None:
    """Checkpoint after step `step` (1-based) as checkpoints/step-NNNNNN: written under a .partial name,
    renamed, and only then does `latest` point at it; the newest `keep_checkpoints` are kept."""
    root = checkpoint_root(cfg.out)
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


def resume_checkpoint(accelerator: Accelerator, cfg: TrainConfig) -> int:
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
