"""The settings of one fine-tuning run (`TrainConfig`), with their defaults and checks.

Light on purpose (no torch, no accelerate): the CLI reads the defaults from here for its --help.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ropekit.domains import NON_NEGATIVE, POSITIVE, SEED, Domain
from ropekit.errors import RopekitError
from ropekit.plan.geometry import MAX_LENGTH, TARGET_LENGTH
from ropekit.plan.registry import DEFAULT_METHOD

MAX_STEPS = 10_000_000


def ranged(default: Any, domain: Domain) -> Any:
    """A field whose value (unless None) must lie in `domain`: `validate` checks it, --help states it."""
    return field(default=default, metadata={"domain": domain})


@dataclass
class TrainConfig:
    model: str  # model directory or hub id
    out: Path  # run directory; becomes the extended model
    data: str  # text file, folder, or JSONL with 'text'
    target_length: int = field(metadata={"domain": TARGET_LENGTH})  # L' the plan extends to
    method: str = DEFAULT_METHOD
    method_params: dict[str, Any] = field(default_factory=dict)
    # window length; default L' (full-length), < L' with PoSE
    train_length: int | None = ranged(None, Domain(2, MAX_LENGTH, integer=True))
    pose: bool = False
    pose_chunks: int = ranged(2, Domain(2, 64, integer=True))
    # PoSE text skipping: windows are cut from spans of train_length + this many tokens
    pose_text_skip: int = ranged(0, Domain(0, MAX_LENGTH, integer=True))
    # share of training windows that are passkey examples (see ropekit.train.data)
    passkey_mix: float = ranged(0.0, Domain(0, 1, high_open=True))
    steps: int = ranged(100, Domain(1, MAX_STEPS, integer=True))  # optimizer steps
    # windows per optimizer step, over all processes (and at most the windows the data holds)
    global_batch: int = ranged(8, Domain(1, 1 << 20, integer=True))
    micro_batch: int = ranged(1, Domain(1, 1 << 16, integer=True))  # windows per forward pass per process
    lr: float = ranged(2e-5, Domain(0, 1, low_open=True, why="AdamW diverges long before 1"))
    weight_decay: float = ranged(0.0, NON_NEGATIVE)
    warmup_steps: int = ranged(0, Domain(0, MAX_STEPS, integer=True))  # at most --steps
    max_grad_norm: float | None = ranged(1.0, POSITIVE)
    seed: int = ranged(0, SEED)
    save_every: int = ranged(50, Domain(1, MAX_STEPS, integer=True))
    keep_checkpoints: int = ranged(2, Domain(1, 1000, integer=True))
    # stop cleanly after this many steps in this run (resume later)
    stop_after: int | None = ranged(None, Domain(1, MAX_STEPS, integer=True))
    resume: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    report_to: str = "auto"  # tensorboard/wandb trackers; auto: tensorboard if installed
    max_tokens: int | None = ranged(None, Domain(1, 1 << 40, integer=True))  # tokens read per document
    progress: bool = True
    overwrite: bool = False  # start again over an earlier, unchanged ropekit run in `out` (never anything else)
    extra_inputs: tuple[str, ...] = ()  # other files the run reads (a --factors-file), never inside `out`

    def window(self) -> int:
        return self.target_length if self.train_length is None else self.train_length

    def inputs(self) -> tuple[str | Path, ...]:
        """Every path the run reads: `out` must not be, contain or lie inside any of them."""
        return (self.model, self.data, *self.extra_inputs)

    def validate(self, context_length: int) -> None:
        """Refuse settings that cannot run, before any work; `context_length` is the model's (`RopeSpec`)."""
        for f in fields(self):
            domain, value = f.metadata.get("domain"), getattr(self, f.name)
            if domain is not None and value is not None:
                domain.check(flag_of(f.name), value)
        if self.target_length <= context_length:
            raise RopekitError(
                f"target length {self.target_length} must exceed the model's context length {context_length}"
            )
        if self.pose and (self.train_length is None or self.train_length >= self.target_length):
            raise RopekitError("--pose needs --train-length below --target-length (e.g. the original length)")
        if self.pose_text_skip and not self.pose:
            raise RopekitError("--pose-text-skip needs --pose")
        if self.passkey_mix and self.pose_text_skip:
            raise RopekitError(
                "--passkey-mix and --pose-text-skip do not combine (a text skip could cut the needle out)"
            )
        if not self.pose and self.window() != self.target_length and self.window() > self.target_length:
            raise RopekitError(f"training length {self.window()} exceeds the target length {self.target_length}")
        if self.warmup_steps > self.steps:
            raise RopekitError(
                f"--warmup-steps {self.warmup_steps} exceeds --steps {self.steps}: the learning rate would never "
                f"reach --lr {self.lr:g}; use fewer warmup steps"
            )
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


def flag_of(name: str) -> str:
    """The CLI flag of a TrainConfig field (`stop_after` is --stop-after-steps)."""
    return {"stop_after": "--stop-after-steps"}.get(name, "--" + name.replace("_", "-"))


def domain_help(name: str) -> str:
    """The valid range of a TrainConfig field as --help shows it, e.g. '[a number ≥ 0]'."""
    domain = next(f.metadata["domain"] for f in fields(TrainConfig) if f.name == name)
    return domain.help()


MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
REPORT_TO = ("auto", "none", "tensorboard", "wandb")
