"""LongRoPE (Ding et al. 2024): user-given per-pair rescale factors; a = √(1 + ln s / ln L).

θ'_i = θ_i / λ_i with λ the searched factors (this module takes them as given). Same float32
arithmetic as transformers' `rope_type="longrope"`: 1/(f_i · b^(2i/d)).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods._common import ATTENTION_FACTOR
from ropekit.plan.methods.record import Method, Param
from ropekit.plan.scaling import Scaling


def longrope_attention_factor(scale: float, original_length: int) -> float:
    """√(1 + ln s / ln L), or 1 when s ≤ 1 (transformers' default)."""
    return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original_length))


def per_pair_inv_freq(spec: RopeSpec, factors: Sequence[float]) -> torch.Tensor:
    """θ'_i = 1/(f_i · b^(2i/d)) in float32, exactly as transformers' longrope computes it."""
    shape = torch.arange(0, spec.rotary_dim, 2, dtype=torch.int64).float() / spec.rotary_dim
    return 1.0 / (torch.tensor(list(factors), dtype=torch.float32) * spec.base**shape)


def check_factor_list(spec: RopeSpec, factors: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(f) for f in factors)
    if len(values) != spec.num_pairs:
        raise RopekitError(f"factor list has {len(values)} entries; this geometry has {spec.num_pairs} rotary pairs")
    bad = [f for f in values if not math.isfinite(f) or f <= 0]
    if bad:
        raise RopekitError(f"factors must be finite and > 0; got {bad[0]}")
    return values


def longrope(
    spec: RopeSpec,
    target_length: int,
    *,
    factors: Sequence[float] | None = None,
    attention_factor: float | None = None,
) -> Scaling:
    """Apply given per-pair factors (the `long_factor` of a LongRoPE/Phi-3 config)."""
    if factors is None:
        raise RopekitError("longrope needs per-pair factors: pass factors=[...] or --factors-file FILE")
    values = check_factor_list(spec, factors)
    s = target_length / spec.context_length
    a = longrope_attention_factor(s, spec.context_length) if attention_factor is None else float(attention_factor)
    if not math.isfinite(a) or a <= 0:
        raise RopekitError(f"attention_factor must be finite and > 0, got {a}")
    return Scaling(inv_freq=per_pair_inv_freq(spec, values), factors=values, attention_factor=a)


def read_factors_file(path: str | Path) -> list[float]:
    """Read factors from JSON (a list, or an object with `long_factor`, as in Phi-3 configs) or plain text."""
    p = Path(path)
    if not p.is_file():
        raise RopekitError(f"{path}: factors file not found")
    try:
        text = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise RopekitError(f"{path}: not a readable text file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [tok for tok in re.split(r"[\s,;]+", text) if tok]
    if isinstance(data, dict):
        rope = data.get("rope_parameters") or data.get("rope_scaling") or data
        data = rope.get("long_factor", rope.get("factors")) if isinstance(rope, dict) else None
    if not isinstance(data, list) or not data:
        raise RopekitError(f"{path}: expected a list of numbers (or a JSON object with 'long_factor')")
    try:
        return [float(x) for x in data]
    except (TypeError, ValueError):
        raise RopekitError(f"{path}: every factor must be a number") from None


METHOD = Method(
    "longrope",
    longrope,
    "user-given per-pair factors (searched by LongRoPE)",
    "Ding et al. 2024",
    params=(
        Param(
            "factors",
            Path,
            "JSON list / Phi-3 config / text of per-pair factors",
            flag="--factors-file",
            read=read_factors_file,
        ),
        Param("attention_factor", float, "override the attention factor a", domain=ATTENTION_FACTOR),
    ),
    needs_factors=True,
)
