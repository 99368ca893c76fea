"""Name → method registry, and the `plan` / `compare` entry points.

Each method module declares its record (`Method`: function, parameters, paper, native export
form, …) next to its function; this module registers them. Users add methods with
`register_method` (and take them out again with `unregister_method`).
"""

from __future__ import annotations

from typing import Any

from ropekit.errors import RopekitError
from ropekit.plan.analysis.angles import BINS, DEFAULT_BINS
from ropekit.plan.geometry import MAX_LENGTH, RopeSpec, require_spec
from ropekit.plan.methods import (
    base_change,
    dprope,
    dprope_opt,
    dynamic_ntk,
    linear,
    llama3,
    longrope,
    none,
    ntk,
    resonance,
    tuned,
    yarn,
)
from ropekit.plan.methods.catalog import (
    ALIASES,
    METHODS,
    check_parameter_types,
    compute_scaling,
    get_method,
    register_method,
    unregister_method,
)
from ropekit.plan.methods.record import Method, NativeForm, Param
from ropekit.plan.scaling import Plan, Scaling, combined_factors

__all__ = [  # the method table lives in ropekit.plan.methods.catalog; these names stay importable from here
    "ALIASES",
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "NativeForm",
    "Param",
    "check_parameter_types",
    "compare",
    "compute_scaling",
    "get_method",
    "plan",
    "register_method",
    "unregister_method",
]

for _module in (
    none,
    linear,
    ntk,
    dynamic_ntk,
    yarn,
    llama3,
    longrope,
    base_change,
    resonance,
    dprope,
    dprope_opt,
    tuned,
):
    register_method(_module.METHOD)


DEFAULT_METHOD = "dprope"  # the method `make_plan`, `extend`, `ropekit plan/extend/finetune` use unless told


def plan(
    spec: RopeSpec, target_length: int, method: str = DEFAULT_METHOD, *, bins: int = DEFAULT_BINS, **params: Any
) -> Plan:
    """Plan a context extension of `spec` to `target_length` tokens with `method`.

    Method parameters go as keywords (e.g. `threshold=0.0`, `beta_fast=32`); `bins` is the
    histogram resolution K used for disturbance scores (and by dprope itself).

    >>> p = plan(RopeSpec(head_dim=8, base=10000.0, context_length=512), 2048, "pi")
    >>> p.factors, p.scale
    ((4.0, 4.0, 4.0, 4.0), 4.0)
    """
    require_spec(spec)
    check_target_length(spec, target_length)
    BINS.check("bins (--bins)", bins)
    m = get_method(method)
    params = m.current_keywords(params)
    if m.uses_bins:  # methods that choose by disturbance use the same K
        params = {"bins": bins, **params}
    scaling = compute_scaling(m.name, spec, target_length, **params)
    if scaling.num_pairs != spec.num_pairs:
        raise RopekitError(
            f"method {m.name!r} returned {scaling.num_pairs} per-pair factors; this geometry has {spec.num_pairs} pairs"
        )
    if spec.is_extended:
        scaling = compose_with_current(spec, scaling)
    return Plan(method=m.name, spec=spec, target_length=target_length, params=params, scaling=scaling, bins=bins)


MAX_TARGET_LENGTH = MAX_LENGTH  # 4,194,304 tokens (see ropekit.plan.geometry)


def compose_with_current(spec: RopeSpec, scaling: Scaling) -> Scaling:
    """A method's factors f on top of an already-extended model's current frequencies θ_i / g_i.

    Runtime frequencies are those of a `longrope` block with combined factors F_i = g_i·f_i
    relative to the original base, 1/(F_i·b^(2i/d)) in float32, exactly what transformers
    reloads (within float32 rounding of θ^cur_i / f_i); the attention factor is a_cur·a.
    `factors` stay relative to the current frequencies; `details["method_attention_factor"]` is a.
    """
    from ropekit.plan.methods.longrope import per_pair_inv_freq

    return Scaling(
        inv_freq=per_pair_inv_freq(spec, combined_factors(spec, scaling.factors)),
        factors=scaling.factors,
        attention_factor=spec.prior_attention_factor * scaling.attention_factor,
        details={**scaling.details, "method_attention_factor": scaling.attention_factor},
    )


def check_target_length(spec: RopeSpec, target_length: int) -> None:
    if isinstance(target_length, bool) or not isinstance(target_length, int):
        raise RopekitError(f"target length must be an integer number of tokens, got {target_length!r}")
    if target_length <= spec.context_length and spec.is_extended:
        kind = (spec.current_scaling or {}).get("rope_type", "existing")
        raise RopekitError(
            f"target length {target_length} does not exceed the {spec.context_length} tokens this model already "
            f"handles with its {kind} scaling; pass --from-scratch (from_scratch=True) to re-plan from its original "
            f"{spec.pretrained_length}-token RoPE, replacing that scaling"
        )
    if target_length > MAX_TARGET_LENGTH:
        raise RopekitError(
            f"target length {target_length:,} is beyond ropekit's bound of {MAX_TARGET_LENGTH:,} tokens "
            "(2^22; planning cost grows with the length)"
        )
    if target_length <= spec.context_length:
        raise RopekitError(f"target length {target_length} must exceed the original length {spec.context_length}")


def comparable_methods(spec: RopeSpec | None = None) -> list[str]:
    """Methods that run from the geometry alone (longrope needs searched factors; the base rules need plain
    RoPE), minus slow searches (dprope-opt)."""
    skip = {"base"} if spec is not None and spec.is_extended else set()
    return [name for name, m in METHODS.items() if not m.needs_factors and m.in_default_comparison and name not in skip]


def compare(
    spec: RopeSpec, target_length: int, methods: list[str] | None = None, *, bins: int = DEFAULT_BINS
) -> dict[str, Plan]:
    """Plan every method (default: all that need no extra input and apply to this geometry) with default
    parameters. Methods named in `methods` must all apply; see `comparison` for the ones skipped."""
    return comparison(spec, target_length, methods, bins=bins)[0]


def comparison(
    spec: RopeSpec, target_length: int, methods: list[str] | None = None, *, bins: int = DEFAULT_BINS
) -> tuple[dict[str, Plan], dict[str, str]]:
    """(plans by method, {method: why it was skipped}). With the default list, a method that does not apply
    to this geometry (dynamic NTK at rotary dimension 2) is skipped with its reason instead of failing the
    whole comparison; methods named in `methods` raise their error."""
    require_spec(spec)
    plans, skipped = {}, {}
    for name in methods or comparable_methods(spec):
        try:
            plans[get_method(name).name] = plan(spec, target_length, name, bins=bins)
        except RopekitError as exc:
            if methods:
                raise
            skipped[get_method(name).name] = str(exc)
    return plans, skipped
