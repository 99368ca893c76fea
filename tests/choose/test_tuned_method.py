"""The `tuned` method: factors from a study directory, refused for another geometry or target."""

from __future__ import annotations

import json

import pytest
import torch

import ropekit
from ropekit.apply.export import transformers_config
from ropekit.errors import RopekitError
from ropekit.plan.methods.tuned import read_study

SPEC = ropekit.RopeSpec(head_dim=16, base=10000.0, context_length=64)
FACTORS = [1.0, 1.0, 1.0, 1.5, 2.0, 4.0, 4.0, 4.0]


def study_dir(tmp_path, **changes):
    block = {
        "factors": FACTORS,
        "attention_factor": 1.1,
        "target_length": 256,
        "geometry": {"head_dim": 16, "rotary_dim": 16, "rope_theta": 10000.0, "original_length": 64},
        "provenance": {"model_sha256": "abc"},
    } | changes
    (tmp_path / "plan.json").write_text(json.dumps({"written_by": "ropekit", "tuned": block}))
    return tmp_path


def test_a_study_plan_is_its_factors_and_attention_factor_exactly(tmp_path):
    plan = ropekit.make_plan(SPEC, 256, "tuned", study=read_study(study_dir(tmp_path)))
    shape = torch.arange(0, 16, 2, dtype=torch.int64).float() / 16
    assert torch.equal(plan.inv_freq, 1.0 / (torch.tensor(FACTORS) * 10000.0**shape))  # transformers' longrope
    assert plan.factors == tuple(FACTORS) and plan.attention_factor == 1.1
    block = transformers_config(plan)["rope_parameters"]
    assert block["long_factor"] == FACTORS == block["short_factor"]
    assert block["attention_factor"] == 1.1
    with pytest.raises(RopekitError, match="no native transformers form"):
        transformers_config(plan, native=True)


@pytest.mark.parametrize(
    ("changes", "target", "message"),
    [
        ({}, 512, "made for target length 256, not 512"),
        (
            {"geometry": {"head_dim": 32, "rotary_dim": 32, "rope_theta": 1e4, "original_length": 64}},
            256,
            "head_dim 32",
        ),
        ({"geometry": {"head_dim": 16, "rotary_dim": 16, "rope_theta": 5e5, "original_length": 64}}, 256, "rope_theta"),
    ],
)
def test_a_study_for_another_geometry_or_target_is_refused(tmp_path, changes, target, message):
    with pytest.raises(RopekitError, match=message):
        ropekit.make_plan(SPEC, target, "tuned", study=read_study(study_dir(tmp_path, **changes)))


def test_bad_study_directories_and_arguments_are_refused(tmp_path):
    with pytest.raises(RopekitError, match="no plan.json here"):
        read_study(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps({"written_by": "ropekit", "method": "dprope"}))
    with pytest.raises(RopekitError, match="not written by `ropekit tune`"):
        read_study(tmp_path)
    with pytest.raises(RopekitError, match="needs a tuning study"):
        ropekit.make_plan(SPEC, 256, "tuned")
    with pytest.raises(RopekitError, match="either a tuning study or factors"):
        ropekit.make_plan(SPEC, 256, "tuned", factors=FACTORS, study={"factors": FACTORS})
