"""The run directory of a fine-tune: claiming it under the output contract, and its logs.

logs/train_log.jsonl     one record per step (main process); logs/loss_curve.csv is made from it
logs/data_rank{r}.jsonl  which windows rank r trained on, per step
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ropekit._version import __version__
from ropekit.data.documents import jsonl_records
from ropekit.errors import RopekitError
from ropekit.manifest import read_manifest, update_manifest, write_manifest
from ropekit.output import MARKER, SIGNATURE, OutputTarget, default_modes, prepare_output, remove_replaced
from ropekit.train.checkpoints import latest_checkpoint
from ropekit.train.config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator


KIND = "fine-tune run"  # the kind of output in its manifest (ropekit.manifest)
RUN_PATHS = (MARKER, "checkpoints", "logs")  # what a run writes in place before its final model


def claim_run_dir(cfg: TrainConfig) -> OutputTarget:
    """The output contract (ropekit.output) for a run directory written in place."""
    out = Path(cfg.out)
    if not cfg.resume and not cfg.overwrite and latest_checkpoint(out) is not None:
        raise RopekitError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to start "
            "it again, or choose another --out"
        )
    target = prepare_output(
        out, kind=KIND, overwrite=cfg.overwrite, inputs=cfg.inputs(), in_place=True, existing_ok=cfg.resume
    )
    if cfg.resume and latest_checkpoint(out) is None:
        raise RopekitError(f"{out}: no complete checkpoint to resume from")
    return target


def start_run_dir(target: OutputTarget) -> None:
    """Main process: remove the earlier ropekit run `--overwrite` replaces (only that one), then sign the new one
    and write its manifest (kept current by `sync_manifest`)."""
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
    write_manifest(target.path, KIND, paths=RUN_PATHS)


def sync_manifest(out: Path, also: tuple[str, ...] = ()) -> None:
    """Main process, at a point where every rank's files are complete (a checkpoint, a stop, the end): record
    the run's own files (`RUN_PATHS` and `also`, e.g. the final model's files) in its manifest. A run from
    before manifests (resumed) gets one now, listing only those files."""
    paths = (*RUN_PATHS, *also)
    if read_manifest(out) is None:
        write_manifest(out, KIND, paths=paths)
    else:
        update_manifest(out, paths)


def truncate_log(path: Path, keep_until_step: int) -> None:
    """Drop log lines past the resumed step, so the curve is what one uninterrupted run writes."""
    if not path.is_file():
        return
    kept = [r for _, r in jsonl_records(path) if r["step"] <= keep_until_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def append_record(path: Path, record: dict) -> None:
    """One JSON line appended to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def write_loss_csv_on_main(accelerator: Accelerator, logs: Path) -> None:
    """logs/loss_curve.csv from train_log.jsonl, on the main process, once a step has been logged."""
    if accelerator.is_main_process and (logs / "train_log.jsonl").is_file():
        write_loss_csv(logs)


def write_loss_csv(logs: Path) -> None:
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
