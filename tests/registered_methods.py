"""Every registered method, with what it needs to run from a geometry alone, for tests parametrised over
`ropekit.METHODS` (a new method is covered without editing a list)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest
import torch

import ropekit


def _params(names: list[str]) -> list[Any]:
    """Method names for parametrize; a slow search (not in the default comparison, e.g. dprope-opt) runs in
    the full suite only, so the fast loop stays fast."""
    return [n if ropekit.METHODS[n].in_default_comparison else pytest.param(n, marks=pytest.mark.slow) for n in names]


# the built-in methods, as registered when the tests are collected
REGISTERED = _params(sorted(ropekit.METHODS))
NATIVE = _params(sorted(name for name, m in ropekit.METHODS.items() if m.native is not None))


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
