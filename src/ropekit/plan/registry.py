"""Name → method registry, and the `plan` / `compare` entry points.

Each method module declares its record (`Method`: function, parameters, paper, native export
form, …) next to its function; this module registers them. Users add methods with
`register_method` (and take them out again with `unregister_method`).
"""

from __future__ import annotations

import inspect
import numbers
import types
import typing
from collections.abc import Sequence
from typing import Any

from ropekit.errors import RopekitError, did_you_mean
from ropekit.plan.geometry import RopeSpec, require_spec
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
from ropekit.plan.methods.record import Method, NativeForm, Param
from ropekit.plan.scaling import Plan, Scaling, combined_factors

__all__ = [
    "METHODS",
    "Method",
    "NativeForm",
    "Param",
    "compare",
    "get_method",
    "plan",
    "register_method",
    "unregister_method",
]

METHODS: dict[str, Method] = {}
ALIASES: dict[str, str] = {}  # other name → method name, from the records' `aliases`


def register_method(method: Method) -> None:
    """Add (or replace) a method under `method.name` (and its aliases)."""
    unregister_method(method.name, missing_ok=True)
    METHODS[method.name] = method
    ALIASES.update({alias.lower(): method.name for alias in method.aliases})


def unregister_method(name: str, *, missing_ok: bool = False) -> None:
    """Remove the method registered as `name`, with its aliases."""
    if name not in METHODS:
        if missing_ok:
            return
        raise did_you_mean("method", name, METHODS)
    del METHODS[name]
    for alias in [a for a, target in ALIASES.items() if target == name]:
        del ALIASES[alias]


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


def get_method(name: str) -> Method:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in METHODS:
        raise did_you_mean("method", name, METHODS)
    return METHODS[key]


def compute_scaling(method: str, spec: RopeSpec, target_length: int, **params: Any) -> Scaling:
    """Run one method function after checking its parameter names."""
    m = get_method(method)
    accepted = m.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(m.function).parameters.values())
    unknown = [k for k in params if k not in accepted]
    if unknown and not takes_any:
        allowed = ", ".join(accepted) or "no parameters"
        raise RopekitError(f"method {m.name!r} does not take {unknown[0]!r}; it takes: {allowed}")
    check_parameter_types(m, params)
    return m.function(spec, target_length, **params)


def check_parameter_types(m: Method, params: dict[str, Any]) -> None:
    """Refuse a parameter whose value does not fit the method's annotation (`threshold="x"`)."""
    hints = typing.get_type_hints(m.function)
    for name, value in params.items():
        hint = hints.get(name)
        if hint is None or value is None:
            continue
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        options = [t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None)]
        if not any(_fits(value, t) for t in options):
            raise RopekitError(
                f"method {m.name!r}: {name} must be {' or '.join(_describe(t) for t in options)}, got {value!r}"
            )


def _fits(value: Any, kind: Any) -> bool:
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if typing.get_origin(kind) in (Sequence, list, tuple):
        return (isinstance(value, (list, tuple)) or hasattr(value, "tolist")) and all(
            _fits(v, float) for v in (value.tolist() if hasattr(value, "tolist") else value)
        )
    return True


def _describe(kind: Any) -> str:
    return {float: "a number", int: "an integer", str: "a string"}.get(kind, "a list of numbers")


def plan(spec: RopeSpec, target_length: int, method: str = "dprope", *, bins: int = 360, **params: Any) -> Plan:
    """Plan a context extension of `spec` to `target_length` tokens with `method`.

    Method parameters go as keywords (e.g. `threshold=0.0`, `beta_fast=32`); `bins` is the
    histogram resolution K used for disturbance scores (and by dprope itself).

    >>> p = plan(RopeSpec(head_dim=8, base=10000.0, original_length=512), 2048, "pi")
    >>> p.factors, p.scale
    ((4.0, 4.0, 4.0, 4.0), 4.0)
    """
    require_spec(spec)
    check_target_length(spec, target_length)
    m = get_method(method)
    if m.uses_bins:  # methods that choose by disturbance use the same K
        params = {"bins": bins, **params}
    scaling = compute_scaling(m.name, spec, target_length, **params)
    if spec.is_extended:
        scaling = compose_with_current(spec, scaling)
    return Plan(method=m.name, spec=spec, target_length=target_length, params=params, scaling=scaling, bins=bins)


MAX_TARGET_LENGTH = (
    1 << 22
)  # 4,194,304 tokens (LongRoPE's 2048k fits): disturbance costs O(L' · d/2), ~1 min per method there


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
    if target_length <= spec.original_length and spec.is_extended:
        kind = (spec.current_scaling or {}).get("rope_type", "existing")
        raise RopekitError(
            f"target length {target_length} does not exceed the {spec.original_length} tokens this model already "
            f"handles with its {kind} scaling; pass --from-scratch (from_scratch=True) to re-plan from its original "
            f"{spec.pretrained_length}-token RoPE, replacing that scaling"
        )
    if target_length > MAX_TARGET_LENGTH:
        raise RopekitError(
            f"target length {target_length:,} is beyond ropekit's bound of {MAX_TARGET_LENGTH:,} tokens "
            "(2^22; planning cost grows with the length)"
        )
    if target_length <= spec.original_length:
        raise RopekitError(f"target length {target_length} must exceed the original length {spec.original_length}")


def comparable_methods(spec: RopeSpec | None = None) -> list[str]:
    """Methods that run from the geometry alone (longrope needs searched factors; the base rules need plain
    RoPE), minus slow searches (dprope-opt)."""
    skip = {"base"} if spec is not None and spec.is_extended else set()
    return [name for name, m in METHODS.items() if not m.needs_factors and m.in_default_comparison and name not in skip]


def compare(
    spec: RopeSpec, target_length: int, methods: list[str] | None = None, *, bins: int = 360
) -> dict[str, Plan]:
    """Plan every method (default: all that need no extra input) with default parameters."""
    require_spec(spec)
    names = methods or comparable_methods(spec)
    return {get_method(n).name: plan(spec, target_length, n, bins=bins) for n in names}
