"""Resonance RoPE (Wang et al. 2024): round every wavelength to an integer, after any method.

θ'_i = 2π / round(2π/θ''_i), where θ'' are the wrapped method's frequencies; the attention
factor is the wrapped method's. Integer wavelengths make every position's angle repeat
exactly, so positions beyond L reuse angles seen in training (for pairs with λ ≤ L).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods._common import factors_from_inv_freq
from ropekit.plan.methods.catalog import compute_scaling, get_method
from ropekit.plan.methods.record import Method, Param
from ropekit.plan.scaling import Scaling


def round_wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """θ' = 2π / round(2π/θ), float32; a wavelength below 1 token is kept at 1."""
    wavelength = torch.round(2 * math.pi / inv_freq).clamp_(min=1.0)
    return (2 * math.pi / wavelength).to(torch.float32)


def resonance(spec: RopeSpec, target_length: int, *, inner: str = "yarn", **inner_params: Any) -> Scaling:
    """Resonance applied on top of the method named `inner` (default YaRN, as in the paper)."""
    wrapped = compute_scaling(inner, spec, target_length, **inner_params)
    inv_freq = round_wavelengths(wrapped.inv_freq)
    return Scaling(
        inv_freq=inv_freq,
        factors=factors_from_inv_freq(spec, inv_freq),
        attention_factor=wrapped.attention_factor,
        details={"inner": inner, **{f"inner_{k}": v for k, v in inner_params.items()}},
    )


def known_method(name: str) -> str:
    """`name` if a method of that name is registered; refused before any work otherwise."""
    get_method(name)
    return name


METHOD = Method(
    "resonance",
    resonance,
    "round wavelengths to integers after another method",
    "Wang et al. 2024",
    params=(Param("inner", str, "the method it wraps", default="yarn", read=known_method),),
    wraps="inner",
)
