"""Base change / ABF (adjusted base frequency); a = 1.

θ'_i = (b')^(−2i/d). b' is given, or derived from the target length L' by one of two rules:
  * "critical" (Scaling Laws of RoPE-based Extrapolation, Liu et al. 2023): the base whose
    extrapolation bound T_extra = 2π·b'^(d_extra/d) equals L' (never below the original b);
  * "men2024" (Base of RoPE Bounds Context Length, Men et al. 2024): the smallest base with
    Σ_i cos(m·θ_i) ≥ 0 for all m < L', on a grid of relative spacing 0.1%;
  * "men2024-all-above": the smallest grid base above which every base passes (the passing
    set is not an interval, so this can be well above "men2024": 6,022 vs 4,296 at d = 128, L' = 1,024).
Base change needs fine-tuning to work; without it the model sees frequencies it never saw.
"""

from __future__ import annotations

import math

from ropekit.errors import RopekitError, did_you_mean
from ropekit.plan.analysis.bounds import base_for_bound, min_base_for_length
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods._common import NEW_BASE, base_change_factors, new_base_block
from ropekit.plan.methods.record import Method, NativeForm, Param
from ropekit.plan.scaling import Scaling

BASE_RULES = ("critical", "men2024", "men2024-all-above")
MEN_RULE_OF = {"men2024": "smallest", "men2024-all-above": "all-above"}


def base_change(
    spec: RopeSpec, target_length: int, *, new_base: float | None = None, rule: str = "critical"
) -> Scaling:
    """Change the RoPE base to `new_base`, or to the base `rule` gives for L'."""
    if new_base is None:
        if spec.is_extended:
            raise RopekitError(
                "the base rules assume plain RoPE frequencies; for an already-extended model give "
                "new_base (--new-base), or plan from scratch (--from-scratch)"
            )
        if rule not in BASE_RULES:
            raise did_you_mean("base rule", rule, BASE_RULES)
        derived = (
            base_for_bound(spec, target_length)
            if rule == "critical"
            else min_base_for_length(spec, target_length, rule=MEN_RULE_OF[rule])
        )
        new_base = max(derived, spec.base) if rule == "critical" else derived
        details = {"rule": rule, "derived_base": derived}
    else:
        details = {"rule": "given"}
    if (
        isinstance(new_base, bool)
        or not isinstance(new_base, (int, float))
        or not math.isfinite(new_base)
        or new_base <= 1
    ):
        raise RopekitError(
            f"new_base must be a finite number > 1 (a RoPE base ≤ 1 has no rotation geometry), got {new_base!r}"
        )
    details["new_base"] = float(new_base)
    return Scaling(inv_freq=spec.inv_freq(new_base), factors=base_change_factors(spec, new_base), details=details)


def known_rule(rule: str) -> str:
    """`rule` if it is one of BASE_RULES; refused before any work otherwise."""
    if rule not in BASE_RULES:
        raise did_you_mean("--base-rule", rule, BASE_RULES)
    return rule


METHOD = Method(
    "base",
    base_change,
    "RoPE base change (ABF); base from the critical dimension or Men et al.",
    "Liu et al. 2023; Men et al. 2024",
    params=(
        Param("new_base", float, "the new RoPE base b' (else derived by --base-rule)", domain=NEW_BASE),
        Param(
            "rule",
            str,
            "'critical' (Liu et al. 2023, default), 'men2024' (smallest passing base, Men et al. 2024) or "
            "'men2024-all-above'",
            flag="--base-rule",
            read=known_rule,
        ),
    ),
    aliases=("abf",),
    native=NativeForm("default", new_base_block),
)
