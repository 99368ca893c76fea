"""Plan: RoPE geometry, every scaling method, and the angle-distribution analysis."""

from ropekit.plan.geometry import RopeSpec
from ropekit.plan.registry import METHODS, compare, get_method, plan, register_method, unregister_method
from ropekit.plan.scaling import Plan, Scaling

__all__ = [
    "METHODS",
    "Plan",
    "RopeSpec",
    "Scaling",
    "compare",
    "get_method",
    "plan",
    "register_method",
    "unregister_method",
]
