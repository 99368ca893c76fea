"""Linear position interpolation, PI (Chen et al. 2023): θ'_i = θ_i / s, a = 1.

Scaling positions by 1/s is the same as scaling inv_freq by 1/s. Matches transformers'
`rope_type="linear"` (`inv_freq /= factor` in float32).
"""

from __future__ import annotations

from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods._common import SCALE, require_finite_positive
from ropekit.plan.methods.record import Method, NativeForm, Param, renamed_keywords
from ropekit.plan.scaling import Plan, Scaling


@renamed_keywords(factor="scale")
def linear(spec: RopeSpec, target_length: int, *, scale: float | None = None) -> Scaling:
    """Divide every frequency by the scale s (`scale`, default L'/L).

    >>> linear(RopeSpec(head_dim=8, base=10000.0, context_length=512), 2048).factors
    (4.0, 4.0, 4.0, 4.0)
    """
    s = target_length / spec.context_length if scale is None else scale
    require_finite_positive("scale", s)
    inv_freq = spec.inv_freq()
    inv_freq /= s
    return Scaling(inv_freq=inv_freq, factors=(float(s),) * spec.num_pairs)


def native_block(plan: Plan) -> dict:
    """transformers' `linear` block."""
    return {"rope_type": "linear", "factor": plan.params.get("scale") or plan.scale}


METHOD = Method(
    "pi",
    linear,
    "linear position interpolation: every θ_i / s",
    "Chen et al. 2023",
    params=(Param("scale", float, "the scale s: divisor of every frequency", default="L'/L", flag=None, domain=SCALE),),
    aliases=("linear",),
    native=NativeForm("linear", native_block),
)
