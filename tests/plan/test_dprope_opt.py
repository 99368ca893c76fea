"""dprope-opt (per-pair factor in [1, s] of least disturbance) against dprope and a brute-force search."""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from ropekit import RopekitError, RopeSpec
from ropekit.plan.analysis.disturbance import pair_disturbance
from ropekit.plan.methods.longrope import per_pair_inv_freq

GEOMETRIES = [  # (spec, target): SmolLM2-like, a small head, a non-integer scale, a large base
    (RopeSpec(head_dim=64, base=100000.0, context_length=2048), 8192),
    (RopeSpec(head_dim=32, base=10000.0, context_length=512), 1024),
    (RopeSpec(head_dim=16, base=500.0, context_length=300), 1000),
    (RopeSpec(head_dim=32, base=1e6, context_length=1024), 4096),
]


def disturbance_at(spec: RopeSpec, target: int, factor: float, bins: int = 360) -> torch.Tensor:
    """D_i for every pair with the same factor f: θ/f in float32 (the candidates' arithmetic), slow path."""
    inv_freq = spec.inv_freq() / torch.tensor(factor, dtype=torch.float32)
    return pair_disturbance(spec, inv_freq, target, bins=bins)


@pytest.mark.slow
@pytest.mark.parametrize("spec,target", GEOMETRIES)
def test_never_more_disturbed_than_dprope(spec, target):
    opt = ropekit.make_plan(spec, target, "dprope-opt")
    s = target / spec.context_length
    assert all(1.0 <= f <= s * (1 + 1e-6) for f in opt.factors)
    for params in [{}, {"threshold": 0.01}, {"interpolated_dims": spec.rotary_dim // 2}]:
        dp = ropekit.make_plan(spec, target, "dprope", **params)
        assert opt.disturbance <= dp.disturbance
        assert bool((opt.pair_disturbance <= dp.pair_disturbance).all())


@pytest.mark.slow
@pytest.mark.parametrize("spec,target", GEOMETRIES[1:])
def test_reported_disturbance_is_the_chosen_factors(spec, target):
    """Each pair's reported D equals D recomputed independently at its chosen factor."""
    opt = ropekit.make_plan(spec, target, "dprope-opt")
    for i, f in enumerate(opt.factors):
        assert opt.pair_disturbance[i].item() == pytest.approx(disturbance_at(spec, target, f)[i].item(), abs=1e-12)
    assert torch.equal(opt.inv_freq, per_pair_inv_freq(spec, opt.factors))


@pytest.mark.slow
@pytest.mark.parametrize("spec,target", GEOMETRIES[1:])
def test_grid_stage_equals_brute_force_over_the_same_grid(spec, target):
    """With no refinement the method is exactly the argmin over its log-spaced grid, pair by pair."""
    steps = 17
    s = target / spec.context_length
    grid = [1.0] + [math.exp(math.log(s) * k / (steps - 1)) for k in range(1, steps - 1)] + [s]
    table = torch.stack([disturbance_at(spec, target, f) for f in grid], dim=1)  # (pairs, steps)
    opt = ropekit.make_plan(spec, target, "dprope-opt", steps=steps, refine_rounds=0)
    best = table.min(dim=1)
    assert opt.pair_disturbance.tolist() == pytest.approx(best.values.tolist(), abs=1e-12)
    for i, f in enumerate(opt.factors):
        assert f == pytest.approx(grid[int(best.indices[i])], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("spec,target", GEOMETRIES[1:])
def test_default_search_beats_a_dense_brute_force_on_the_whole_method(spec, target):
    """A 257-point brute force in log f per pair does not find a lower whole-method disturbance.

    Per pair it can: D_i(f) of a high-frequency pair is rough in f (aliasing of θ·m mod 2π
    against the bins), so any finite search may miss a narrow dip; the module docstring says so.
    """
    s = target / spec.context_length
    grid = [math.exp(math.log(s) * k / 256) for k in range(257)]
    brute = torch.stack([disturbance_at(spec, target, f) for f in grid], dim=1).min(dim=1).values
    assert ropekit.make_plan(spec, target, "dprope-opt").disturbance <= 1000 * float(brute.mean())


@pytest.mark.slow
@pytest.mark.parametrize("spec,target", GEOMETRIES[1:])
def test_refinement_never_raises_a_pair(spec, target):
    coarse = ropekit.make_plan(spec, target, "dprope-opt", refine_rounds=0)
    refined = ropekit.make_plan(spec, target, "dprope-opt", refine_rounds=2)
    assert bool((refined.pair_disturbance <= coarse.pair_disturbance).all())


def test_pairs_that_never_rotated_in_pretraining_interpolate_fully():
    """A pair whose wavelength exceeds L' sees one arc; only f = s reproduces the pre-training arc."""
    spec, target = GEOMETRIES[1]
    opt = ropekit.make_plan(spec, target, "dprope-opt")
    longest = int(torch.argmax(spec.wavelengths()))
    assert float(spec.wavelengths()[longest]) > target
    assert opt.factors[longest] == pytest.approx(target / spec.context_length, rel=1e-2)  # bin edges: not exact


@pytest.mark.parametrize("params", [{"steps": 2}, {"refine_rounds": -1}, {"bins": 1}])
def test_bad_parameters_are_refused(params):
    spec, target = GEOMETRIES[1]
    with pytest.raises(RopekitError):
        ropekit.make_plan(spec, target, "dprope-opt", **params)


def test_left_out_of_the_default_comparison_but_comparable_by_name():
    spec, target = GEOMETRIES[1]
    assert "dprope-opt" not in ropekit.compare(spec, target)
    both = ropekit.compare(spec, target, ["dprope", "dprope-opt"])
    assert both["dprope-opt"].disturbance <= both["dprope"].disturbance
