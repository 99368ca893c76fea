"""The table of registered methods: name → `Method` record, and running one method by name.

It sits inside `ropekit.plan.methods` so that a method which wraps another (resonance) can look
the other up without importing `ropekit.plan.registry`, which imports every method module.
"""

from __future__ import annotations

import inspect
import numbers
import types
import typing
from collections.abc import Sequence
from typing import Any

from ropekit.errors import RopekitError, did_you_mean
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods.record import Method
from ropekit.plan.scaling import Scaling

METHODS: dict[str, Method] = {}
ALIASES: dict[str, str] = {}  # other name → method name, from the records' `aliases`


def register_method(method: Method, *, replace: bool = False) -> None:
    """Add a method under `method.name` (and its aliases). A name or alias already taken is refused
    unless `replace=True` (which replaces the method of that name)."""
    if not isinstance(method, Method):
        raise RopekitError(f"register_method takes a ropekit.plan.registry.Method record, got {method!r}")
    taken = [n for n in (method.name, *method.aliases) if n.lower() in METHODS or n.lower() in ALIASES]
    owners = {ALIASES.get(n.lower(), n.lower()) for n in taken}
    if taken and not (replace and owners == {method.name}):
        raise RopekitError(
            f"method name {taken[0]!r} is already registered (by {sorted(owners)[0]!r}); choose another name, "
            "or register_method(record, replace=True) to replace that method"
        )
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


def get_method(name: str) -> Method:
    if not isinstance(name, str):
        raise RopekitError(f"method must be a method name (e.g. 'dprope'; see ropekit.METHODS), got {name!r}")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in METHODS:
        raise did_you_mean("method", name, METHODS)
    return METHODS[key]


def compute_scaling(method: str, spec: RopeSpec, target_length: int, **params: Any) -> Scaling:
    """Run one method function after checking its parameter names."""
    m = get_method(method)
    params = m.current_keywords(params)
    accepted = m.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(m.function).parameters.values())
    unknown = [k for k in params if k not in accepted]
    if unknown and not takes_any:
        allowed = ", ".join(accepted) or "no parameters"
        raise RopekitError(f"method {m.name!r} does not take {unknown[0]!r}; it takes: {allowed}")
    check_parameter_types(m, params)
    records = {p.name: p for p in m.params}
    for name, value in params.items():
        if name in records:
            records[name].check(m.name, value)
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
