"""Exported configs load in stock transformers and reproduce the plan exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import ropekit
from ropekit import RopeSpec
from ropekit.apply.export import llama_cpp_rope_freqs, transformers_config, vllm_hf_overrides, write_exports

SPEC = RopeSpec(head_dim=64, base=10000.0, original_length=256, name="tiny")
TARGET = 1024


def tiny_llama(config_keys: dict) -> LlamaForCausalLM:
    base = dict(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
    )
    config = LlamaConfig.from_dict({**base, **config_keys})
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def runtime_rope(model: LlamaForCausalLM, length: int):
    """inv_freq and attention scaling the model actually uses after a forward pass at `length`."""
    rotary = model.model.rotary_emb
    with torch.no_grad():
        x = torch.zeros(1, length, 8)
        rotary(x, torch.arange(length)[None])
    return rotary.inv_freq, rotary.attention_scaling


@pytest.mark.parametrize("method", ["dprope", "pi", "yarn", "llama3", "ntk", "base", "resonance", "none"])
@pytest.mark.parametrize("version", [5, 4])
def test_longrope_export_reloads_to_the_plan(method, version, tmp_path):
    plan = ropekit.plan(SPEC, TARGET, method)
    keys = transformers_config(plan, version=version)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **keys}))
    assert AutoConfig.from_pretrained(tmp_path).max_position_embeddings == TARGET
    inv_freq, attention = runtime_rope(tiny_llama(keys), TARGET)
    assert torch.equal(
        inv_freq,
        ropekit.plan(SPEC, TARGET, "longrope", factors=plan.factors, attention_factor=plan.attention_factor).inv_freq,
    )
    # re-expressed as 1/(f_i·b^(2i/d)): within 2.5 float32 ulps of the method's own arithmetic
    assert torch.allclose(inv_freq, plan.inv_freq, rtol=3e-7, atol=0)
    assert attention == pytest.approx(plan.attention_factor, rel=1e-12)


def test_per_pair_methods_reload_bit_exact():
    plan = ropekit.plan(SPEC, TARGET, "dprope")
    inv_freq, attention = runtime_rope(tiny_llama(transformers_config(plan)), TARGET)
    assert torch.equal(inv_freq, plan.inv_freq) and attention == 1.0


@pytest.mark.parametrize("method", ["pi", "yarn", "llama3", "dynamic-ntk", "ntk", "base", "none"])
def test_native_exports_reproduce_the_plan(method):
    plan = ropekit.plan(SPEC, TARGET, method)
    keys = transformers_config(plan, native=True)
    inv_freq, attention = runtime_rope(tiny_llama(keys), TARGET)
    if method == "dynamic-ntk":
        # transformers' runtime recomputes the base with tensor (float32) arithmetic; its init function,
        # which ropekit matches bit for bit (test_transformers_parity), uses Python floats
        assert torch.allclose(inv_freq, plan.inv_freq, rtol=1e-5, atol=0)
    else:
        assert torch.equal(inv_freq, plan.inv_freq)
    assert attention == pytest.approx(plan.attention_factor, rel=1e-12)


def test_vllm_and_llama_cpp_forms():
    plan = ropekit.plan(SPEC, TARGET, "yarn")
    for version, key in ((5, "rope_parameters"), (4, "rope_scaling")):
        block = vllm_hf_overrides(plan, version=version)[key]
        assert block["short_mscale"] == block["long_mscale"] == plan.attention_factor
        assert block["short_factor"] == block["long_factor"] == list(plan.factors)
    cpp = llama_cpp_rope_freqs(plan)
    assert cpp["tensor"] == "rope_freqs.weight" and cpp["shape"] == [32] and cpp["values"] == list(plan.factors)


def test_partial_rotary_export_keeps_the_fraction():
    spec = RopeSpec(head_dim=64, base=10000.0, original_length=256, partial_rotary_factor=0.5)
    plan = ropekit.plan(spec, 1024, "dprope")
    block = transformers_config(plan)["rope_parameters"]
    assert block["partial_rotary_factor"] == 0.5 and len(block["long_factor"]) == 16
    config = LlamaConfig(
        hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=1024, rope_parameters=block
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=1024)
    assert torch.equal(inv_freq, plan.inv_freq)


def test_write_exports_files(tmp_path):
    written = write_exports(ropekit.plan(SPEC, TARGET, "yarn"), tmp_path)
    assert set(written) >= {
        "transformers_v5",
        "transformers_v4",
        "vllm_hf_overrides",
        "llama_cpp_rope_freqs",
        "transformers_v5_native",
    }
    assert json.loads(written["transformers_v5_native"].read_text())["rope_parameters"]["rope_type"] == "yarn"
