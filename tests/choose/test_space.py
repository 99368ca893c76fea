"""Search families: YaRN and steps are exact ramp members; LongRoPE's constraint by running maximum."""

from __future__ import annotations

import math

import pytest

import ropekit
from ropekit.choose.space import SearchSpace, factor_name, ramp_factors, running_max
from ropekit.errors import RopekitError
from ropekit.eval.store import plan_fingerprint

GEOMETRIES = [
    (ropekit.RopeSpec(head_dim=64, base=1e5, context_length=8192), 16384),  # SmolLM2 at s = 2
    (ropekit.RopeSpec(head_dim=64, base=1e5, context_length=8192), 32768),
    (ropekit.RopeSpec(head_dim=128, base=1e4, context_length=4096), 16384),  # Llama 2 at s = 4
    (ropekit.RopeSpec(head_dim=16, base=1e4, context_length=64), 256),
]


@pytest.mark.parametrize(("spec", "target"), GEOMETRIES)
def test_yarn_pi_none_and_steps_are_ramp_members_bit_for_bit(spec, target):
    s = target / spec.context_length
    space = SearchSpace("ramp", spec.num_pairs, s, (1.0, 1.0 + 0.2 * math.log(s)))
    step = [1.0] * (spec.num_pairs - 5) + [s] * 5
    seeds = [ropekit.make_plan(spec, target, m) for m in ("yarn", "pi", "none")]
    seeds.append(ropekit.make_plan(spec, target, "tuned", factors=step))
    for plan in seeds:
        candidate = space.candidate(space.project(plan.factors, plan.attention_factor))
        rebuilt = ropekit.make_plan(
            spec, target, "tuned", factors=candidate.factors, attention_factor=candidate.attention_factor
        )
        assert candidate.factors == tuple(plan.factors), plan.method
        assert candidate.attention_factor == plan.attention_factor
        assert plan_fingerprint(rebuilt) == plan_fingerprint(plan)  # the screened cell is reused


def test_ramp_factors_follow_the_yarn_formula():
    """f_i = 1/((ramp_i)/s + 1 − ramp_i), ramp_i = clip((i − low)/(high − low), 0, 1), checked by hand."""
    s, low, width = 4.0, 2.5, 3.0
    factors = ramp_factors(8, low, width, s)
    for i, f in enumerate(factors):
        r = min(max((i - low) / width, 0.0), 1.0)
        assert f == pytest.approx(1.0 / (r / s + 1 - r), rel=1e-7)
    assert factors[:3] == (1.0, 1.0, 1.0) and factors[6:] == (4.0, 4.0)


def test_monotone_repairs_with_the_running_maximum_and_keeps_monotone_seeds():
    space = SearchSpace("monotone", 4, 2.0, (1.0, 1.2))
    params = {factor_name(i): f for i, f in enumerate([1.0, 1.5, 1.2, 2.0])} | {"attention_factor": 1.1}
    assert space.candidate(params).factors == (1.0, 1.5, 1.5, 2.0)
    assert running_max([3, 1, 2, 5, 4]) == (3, 3, 3, 5, 5)
    seed = (1.0, 1.25, 1.5, 2.0)
    assert space.candidate(space.project(seed, 1.05)).factors == seed
    free = SearchSpace("per-pair", 4, 2.0, (1.0, 1.2))
    assert free.candidate(params).factors == (1.0, 1.5, 1.2, 2.0)


def test_bounds_and_projection_clip_into_the_space():
    space = SearchSpace("per-pair", 3, 2.0, (1.0, 1.1))
    assert space.dimensions == 4
    params = space.project([0.5, 1.5, 2.5], 1.3)  # outside: clipped to [1, s] and the attention range
    assert [params[factor_name(i)] for i in range(3)] == [1.0, 1.5, 2.0]
    assert params["attention_factor"] == 1.1
    fixed = SearchSpace("ramp", 3, 2.0, (1.0, 1.0))  # a fixed attention factor is not a parameter
    assert set(fixed.bounds()) == {"ramp_start", "ramp_width"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "spline"}, "search family must be one of"),
        ({"scale": 1.0}, "scale s > 1"),
        ({"attention_range": (1.2, 1.0)}, "0 < LO ≤ HI"),
    ],
)
def test_bad_spaces_are_refused(kwargs, message):
    args = {"family": "ramp", "num_pairs": 4, "scale": 2.0, "attention_range": (1.0, 1.1)} | kwargs
    with pytest.raises(RopekitError, match=message):
        SearchSpace(**args)
