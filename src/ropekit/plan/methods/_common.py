"""Small helpers shared by the method modules."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ropekit.domains import Domain
from ropekit.errors import RopekitError
from ropekit.plan.geometry import MAX_LENGTH, ROPE_THETA, RopeSpec

if TYPE_CHECKING:
    from ropekit.plan.scaling import Plan


# Domains shared by several methods' parameters (`Param.domain`): checked by make_plan, shown by --help.
SCALE = Domain(0, MAX_LENGTH, low_open=True)  # the scalar scale s
ATTENTION_FACTOR = Domain(
    0, 10, low_open=True, why="it multiplies cos and sin, so attention logits scale by a²; methods give 1 to 2"
)
NEW_BASE = ROPE_THETA
LENGTH = Domain(1, MAX_LENGTH, integer=True)


def pair_exponents(spec: RopeSpec) -> torch.Tensor:
    """2i/d for each pair, float64, shape (d/2,)."""
    return torch.arange(0, spec.rotary_dim, 2, dtype=torch.float64) / spec.rotary_dim


def base_change_factors(spec: RopeSpec, new_base: float) -> tuple[float, ...]:
    """f_i = θ_i/θ'_i = (b'/b)^(2i/d) for a change of base b → b'."""
    return tuple((new_base / spec.base) ** pair_exponents(spec).numpy())


def factors_from_inv_freq(spec: RopeSpec, inv_freq: torch.Tensor) -> tuple[float, ...]:
    """f_i = θ_i/θ'_i from the float32 frequencies (used where no simpler closed form exists)."""
    return tuple((spec.inv_freq().double() / inv_freq.double()).tolist())


def require_scale(scale: float, *, at_least: float = 1.0, what: str = "scale (target/original length)") -> None:
    if not math.isfinite(scale) or scale < at_least:
        raise RopekitError(f"{what} must be ≥ {at_least:g}, got {scale:g}")


def require_finite_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise RopekitError(f"{name} must be a finite positive number, got {value!r}")


def new_base_block(plan: Plan) -> dict[str, Any]:
    """A base change's native form: transformers' `default` block with the new rope_theta."""
    return {"rope_type": "default", "rope_theta": plan.scaling.details["new_base"]}
