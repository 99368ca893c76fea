"""`tuned`: per-pair factors and an attention factor found by measurement (`ropekit tune`).

θ'_i = θ_i / f_i with f the factors a search chose on the user's own model and documents,
and `a` its attention factor. Nothing here measures: the factors come either as a list
(what the search builds each trial from) or from the directory `ropekit tune` wrote
(`read_study`), whose `plan.json` carries them with the study's provenance (model and data
fingerprints, trials, budget, versions). The runtime inv_freq is 1/(f_i · b^(2i/d)) in float32,
as transformers' `longrope` computes it, so the exported config reloads to exactly this plan.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods.longrope import check_factor_list, per_pair_inv_freq
from ropekit.plan.methods.record import Method, Param
from ropekit.plan.scaling import Scaling

STUDY_FILE = "plan.json"  # in the directory `ropekit tune --out` wrote
STUDY_KEY = "tuned"  # the block of that file this method reads


def tuned(
    spec: RopeSpec,
    target_length: int,
    *,
    factors: Sequence[float] | None = None,
    attention_factor: float | None = None,
    study: Mapping[str, Any] | None = None,
) -> Scaling:
    """The plan a `ropekit tune` study chose (`study`, from `read_study`), or explicit `factors` and
    `attention_factor` (default 1).

    A study is refused for another geometry or target length than it was tuned for.
    """
    if study is not None:
        if factors is not None:
            raise RopekitError("give either a tuning study or factors, not both")
        check_study_fits(study, spec, target_length)
        factors = study["factors"]
        attention_factor = study["attention_factor"] if attention_factor is None else attention_factor
    if factors is None:
        raise RopekitError("tuned needs a tuning study: --from-study DIR (the --out of `ropekit tune`)")
    values = check_factor_list(spec, factors)
    a = 1.0 if attention_factor is None else float(attention_factor)
    if not math.isfinite(a) or a <= 0:
        raise RopekitError(f"attention_factor must be finite and > 0, got {a}")
    return Scaling(inv_freq=per_pair_inv_freq(spec, values), factors=values, attention_factor=a)


def check_study_fits(study: Mapping[str, Any], spec: RopeSpec, target_length: int) -> None:
    """Refuse a study tuned for another geometry or target, naming the difference."""
    geometry = study.get("geometry", {})
    for what, want, got in [
        ("target length", study.get("target_length"), target_length),
        ("head_dim", geometry.get("head_dim"), spec.head_dim),
        ("rotary_dim", geometry.get("rotary_dim"), spec.rotary_dim),
        (
            "trained context length",
            geometry.get("context_length", geometry.get("original_length")),
            spec.context_length,
        ),
    ]:
        if want != got:
            raise RopekitError(f"the tuning study was made for {what} {want}, not {got}; tune again for this one")
    base = geometry.get("rope_theta")
    if base is None or not math.isclose(float(base), spec.base, rel_tol=1e-12):
        raise RopekitError(f"the tuning study was made for rope_theta {base}, not {spec.base:g}")


def read_study(path: str | Path) -> dict[str, Any]:
    """The `tuned` block of a `ropekit tune` output directory (or of its plan.json)."""
    p = Path(path)
    file = p / STUDY_FILE if p.is_dir() else p
    if not file.is_file():
        raise RopekitError(
            f"{path}: no {STUDY_FILE} here; a tuning study writes it when it finishes (rerun `ropekit tune` "
            "with the same --out to finish it)"
        )
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise RopekitError(f"{file}: not a readable JSON file") from None
    block = record.get(STUDY_KEY) if isinstance(record, dict) else None
    if not isinstance(block, dict) or not isinstance(block.get("factors"), list):
        raise RopekitError(f"{file}: not written by `ropekit tune` (no '{STUDY_KEY}' block with factors)")
    return block


METHOD = Method(
    "tuned",
    tuned,
    "per-pair factors and attention factor found by measurement on your model (`ropekit tune`)",
    "ropekit tune (measured search)",
    params=(
        Param("study", Path, "directory written by `ropekit tune --out`", flag="--from-study", read=read_study),
        Param("factors", float, "per-pair factors (API only)", flag=None),
        Param("attention_factor", float, "override the attention factor a"),
    ),
    exact_inv_freq=True,
    needs_factors=True,
)
