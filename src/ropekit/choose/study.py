"""What every stage of `ropekit tune` shares: its configuration, its context and the study directory.

`ropekit.choose.tune` runs the stages, `ropekit.choose.finish` reports; both read the context and
write the study directory (its `results.json` marker and manifest) through this module.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ropekit._version import __version__
from ropekit.choose.measure import Documents, Measurer
from ropekit.choose.screen import NAMED
from ropekit.choose.space import FAMILIES, SearchSpace
from ropekit.errors import RopekitError
from ropekit.manifest import read_manifest, update_manifest, write_manifest
from ropekit.output import SIGNATURE, default_modes

if TYPE_CHECKING:
    import optuna

    from ropekit.plan.geometry import RopeSpec
    from ropekit.plan.scaling import Plan

MARKER = "results.json"  # written at the start (status "running") and rewritten when the study finishes
STORE_FILE = "cells.sqlite"
STUDY_FILE = "study.sqlite"
KIND = "tune study"  # the kind of output in its manifest (ropekit.manifest)
# What a study writes in place while it runs (SQLite's -wal/-shm files exist while a database is open).
STATE_PATHS = (MARKER, *(f"{db}{suffix}" for db in (STORE_FILE, STUDY_FILE) for suffix in ("", "-wal", "-shm")))
PENALTY = 1000.0  # objective of a plan that fails the retention tolerance, plus its excess in nats
SAMPLERS = ("tpe", "cmaes", "random")
OBJECTIVES = ("nll", "nll+passkey")
DEFAULT_FAMILY = "ramp"  # measured: bench/tune_samplers.py (README "ropekit tune")
DEFAULT_SAMPLER = "tpe"  # measured: bench/tune_samplers.py
PASSKEY_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class TuneConfig:
    """Everything `tune` needs. Lengths in tokens; tolerance relative (0.01 = 1% perplexity)."""

    model: str  # model directory, .gguf file or hub id
    target_length: int  # L′
    data: str | list[str]  # tuning documents: text files, folders or JSONL
    held_out: str | list[str]  # held-out documents (the report is measured on these only)
    out: Path  # the study directory: written in place, rerun to continue
    window: int | None = None  # tuning window (default: L′)
    report_window: int | None = None  # held-out window (default: L′)
    family: str = DEFAULT_FAMILY
    sampler: str = DEFAULT_SAMPLER
    trials: int = 40  # search trials in the study, all workers together (screened plans not counted)
    budget_minutes: float | None = None  # this process's screen + search time; the report follows
    retention_length: int | None = None  # P (default min(2048, L/4))
    retention_tolerance: float = 0.01
    attention_range: tuple[float, float] | None = None  # default (1, 1 + 0.2·ln s)
    objective: str = "nll"
    passkey_weight: float = 1.0  # nats per unit of passkey accuracy
    passkey_trials: int = 2  # per depth, teacher-forced, at the tuning window
    screen: list[str] | None = None  # screen labels (default: all)
    seeds: int = 3  # best screened plans enqueued as the first trials
    report_methods: list[str] = field(default_factory=lambda: [m for m in NAMED])
    report_seeds: bool = True  # also report the seeds on held-out text
    storage: str | None = None  # optuna RDB URL (default: SQLite in `out`)
    study_name: str | None = None  # default: derived from the study's identity
    worker: bool = False  # search trials only: no screen, no report
    seed: int = 0
    bucket: int = 256  # tokens per position bucket (plots, bootstrap)
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise RopekitError(f"--family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.sampler not in SAMPLERS:
            raise RopekitError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.objective not in OBJECTIVES:
            raise RopekitError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.trials < 0:
            raise RopekitError(f"--trials must be ≥ 0, got {self.trials}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise RopekitError(f"--budget-minutes must be > 0, got {self.budget_minutes}")
        if not (math.isfinite(self.retention_tolerance) and self.retention_tolerance >= 0):
            raise RopekitError(f"--retention-tolerance must be ≥ 0, got {self.retention_tolerance}")
        if self.worker and self.overwrite:
            raise RopekitError("--worker joins a running study; it never starts one again (drop --overwrite)")
        if self.seeds < 0 or self.bucket < 1 or self.passkey_trials < 1:
            raise RopekitError("--seeds must be ≥ 0, --bucket and --passkey-trials ≥ 1")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise RopekitError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class Evaluation:
    """One plan measured on the tuning documents."""

    value: float  # the objective (PENALTY + excess when infeasible)
    retention_ppl: float
    retention_ratio: float  # against the unscaled model
    feasible: bool
    nll_beyond: float | None = None  # None: rejected at the retention check, no long pass
    nll_within: float | None = None
    window_ppl: float | None = None
    passkey: float | None = None

    def attrs(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Context:
    """What every stage shares: the model, its geometry, the documents and the store."""

    cfg: TuneConfig
    spec: RopeSpec
    measurer: Measurer
    tuning: Documents
    held_out: Documents
    space: SearchSpace
    window: int
    report_window: int
    retention_length: int
    identity: dict[str, Any]
    provenance: dict[str, Any]
    started: float
    reference_retention: float = math.nan
    screen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def deadline(self) -> float | None:
        minutes = self.cfg.budget_minutes
        return None if minutes is None else self.started + 60 * minutes

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def plan_of(self, factors: Sequence[float], attention_factor: float) -> Plan:
        from ropekit.plan.registry import plan as make_plan

        return make_plan(
            self.spec, self.cfg.target_length, "tuned", factors=list(factors), attention_factor=attention_factor
        )


def sync_manifest(out: Path, also: Sequence[str] = ()) -> None:
    """Record the study's own files (`STATE_PATHS` and `also`, e.g. the report) in its manifest, so a later
    `--overwrite` can prove the directory is ropekit's; a file the user added is never absorbed."""
    paths = (*STATE_PATHS, *also)
    if read_manifest(out) is None:
        write_manifest(out, KIND, paths=paths)
    else:
        update_manifest(out, paths)


def read_marker(out: Path) -> dict[str, Any] | None:
    path = out / MARKER
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("kind") == "ropekit tune" else None


def write_marker(out: Path, record: dict[str, Any]) -> None:
    write_json_atomically(out / MARKER, {**SIGNATURE, "kind": "ropekit tune", "ropekit_version": __version__, **record})


def write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.chmod(tmp, default_modes()[1])
    os.replace(tmp, path)


def storage_url(ctx: Context) -> str:
    return ctx.cfg.storage or f"sqlite:///{(Path(ctx.cfg.out) / STUDY_FILE).resolve()}"


def redact(url: str) -> str:
    """An RDB URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (any unparsable URL is shown as its scheme only)
        return url.split(":", 1)[0] + ":…"


def completed(study: optuna.Study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def best_feasible(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    feasible = [t for t in done if t.user_attrs.get("feasible") and t.value is not None]
    return min(feasible, key=lambda t: float(t.value)) if feasible else None  # type: ignore[arg-type]


def progress_bar(ctx: Context, *, total: int, desc: str, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not ctx.cfg.progress, file=sys.stderr, dynamic_ncols=True)
