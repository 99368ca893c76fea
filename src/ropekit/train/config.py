"""The settings of one fine-tuning run (`TrainConfig`), with their defaults and checks.

Light on purpose (no torch, no accelerate): the CLI reads the defaults from here for its --help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ropekit.errors import RopekitError
from ropekit.plan.registry import DEFAULT_METHOD


@dataclass
class TrainConfig:
    model: str  # model directory or hub id
    out: Path  # run directory; becomes the extended model
    data: str  # text file, folder, or JSONL with 'text'
    target_length: int  # L' the plan extends to
    method: str = DEFAULT_METHOD
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


MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
REPORT_TO = ("auto", "none", "tensorboard", "wandb")
