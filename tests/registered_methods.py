"""Every registered method, with what it needs to run from a geometry alone, for tests parametrised over
`ropekit.METHODS` (a new method is covered without editing a list)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

import ropekit

REGISTERED = sorted(ropekit.METHODS)  # the built-in methods, as registered when the tests are collected
NATIVE = [name for name in REGISTERED if ropekit.METHODS[name].native is not None]


def method_params(name: str, spec: ropekit.RopeSpec, target_length: int) -> dict[str, Any]:
    """{} for most methods; per-pair factors in [1, s] (seeded) for one that needs user-given factors (longrope)."""
    if not ropekit.get_method(name).needs_factors:
        return {}
    scale = target_length / spec.context_length
    draw = torch.rand(spec.num_pairs, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {"factors": (1.0 + draw * (scale - 1)).tolist()}


@lru_cache(maxsize=64)  # plans are immutable; several tests read the same one (dprope-opt searches)
def make_plan(spec: ropekit.RopeSpec, target_length: int, name: str) -> ropekit.Plan:
    return ropekit.make_plan(spec, target_length, name, **method_params(name, spec, target_length))
