"""Closed-form properties of each method, against formulas written out in the test."""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from ropekit import RopekitError, RopeSpec

LLAMA2 = RopeSpec(head_dim=128, base=10000.0, context_length=4096, name="llama2")


def test_scale_one_longrope_is_identity():
    spec = RopeSpec(head_dim=64, base=10000.0, context_length=1024)
    plan = ropekit.make_plan(spec, 2048, "longrope", factors=[1.0] * 32, attention_factor=1.0)
    assert torch.equal(plan.inv_freq, spec.inv_freq())


def test_pi_divides_every_pair_by_scale():
    plan = ropekit.make_plan(LLAMA2, 16384, "pi")
    assert plan.factors == (4.0,) * 64 and plan.attention_factor == 1.0
    assert torch.equal(plan.inv_freq, LLAMA2.inv_freq() / 4)


def test_ntk_closed_form():
    plan = ropekit.make_plan(LLAMA2, 16384, "ntk")
    new_base = 10000.0 * 4 ** (128 / 126)
    assert plan.scaling.details["new_base"] == pytest.approx(new_base, rel=1e-15)
    i = torch.arange(64, dtype=torch.float64)
    assert list(plan.factors) == pytest.approx(((new_base / 10000.0) ** (2 * i / 128)).tolist(), rel=1e-12)
    assert plan.factors[0] == 1.0
    # the lowest pair's wavelength grows by exactly α^((d-2)/(d-2)) = α
    assert plan.factors[-1] == pytest.approx(4.0, rel=1e-12)


def test_yarn_and_llama3_keep_high_frequencies_and_interpolate_low_ones():
    for method in ("yarn", "llama3"):
        plan = ropekit.make_plan(LLAMA2, 32768, method)
        assert plan.factors[0] == pytest.approx(1.0) and plan.factors[-1] == pytest.approx(8.0)
        assert all(a <= b + 1e-9 for a, b in zip(plan.factors, plan.factors[1:]))  # monotone
    assert ropekit.make_plan(LLAMA2, 32768, "yarn").attention_factor == pytest.approx(0.1 * math.log(8) + 1)


def test_longrope_default_attention_factor():
    plan = ropekit.make_plan(LLAMA2, 16384, "longrope", factors=[2.0] * 64)
    assert plan.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(4096)))


def test_base_change_critical_rule_gives_target_bound():
    plan = ropekit.make_plan(LLAMA2, 16384, "base")
    new_base = plan.scaling.details["new_base"]
    assert new_base == pytest.approx((16384 / (2 * math.pi)) ** (128 / 92), rel=1e-12)
    assert ropekit.extrapolation_bound(LLAMA2, new_base) == pytest.approx(16384, rel=1e-12)
    assert torch.equal(plan.inv_freq, LLAMA2.inv_freq(new_base))


def test_base_change_explicit_base():
    plan = ropekit.make_plan(LLAMA2, 16384, "base", new_base=500000.0)
    assert plan.factors[-1] == pytest.approx(50 ** (126 / 128), rel=1e-12)


def test_resonance_wavelengths_are_integers():
    plan = ropekit.make_plan(LLAMA2, 16384, "resonance", inner="pi")
    wavelengths = 2 * math.pi / plan.inv_freq.double()
    assert torch.allclose(wavelengths, wavelengths.round(), rtol=1e-5)
    assert (
        ropekit.make_plan(LLAMA2, 16384, "resonance").attention_factor
        == ropekit.make_plan(LLAMA2, 16384, "yarn").attention_factor
    )


def test_critical_dimension_llama2_is_92():
    # 2·⌈64·ln(4096/2π)/ln(10000)⌉ = 2·⌈45.03⌉ = 92
    assert ropekit.critical_dimension(LLAMA2) == 92
    # brute force: the first pair whose wavelength 2π·b^(2i/d) exceeds the trained length is i = 46
    first_long = next(i for i in range(64) if 2 * math.pi * 10000.0 ** (2 * i / 128) > 4096)
    assert 2 * first_long == 92


