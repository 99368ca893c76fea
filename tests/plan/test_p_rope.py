"""p-RoPE (Barbero et al. 2024) and plans over a model whose tail pairs do not rotate.

References: inv_freq written out by hand for a small head_dim; YaRN's own plan for the kept pairs (composition);
the plain geometry's per-pair disturbance for the pairs a model rotates.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import ropekit
from ropekit.plan.analysis.bounds import extrapolation_bound
from ropekit.plan.scaling import ROTATION_REMOVED

SPEC = ropekit.RopeSpec(head_dim=12, base=10000.0, context_length=256)  # 6 pairs


def test_p_rope_keeps_the_highest_frequencies_against_a_literal_reference():
    plan = ropekit.make_plan(SPEC, 1024, "p-rope", p=0.5)
    # θ_i = 10000^(−2i/12) for the 3 kept pairs, 0 for the lowest three
    literal = torch.tensor([1.0, 0.21544346900318834, 0.046415888336127774, 0.0, 0.0, 0.0])
    assert torch.allclose(plan.inv_freq.double(), literal.double(), rtol=1e-7, atol=0)
    assert plan.inv_freq[3:].eq(0).all()
    assert plan.factors == (1.0, 1.0, 1.0, ROTATION_REMOVED, ROTATION_REMOVED, ROTATION_REMOVED)
    assert plan.removed_pairs == [3, 4, 5] and plan.interpolated_pairs == [] and plan.attention_factor == 1.0


@pytest.mark.parametrize(("head_dim", "p", "kept"), [(12, 0.75, 4), (12, 1.0, 6), (200, 0.29, 29), (16, 0.3, 2)])
def test_p_rounds_down_to_whole_pairs(head_dim, p, kept):
    spec = ropekit.RopeSpec(head_dim=head_dim, base=10000.0, context_length=256)
    plan = ropekit.make_plan(spec, 1024, "p-rope", p=p)
    assert plan.removed_pairs == list(range(kept, head_dim // 2))


def test_p_that_keeps_no_pair_is_refused_in_one_line():
    with pytest.raises(ropekit.RopekitError, match="keeps none; give p ≥ 0.1667"):
        ropekit.make_plan(SPEC, 1024, "p-rope", p=0.1)
    with pytest.raises(ropekit.RopekitError, match=r"p-rope: p \(--p\) must be a number in \(0, 1\]"):
        ropekit.make_plan(SPEC, 1024, "p-rope", p=1.5)


def test_p_rope_composes_with_the_method_it_wraps():
    yarn = ropekit.make_plan(SPEC, 1024, "yarn")
    both = ropekit.make_plan(SPEC, 1024, "p-rope", p=0.5, inner="yarn")
    assert torch.equal(both.inv_freq[:3], yarn.inv_freq[:3]) and both.factors[:3] == yarn.factors[:3]
    assert both.removed_pairs == [3, 4, 5] and both.attention_factor == yarn.attention_factor
    # a plan that removes pairs counts their collapsed angles: more disturbance than keeping them
    assert both.disturbance > yarn.disturbance


def test_a_model_with_removed_pairs_is_planned_on_its_rotating_pairs_only():
    plain = ropekit.RopeSpec(head_dim=16, base=10000.0, context_length=256)
    gemma4_like = ropekit.RopeSpec(head_dim=16, base=10000.0, context_length=256, removed_pairs=[4, 5, 6, 7])
    for method in ("pi", "yarn", "dprope", "llama3", "ntk"):
        on_all = ropekit.make_plan(plain, 1024, method)
        removed = ropekit.make_plan(gemma4_like, 1024, method)
        assert torch.equal(removed.inv_freq[:4], on_all.inv_freq[:4]) and not removed.inv_freq[4:].any(), method
        assert removed.removed_pairs == [4, 5, 6, 7] and removed.interpolated_pairs == [
            i for i in on_all.interpolated_pairs if i < 4
        ]
        # the disturbance is the mean over the rotating pairs of the same per-pair values
        assert removed.disturbance == pytest.approx(1000 * float(on_all.pair_disturbance[:4].mean()), rel=1e-12)
        assert removed.pair_disturbance[4:].eq(0).all()
    # p-rope on such a model keeps ⌊p·n⌋ of its n rotating pairs
    assert ropekit.make_plan(gemma4_like, 1024, "p-rope", p=0.5).removed_pairs == [2, 3, 4, 5, 6, 7]


def test_dprope_counts_interpolated_dims_among_the_rotating_pairs():
    spec = ropekit.RopeSpec(head_dim=16, base=10000.0, context_length=256, removed_pairs=[4, 5, 6, 7])
    plan = ropekit.make_plan(spec, 1024, "dprope", interpolated_dims=8)
    assert plan.interpolated_pairs == [0, 1, 2, 3]
    with pytest.raises(ropekit.RopekitError, match=r"in \[0, 8\]"):
        ropekit.make_plan(spec, 1024, "dprope", interpolated_dims=10)


def test_removed_pairs_do_not_bound_extrapolation():
    # base 10000 at 256 tokens: pairs ≥ 2 never complete a turn; remove them and nothing bounds extrapolation
    spec = ropekit.RopeSpec(head_dim=16, base=10000.0, context_length=256)
    assert math.isfinite(extrapolation_bound(spec))
    assert extrapolation_bound(ropekit.RopeSpec(**_geometry(spec), removed_pairs=range(2, 8))) == math.inf


def _geometry(spec: ropekit.RopeSpec) -> dict:
    return {"head_dim": spec.head_dim, "base": spec.base, "context_length": spec.context_length}


def test_removed_pairs_are_validated():
    with pytest.raises(ropekit.RopekitError, match="pair indices in 0 … 7"):
        ropekit.RopeSpec(head_dim=16, base=10000.0, context_length=256, removed_pairs=[8])
    with pytest.raises(ropekit.RopekitError, match="at least one pair must rotate"):
        ropekit.RopeSpec(head_dim=16, base=10000.0, context_length=256, removed_pairs=range(8))


def test_cli_plans_p_rope_and_writes_the_forms_that_carry_it(tmp_path):
    from typer.testing import CliRunner

    from ropekit.cli.main import app

    args = ["plan", "--preset", "llama2-7b", "--target-length", "8192", "--method", "p-rope", "--p", "0.5"]
    r = CliRunner().invoke(app, [*args, "--json", "--no-write"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["removed_pairs"] == list(range(32, 64)) and summary["factors"][32:] == [None] * 32
    r = CliRunner().invoke(app, [*args, "--inner", "pi", "--out", str(tmp_path / "plan")])
    assert r.exit_code == 0, r.stderr
    block = json.loads((tmp_path / "plan" / "transformers_v5.json").read_text())["rope_parameters"]
    assert block == {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 2.0, "rope_theta": 10000.0}
    refused = json.loads((tmp_path / "plan" / "exports_refused.json").read_text())
    assert "ignores `factor`" in refused["vllm_hf_overrides"]
