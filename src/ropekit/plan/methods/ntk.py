"""NTK-aware scaling (bloc97): a base change b' = b·α^(d/(d−2)), α = s by default; a = 1.

θ'_i = (b·α^(d/(d−2)))^(−2i/d): the highest-frequency pair is unchanged and the lowest
is divided by exactly α.
"""

from __future__ import annotations

from ropekit.domains import Domain
from ropekit.plan.geometry import MAX_LENGTH, RopeSpec
from ropekit.plan.methods._common import base_change_factors, new_base_block, require_scale
from ropekit.plan.methods.record import Method, NativeForm, Param
from ropekit.plan.scaling import Scaling


def ntk_base(spec: RopeSpec, alpha: float) -> float:
    """b' = b · α^(d/(d−2))."""
    d = spec.rotary_dim
    return spec.base * alpha ** (d / (d - 2))


def ntk(spec: RopeSpec, target_length: int, *, alpha: float | None = None) -> Scaling:
    """NTK-aware base change with α (default s = L'/L).

    >>> plan = ntk(RopeSpec(head_dim=128, base=10000.0, context_length=4096), 16384)
    >>> round(plan.details["new_base"])
    40890
    """
    a = target_length / spec.context_length if alpha is None else alpha
    require_scale(a, what="NTK alpha")
    if spec.rotary_dim == 2:
        new_base = spec.base * a  # d/(d-2) is undefined for a single pair; keep the spirit (last pair ÷ α)
    else:
        new_base = ntk_base(spec, a)
    return Scaling(
        inv_freq=spec.inv_freq(new_base),
        factors=base_change_factors(spec, new_base),
        details={"new_base": new_base, "alpha": a},
    )


METHOD = Method(
    "ntk",
    ntk,
    "NTK-aware base change b·α^(d/(d−2))",
    "bloc97 2023",
    params=(Param("alpha", float, "α", default="s", domain=Domain(1, MAX_LENGTH)),),
    aliases=("ntk-aware",),
    native=NativeForm("default", new_base_block),
)
