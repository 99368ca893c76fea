"""No scaling (extrapolation): θ'_i = θ_i, a = 1."""

from __future__ import annotations

from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods.record import Method, NativeForm
from ropekit.plan.scaling import Plan, Scaling


def none(spec: RopeSpec, target_length: int) -> Scaling:
    """Keep the pre-training frequencies; positions beyond L are extrapolated.

    >>> none(RopeSpec(head_dim=8, base=10000.0, context_length=512), 2048).factors
    (1.0, 1.0, 1.0, 1.0)
    """
    return Scaling(inv_freq=spec.inv_freq(), factors=(1.0,) * spec.num_pairs)


def native_block(plan: Plan) -> dict:
    return {"rope_type": "default"}


METHOD = Method(
    "none", none, "no scaling: positions past L extrapolate", "—", native=NativeForm("default", native_block)
)
