"""Name → method registry, and the `plan` / `compare` entry points.

Each record names the function, the parameters it accepts, its paper and the
transformers `rope_type` that implements it natively (if any). Users can add methods with
`register_method`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ropekit.errors import RopekitError, did_you_mean
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods.base_change import base_change
from ropekit.plan.methods.dprope import dprope
from ropekit.plan.methods.dprope_opt import dprope_opt
from ropekit.plan.methods.dynamic_ntk import dynamic_ntk
from ropekit.plan.methods.linear import linear
from ropekit.plan.methods.llama3 import llama3
from ropekit.plan.methods.longrope import longrope
from ropekit.plan.methods.none import none
from ropekit.plan.methods.ntk import ntk
from ropekit.plan.methods.resonance import resonance
from ropekit.plan.methods.yarn import yarn
from ropekit.plan.scaling import Plan, Scaling


@dataclass(frozen=True)
class Method:
    name: str
    function: Callable[..., Scaling]
    summary: str
    paper: str
    transformers_type: str | None = None  # rope_type transformers implements natively
    needs_factors: bool = False  # cannot run without user-given factors
    in_default_comparison: bool = True  # False for searches too slow to run on every `ropekit plan`

    @property
    def parameters(self) -> tuple[str, ...]:
        """Keyword parameters the method accepts (beyond spec and target_length)."""
        sig = inspect.signature(self.function)
        return tuple(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Add (or replace) a method under `method.name`."""
    METHODS[method.name] = method


for _m in [
    Method("none", none, "no scaling: positions past L extrapolate", "—"),
    Method("pi", linear, "linear position interpolation: every θ_i / s", "Chen et al. 2023", "linear"),
    Method("ntk", ntk, "NTK-aware base change b·α^(d/(d−2))", "bloc97 2023"),
    Method("dynamic-ntk", dynamic_ntk, "NTK base recomputed for the current length", "emozilla 2023", "dynamic"),
    Method("yarn", yarn,
           "ramp between interpolation and extrapolation + attention factor", "Peng et al. 2023", "yarn"),
    Method("llama3", llama3, "Llama 3.1 wavelength-banded interpolation", "Meta 2024", "llama3"),
    Method("longrope", longrope, "user-given per-pair factors (searched by LongRoPE)", "Ding et al. 2024",
           "longrope", needs_factors=True),
    Method("base", base_change, "RoPE base change (ABF); base from the critical dimension or Men et al.",
           "Liu et al. 2023; Men et al. 2024"),
    Method("resonance", resonance, "round wavelengths to integers after another method", "Wang et al. 2024"),
    Method("dprope", dprope, "per-pair interpolate/extrapolate by least angle-distribution disturbance",
           "Wu et al. 2024"),
    Method("dprope-opt", dprope_opt, "per-pair factor in [1, s] of least angle-distribution disturbance (1-D search)",
           "ropekit; criterion of Wu et al. 2024", in_default_comparison=False),
]:
    register_method(_m)

ALIASES = {"linear": "pi", "dynamic": "dynamic-ntk", "ntk-aware": "ntk", "abf": "base", "distributional": "dprope"}


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
    return m.function(spec, target_length, **params)


def plan(spec: RopeSpec, target_length: int, method: str = "dprope", *, bins: int = 360, **params: Any) -> Plan:
    """Plan a context extension of `spec` to `target_length` tokens with `method`.

    Method parameters go as keywords (e.g. `threshold=0.0`, `beta_fast=32`); `bins` is the
    histogram resolution K used for disturbance scores (and by dprope itself).

    >>> p = plan(RopeSpec(head_dim=8, base=10000.0, original_length=512), 2048, "pi")
    >>> p.factors, p.scale
    ((4.0, 4.0, 4.0, 4.0), 4.0)
    """
    check_target_length(spec, target_length)
    m = get_method(method)
    if "bins" in m.parameters:  # methods that choose by disturbance use the same K
        params = {"bins": bins, **params}
    scaling = compute_scaling(m.name, spec, target_length, **params)
    return Plan(method=m.name, spec=spec, target_length=target_length, params=params, scaling=scaling, bins=bins)


def check_target_length(spec: RopeSpec, target_length: int) -> None:
    if isinstance(target_length, bool) or not isinstance(target_length, int):
        raise RopekitError(f"target length must be an integer number of tokens, got {target_length!r}")
    if target_length <= spec.original_length:
        raise RopekitError(
            f"target length {target_length} must exceed the original length {spec.original_length}"
        )


def comparable_methods() -> list[str]:
    """Methods that run from the geometry alone (longrope needs searched factors), minus slow searches (dprope-opt)."""
    return [name for name, m in METHODS.items() if not m.needs_factors and m.in_default_comparison]


def compare(spec: RopeSpec, target_length: int, methods: list[str] | None = None, *, bins: int = 360) -> dict[str, Plan]:
    """Plan every method (default: all that need no extra input) with default parameters."""
    names = methods or comparable_methods()
    return {get_method(n).name: plan(spec, target_length, n, bins=bins) for n in names}
