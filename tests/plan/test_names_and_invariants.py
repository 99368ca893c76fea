"""Names that mean one thing, the old names kept with a DeprecationWarning, and `Scaling`'s invariants.

A pair whose rotation is removed (θ' = 0, `ROTATION_REMOVED`) is represented explicitly: never counted
as interpolated, written as null (never `Infinity`) in JSON, and refused by every export in one line.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import ropekit
from ropekit.apply.export import llama_cpp_rope_freqs, transformers_config, vllm_hf_overrides, write_exports
from ropekit.plan.methods.linear import linear
from ropekit.plan.methods.record import Method
from ropekit.plan.scaling import ROTATION_REMOVED
from ropekit.plan.summary import plan_summary

SPEC = ropekit.RopeSpec(head_dim=16, base=10000.0, context_length=256)  # 8 pairs


# ---- two lengths, two names ----------------------------------------------------------------------


def test_plain_rope_has_one_length_under_both_names():
    assert SPEC.context_length == SPEC.pretrained_length == 256
    assert SPEC.with_context_length(512).pretrained_length == 512  # --original-length moves both


def test_an_extended_model_keeps_its_pretraining_length_apart():
    """Llama 3.1-style llama3 block: planned over 1024 tokens, exported with the pre-training 128."""
    from ropekit.apply.readers import spec_from_config_dict

    config = {
        "model_type": "llama",
        "head_dim": 16,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "max_position_embeddings": 1024,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    }
    spec = spec_from_config_dict(config, name="llama3-like")
    assert (spec.context_length, spec.pretrained_length) == (1024, 128)
    assert spec.with_context_length(2048).pretrained_length == 128
    plan = ropekit.make_plan(spec, 4096, "pi")
    assert plan.scale == 4096 / 1024
    block = transformers_config(plan)["rope_parameters"]
    assert block["original_max_position_embeddings"] == 128


def test_old_names_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="context_length"):
        old = ropekit.RopeSpec(head_dim=16, base=10000.0, original_length=256)
    assert old == SPEC
    with pytest.warns(DeprecationWarning, match="context_length"):
        assert SPEC.original_length == 256
    plan = ropekit.make_plan(SPEC, 1024, "pi")
    with pytest.warns(DeprecationWarning, match="pretrained_length"):
        assert plan.export_original_length == 256
    with pytest.raises(ropekit.RopekitError, match="not both"), pytest.warns(DeprecationWarning):
        ropekit.RopeSpec(head_dim=16, base=10000.0, context_length=256, original_length=512)


@pytest.mark.parametrize("method", [name for name, m in ropekit.METHODS.items() if m.renamed_keywords])
def test_the_scalar_scale_is_scale_and_the_old_factor_keyword_warns(method):
    new = ropekit.make_plan(SPEC, 1024, method, scale=3.0)
    with pytest.warns(DeprecationWarning, match="'factor' is deprecated, use 'scale'"):
        old = ropekit.make_plan(SPEC, 1024, method, factor=3.0)
    assert old.scaling == new.scaling and old.params == new.params and "scale" in new.params
    assert "factor" not in ropekit.get_method(method).parameters  # the signature the CLI reads has the new name


def test_the_renamed_keyword_covers_pi_yarn_llama3_and_dynamic_ntk_and_direct_calls():
    assert {n for n, m in ropekit.METHODS.items() if m.renamed_keywords} == {"pi", "yarn", "llama3", "dynamic-ntk"}
    with pytest.warns(DeprecationWarning):
        assert linear(SPEC, 1024, factor=2.0) == linear(SPEC, 1024, scale=2.0)


def test_moved_modules_and_functions_still_import_with_a_warning():
    import importlib
    import sys

    sys.modules.pop("ropekit.apply.atomic", None)
    with pytest.warns(DeprecationWarning, match="ropekit.output"):
        atomic = importlib.import_module("ropekit.apply.atomic")
    from ropekit import output

    assert atomic.prepare_output is output.prepare_output
    from ropekit.apply import readers

    with pytest.warns(DeprecationWarning, match="ropekit.apply.readers"):
        from ropekit.plan.geometry import load_config_dict
    assert load_config_dict is readers.load_config_dict
    with pytest.warns(DeprecationWarning, match="SUPPORTED_MODEL_TYPES"):
        from ropekit.apply.patch import SUPPORTED_FAMILIES
    assert SUPPORTED_FAMILIES == readers.SUPPORTED_MODEL_TYPES and "gemma3_text" in SUPPORTED_FAMILIES


# ---- Scaling's invariants ------------------------------------------------------------------------


def _inv(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(inv_freq=_inv([1.0, 0.1]), factors=(1.0,)), "1 factors for 2 frequencies"),
        (dict(inv_freq=_inv([1.0, 0.1]), factors=(1.0, float("nan"))), "pair 1: factor f_i must be finite"),
        (dict(inv_freq=_inv([1.0, 0.1]), factors=(1.0, -2.0)), "pair 1: factor f_i must be finite and > 0"),
        (dict(inv_freq=_inv([1.0, 0.1]), factors=(1.0, math.inf)), "pair 1: factor ∞ .* needs inv_freq 0"),
        (dict(inv_freq=_inv([1.0, 0.0]), factors=(1.0, 1.0)), "pair 1: inv_freq 0 means its rotation is removed"),
        (dict(inv_freq=_inv([1.0, float("inf")]), factors=(1.0, 1.0)), "pair 1: inv_freq must be finite"),
        (dict(inv_freq=_inv([1.0, 0.1]), factors=(1.0, 1.0), attention_factor=0.0), "attention factor must be"),
        (dict(inv_freq=_inv([1.0, 0.1]), factors=(1.0, 1.0), attention_factor=math.nan), "attention factor must be"),
        (dict(inv_freq=_inv([[1.0, 0.1]]), factors=(1.0, 1.0)), "1-D tensor"),
    ],
)
def test_scaling_refuses_a_broken_invariant_in_one_line(kwargs, message):
    with pytest.raises(ropekit.RopekitError, match=message) as info:
        ropekit.Scaling(**kwargs)
    assert "\n" not in str(info.value)


def _constant(factors: tuple[float, ...]) -> Method:
    """A method that returns fixed factors (for the checks `make_plan` adds on top of Scaling's own)."""

    def fixed(spec: ropekit.RopeSpec, target_length: int) -> ropekit.Scaling:
        inv = spec.inv_freq()[: len(factors)] / torch.tensor(factors, dtype=torch.float32)
        return ropekit.Scaling(inv_freq=inv, factors=factors)

    return Method("fixed", fixed, "fixed factors", "test")


def test_make_plan_refuses_a_method_that_returns_the_wrong_number_of_pairs():
    ropekit.register_method(_constant((1.0,) * 4))  # SPEC has 8 pairs
    try:
        with pytest.raises(ropekit.RopekitError, match="returned 4 per-pair factors; this geometry has 8 pairs"):
            ropekit.make_plan(SPEC, 1024, "fixed")
    finally:
        ropekit.unregister_method("fixed")


# ---- a pair whose rotation is removed ------------------------------------------------------------


def remove_last_pairs(spec: ropekit.RopeSpec, target_length: int, *, count: int = 2) -> ropekit.Scaling:
    """p-RoPE-style: the `count` lowest-frequency pairs stop rotating (θ' = 0); the others are interpolated by 2."""
    keep = spec.num_pairs - count
    factors = (2.0,) * keep + (ROTATION_REMOVED,) * count
    inv_freq = torch.cat([spec.inv_freq()[:keep] / 2.0, torch.zeros(count)])
    return ropekit.Scaling(inv_freq=inv_freq, factors=factors)


@pytest.fixture
def removing():
    ropekit.register_method(Method("remove-last", remove_last_pairs, "drop the slowest pairs", "test"))
    try:
        yield ropekit.make_plan(SPEC, 1024, "remove-last")
    finally:
        ropekit.unregister_method("remove-last")


def test_a_removed_pair_is_explicit_and_never_counted_as_interpolated(removing):
    plan = removing
    assert plan.removed_pairs == [6, 7] and plan.interpolated_pairs == [0, 1, 2, 3, 4, 5]
    summary = plan_summary(plan)
    text = json.dumps(summary, allow_nan=False)  # raises on Infinity/NaN
    assert summary["factors"][6:] == [None, None] and summary["removed_pairs"] == [6, 7]
    assert summary["num_interpolated_pairs"] == 6 and "Infinity" not in text
    assert math.isfinite(plan.disturbance)


@pytest.mark.parametrize(
    ("export", "form"),
    [
        (lambda p: transformers_config(p, version=5), "a longrope block"),
        (lambda p: transformers_config(p, version=4), "a longrope block"),
        (vllm_hf_overrides, "a longrope block"),
        (llama_cpp_rope_freqs, "llama.cpp's rope_freqs tensor"),
    ],
)
def test_every_export_refuses_a_removed_pair_in_one_line(removing, export, form):
    with pytest.raises(ropekit.RopekitError, match=f"removes the rotation of 2 pairs .*{form}") as info:
        export(removing)
    assert "\n" not in str(info.value)


def test_write_exports_writes_nothing_for_a_removed_pair(removing, tmp_path):
    with pytest.raises(ropekit.RopekitError, match="removes the rotation"):
        write_exports(removing, tmp_path / "exports")
    assert not list((tmp_path / "exports").glob("*.json"))


def test_the_inv_freq_route_applies_a_removed_pair_exactly(removing):
    from conftest import tiny_llama  # 2 layers, head_dim 16, trained at 512
    from ropekit.apply.patch import model_spec

    model = tiny_llama(64)
    plan = ropekit.make_plan(model_spec(model), 2048, "remove-last")
    ropekit.apply_plan(model, plan, route="inv_freq")
    assert torch.equal(model.model.rotary_emb.inv_freq, plan.inv_freq) and not model.model.rotary_emb.inv_freq[6:].any()
    with pytest.raises(ropekit.RopekitError, match="removes the rotation"):
        ropekit.apply_plan(tiny_llama(64), plan)  # the config route writes a longrope block
