"""The distributional method against independent references and the paper's own numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ropekit
from ropekit import RopekitError, RopeSpec
from ropekit.plan.analysis.angles import EPSILON, angle_counts, angle_counts_literal

LLAMA2 = RopeSpec.from_preset("llama2-7b")


def slow_kl(p_counts, q_counts, n_p, n_q):
    """Σ_k P ln(P/Q) with plain Python floats."""
    total = 0.0
    for cp, cq in zip(p_counts, q_counts):
        p, q = (cp + EPSILON) / n_p, (cq + EPSILON) / n_q
        total += p * math.log(p / q)
    return total


def slow_dprope(spec: RopeSpec, target: int, bins: int = 360):
    """The reference recipe step by step: literal histograms, KL per pair, choose per pair."""
    s = target / spec.context_length
    theta = spec.inv_freq()
    p = angle_counts_literal(theta, spec.context_length, bins).tolist()
    q_extra = angle_counts_literal(theta, target, bins).tolist()
    q_interp = angle_counts_literal(theta / s, target, bins).tolist()
    factors, chosen = [], []
    for i in range(spec.num_pairs):
        d_e = slow_kl(p[i], q_extra[i], spec.context_length, target)
        d_i = slow_kl(p[i], q_interp[i], spec.context_length, target)
        factors.append(s if d_e - d_i > 0 else 1.0)
        chosen.append(d_i if d_e - d_i > 0 else d_e)
    return factors, 1000 * sum(chosen) / len(chosen)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,target",
    [
        (RopeSpec(head_dim=16, base=10000.0, context_length=256), 1024),
        (RopeSpec(head_dim=24, base=500.0, context_length=300), 750),
    ],
)
def test_dprope_equals_slow_reference(spec, target):
    factors, disturbance = slow_dprope(spec, target)
    plan = ropekit.make_plan(spec, target, "dprope")
    assert list(plan.factors) == factors
    assert plan.disturbance == pytest.approx(disturbance, rel=1e-12)


def numpy_counts(inv_freq: np.ndarray, length: int, bins: int) -> np.ndarray:
    """An independent float32 histogram in numpy (fmod by float32 2π, as torch.remainder does)."""
    positions = np.arange(length, dtype=np.int64).astype(np.float32)
    angles = np.fmod(inv_freq[:, None].astype(np.float32) * positions[None, :], np.float32(2 * math.pi))
    index = np.floor(np.float32(bins / (2 * math.pi)) * angles).astype(np.int64)
    return np.stack([np.bincount(row, minlength=bins) for row in index])


@pytest.mark.parametrize("scale", [2, 4])
def test_llama2_counts_equal_numpy_reference(scale):
    theta = LLAMA2.inv_freq()
    n = 4096 * scale
    for freqs in (theta, theta / scale):
        assert np.array_equal(angle_counts(freqs, n).numpy(), numpy_counts(freqs.numpy(), n, 360))


@pytest.mark.parametrize("target,reduction", [(8192, 72), (16384, 32)])
def test_paper_reduction_versus_pi(target, reduction):
    """Wu et al. 2024 abstract: disturbance reduced 'by up to 72%' (LLaMA2 → 8k) and '32%' (→ 16k)."""
    dp = ropekit.make_plan(LLAMA2, target, "dprope").disturbance
    pi = ropekit.make_plan(LLAMA2, target, "pi").disturbance
    assert round(100 * (1 - dp / pi)) == reduction


def test_dprope_is_per_pair_minimum_of_pi_and_none():
    plan = ropekit.make_plan(LLAMA2, 16384, "dprope")
    pi = ropekit.make_plan(LLAMA2, 16384, "pi").pair_disturbance
    none = ropekit.make_plan(LLAMA2, 16384, "none").pair_disturbance
    assert torch.allclose(plan.pair_disturbance, torch.minimum(pi, none), rtol=0, atol=0)
    assert set(plan.factors) <= {1.0, 4.0}


def test_interpolated_dims_picks_largest_margins():
    full = ropekit.make_plan(LLAMA2, 16384, "dprope")
    margin = torch.tensor(full.scaling.details["margin"])
    for n in (0, 20, 64, 128):
        plan = ropekit.make_plan(LLAMA2, 16384, "dprope", interpolated_dims=n)
        chosen = plan.interpolated_pairs
        assert len(chosen) == n // 2
        if 0 < n < 128:
            others = [i for i in range(64) if i not in chosen]
            assert margin[chosen].min() >= margin[others].max()


def test_threshold_extremes():
    assert ropekit.make_plan(LLAMA2, 16384, "dprope", threshold=1e9).interpolated_pairs == []
    assert len(ropekit.make_plan(LLAMA2, 16384, "dprope", threshold=-1e9).interpolated_pairs) == 64


def test_bad_dprope_options():
    with pytest.raises(RopekitError, match="not both"):
        ropekit.make_plan(LLAMA2, 8192, "dprope", threshold=0.0, interpolated_dims=4)
    with pytest.raises(RopekitError, match="even"):
        ropekit.make_plan(LLAMA2, 8192, "dprope", interpolated_dims=3)
    with pytest.raises(RopekitError, match="finite"):
        ropekit.make_plan(LLAMA2, 8192, "dprope", threshold=float("nan"))


def test_paper_setting_for_llama2_and_both_in_compare():
    """Wu et al. 2024 interpolate n = 80 dims at 8k and 64 at 16k on LLaMA-2; the t = 0 argmin picks 94 and 84."""
    import json

    from typer.testing import CliRunner

    from ropekit.cli.main import app
    from ropekit.plan.methods.dprope import paper_interpolated_dims

    spec = ropekit.RopeSpec.from_preset("llama2-7b")
    assert paper_interpolated_dims(spec, 8192) == 80 and paper_interpolated_dims(spec, 16384) == 64
    assert (
        paper_interpolated_dims(spec, 32768) is None
        and paper_interpolated_dims(ropekit.RopeSpec.from_preset("llama3-8b"), 16384) is None
    )
    assert 2 * len(ropekit.make_plan(spec, 8192, "dprope").interpolated_pairs) == 94
    assert 2 * len(ropekit.make_plan(spec, 16384, "dprope").interpolated_pairs) == 84
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "plan",
            "--preset",
            "llama2-7b",
            "--target-length",
            "16384",
            "--paper-setting",
            "--json",
            "--compare",
            "--no-write",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    scores = summary["disturbance_by_method"]
    assert scores["dprope"] < scores["dprope (paper, n=64)"]  # the argmin disturbs less, by construction
    assert scores["dprope (paper, n=64)"] == pytest.approx(
        ropekit.make_plan(spec, 16384, "dprope", interpolated_dims=64).disturbance
    )
    bad = runner.invoke(
        app, ["plan", "--preset", "llama2-7b", "--target-length", "32768", "--paper-setting", "--no-write"]
    )
    assert bad.exit_code == 2 and "paper's setting exists" in bad.output