def test_base_for_bound_inverts_extrapolation_bound():
    for bound in (8192, 65536, 1_000_000):
        assert ropekit.extrapolation_bound(LLAMA2, ropekit.base_for_bound(LLAMA2, bound)) == pytest.approx(bound)


def naive_min_b(rotary_dim: int, base: float, length: int) -> float:
    """Σ_i cos(m·θ_i) minimised with a plain Python loop."""
    thetas = [base ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)]
    return min(sum(math.cos(m * t) for t in thetas) for m in range(length))


def _grid(k: int, resolution: float) -> float:
    return 2.0 * (1.0 + resolution) ** k


@pytest.mark.slow
def test_min_base_smallest_and_all_above_match_a_brute_force_scan():
    """Every grid base 2·1.01^k checked with the naive loop: first pass, and the point after the last failure."""
    spec = RopeSpec(head_dim=32, base=10000.0, context_length=64)
    passes = [naive_min_b(32, _grid(k, 1e-2), 256) >= 0 for k in range(1030)]  # up to b ≈ 5.7e4
    assert all(passes[-150:])  # the scan reaches well into the all-passing region
    first_pass = passes.index(True)
    last_fail = max(k for k, ok in enumerate(passes) if not ok)
    assert last_fail > first_pass  # the passing set is not an interval: bisection is unsafe here
    assert ropekit.min_base_for_length(spec, 256, resolution=1e-2) == pytest.approx(_grid(first_pass, 1e-2))
    assert ropekit.min_base_for_length(spec, 256, rule="all-above", resolution=1e-2) == pytest.approx(
        _grid(last_fail + 1, 1e-2)
    )


@pytest.mark.slow
def test_min_base_llama_head_at_1024_is_the_true_smallest():
    """d = 128, L' = 1,024: the smallest passing base is ≈ 4,296, well below the ≈ 6,022 a bisection finds."""
    spec = RopeSpec(head_dim=128, base=10000.0, context_length=4096)
    smallest = ropekit.min_base_for_length(spec, 1024)
    assert 4290 < smallest < 4300
    assert naive_min_b(128, smallest, 1024) >= 0 and naive_min_b(128, smallest / 1.001, 1024) < 0
    assert naive_min_b(128, 5000.0, 1024) < 0  # a larger base fails: the passing set is no interval


def test_min_base_rejects_bad_settings():
    spec = RopeSpec(head_dim=16, base=10000.0, context_length=64)
    with pytest.raises(RopekitError, match="rule must be one of"):
        ropekit.min_base_for_length(spec, 100, rule="bisect")
    with pytest.raises(RopekitError, match="resolution"):
        ropekit.min_base_for_length(spec, 100, resolution=0)


@pytest.mark.parametrize(
    "bad",
    [
        dict(head_dim=127, base=10000.0, context_length=4096),
        dict(head_dim=128, base=float("nan"), context_length=4096),
        dict(head_dim=128, base=float("inf"), context_length=4096),
        dict(head_dim=128, base=10000.0, context_length=0),
        dict(head_dim=128, base=10000.0, context_length=4096, partial_rotary_factor=1.5),
    ],
)
def test_bad_geometry_is_refused(bad):
    with pytest.raises(RopekitError):
        RopeSpec(**bad)


def test_bad_plans_are_refused():
    with pytest.raises(RopekitError, match="must exceed"):
        ropekit.make_plan(LLAMA2, 4096, "pi")
    with pytest.raises(RopekitError, match="did you mean 'yarn'"):
        ropekit.make_plan(LLAMA2, 8192, "yarm")
    with pytest.raises(RopekitError, match="64 rotary pairs"):
        ropekit.make_plan(LLAMA2, 8192, "longrope", factors=[1.0] * 63)
    with pytest.raises(RopekitError, match="does not take 'alpha'"):
        ropekit.make_plan(LLAMA2, 8192, "pi", alpha=2.0)  # an option of another method
    with pytest.raises(RopekitError, match="ntk: alpha .--alpha. must be a number in .1, "):
        ropekit.make_plan(LLAMA2, 8192, "ntk", alpha=0.5)
