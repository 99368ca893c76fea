"""inv_freq and attention factor equal transformers' own ROPE_INIT_FUNCTIONS, bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import ropekit
from registered_methods import REGISTERED, make_plan
from ropekit import RopeSpec
from ropekit.apply.export import rope_block_of, transformers_config

# (head_dim, partial_rotary_factor, base, context_length): Llama-2, Phi-3 (96), Gemma (256),
# a 64-dim head, GPT-NeoX/Pythia (¼ of 128) and Phi-2 (0.4 of 80).
GEOMETRIES = [
    (128, 1.0, 10000.0, 4096),
    (96, 1.0, 10000.0, 4096),
    (256, 1.0, 10000.0, 8192),
    (64, 1.0, 500000.0, 2048),
    (128, 0.25, 10000.0, 2048),
    (80, 0.4, 10000.0, 2048),
]
SCALES = [2, 4, 8, 3.5]


def hf_config(spec: RopeSpec, rope: dict, max_positions: int) -> LlamaConfig:
    params = {"rope_theta": spec.base, **rope}
    if spec.partial_rotary_factor < 1:
        params["partial_rotary_factor"] = spec.partial_rotary_factor
    return LlamaConfig(
        hidden_size=spec.head_dim * 4,
        num_attention_heads=4,
        head_dim=spec.head_dim,
        max_position_embeddings=max_positions,
        rope_parameters=params,
    )


def hf_rope(spec: RopeSpec, rope: dict, max_positions: int, seq_len: int | None = None):
    config = hf_config(spec, rope, max_positions)
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu", seq_len=seq_len)


def assert_same(plan, expected):
    inv_freq, attention = expected
    assert plan.inv_freq.dtype == inv_freq.dtype == torch.float32
    assert torch.equal(plan.inv_freq, inv_freq), (plan.inv_freq - inv_freq).abs().max()
    assert plan.attention_factor == attention


@pytest.fixture(params=GEOMETRIES, ids=lambda g: f"d{g[0]}x{g[1]}-b{g[2]:g}-L{g[3]}")
def spec(request):
    head_dim, prf, base, length = request.param
    return RopeSpec(head_dim=head_dim, base=base, context_length=length, partial_rotary_factor=prf)


@pytest.mark.parametrize("scale", SCALES)
def test_linear(spec, scale):
    target = int(spec.context_length * scale)
    plan = ropekit.make_plan(spec, target, "pi")
    assert_same(plan, hf_rope(spec, {"rope_type": "linear", "factor": scale}, target))


@pytest.mark.parametrize("scale", SCALES)
def test_dynamic_ntk_at_target_and_beyond(spec, scale):
    target = int(spec.context_length * scale)
    for at_length in (target, target * 2, spec.context_length // 2):
        plan = ropekit.make_plan(spec, target, "dynamic-ntk", at_length=at_length)
        expected = hf_rope(spec, {"rope_type": "dynamic", "factor": scale}, spec.context_length, seq_len=at_length)
        assert_same(plan, expected)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("betas", [(32.0, 1.0), (16.0, 2.0)])
def test_yarn(spec, scale, betas):
    target = int(spec.context_length * scale)
    plan = ropekit.make_plan(spec, target, "yarn", beta_fast=betas[0], beta_slow=betas[1])
    rope = {
        "rope_type": "yarn",
        "factor": scale,
        "original_max_position_embeddings": spec.context_length,
        "beta_fast": betas[0],
        "beta_slow": betas[1],
    }
    assert_same(plan, hf_rope(spec, rope, target))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("bands", [(1.0, 4.0), (2.0, 8.0)])
def test_llama3(spec, scale, bands):
    target = int(spec.context_length * scale)
    plan = ropekit.make_plan(spec, target, "llama3", low_freq_factor=bands[0], high_freq_factor=bands[1])
    rope = {
        "rope_type": "llama3",
        "factor": scale,
        "low_freq_factor": bands[0],
        "high_freq_factor": bands[1],
        "original_max_position_embeddings": spec.context_length,
    }
    assert_same(plan, hf_rope(spec, rope, target))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("explicit_attention", [None, 1.25])
def test_longrope(spec, scale, explicit_attention):
    target = int(spec.context_length * scale)
    factors = (1.0 + torch.rand(spec.num_pairs, generator=torch.Generator().manual_seed(0)) * (scale - 1)).tolist()
    plan = ropekit.make_plan(spec, target, "longrope", factors=factors, attention_factor=explicit_attention)
    rope = {
        "rope_type": "longrope",
        "short_factor": factors,
        "long_factor": factors,
        "factor": scale,
        "original_max_position_embeddings": spec.context_length,
    }
    if explicit_attention is not None:
        rope["attention_factor"] = explicit_attention
    assert_same(plan, hf_rope(spec, rope, target, seq_len=target))


def test_default_geometry_matches_unscaled_transformers(spec):
    plan = ropekit.make_plan(spec, spec.context_length * 2, "none")
    config = hf_config(spec, {"rope_type": "linear", "factor": 1.0}, spec.context_length)
    assert_same(plan, ROPE_INIT_FUNCTIONS["linear"](config, "cpu"))


# Every registered method, through the blocks ropekit exports: transformers' own init function for the
# block's rope_type gives the plan's frequencies (its native form bit for bit; the longrope form within
# 2.5 float32 ulps, bit for bit for methods that compute 1/(f_i·b^(2i/d)) themselves).
METHOD_GEOMETRIES = [(64, 1.0, 10000.0, 256), (80, 0.4, 10000.0, 512)]


@pytest.mark.parametrize("method", REGISTERED)
@pytest.mark.parametrize("geometry", METHOD_GEOMETRIES, ids=lambda g: f"d{g[0]}x{g[1]}-L{g[3]}")
@pytest.mark.parametrize("scale", [2, 3.5])
def test_every_registered_method_reloads_in_transformers(method, geometry, scale):
    head_dim, prf, base, length = geometry
    spec = RopeSpec(head_dim=head_dim, base=base, context_length=length, partial_rotary_factor=prf)
    target = int(length * scale)
    plan = make_plan(spec, target, method)
    forms = [("longrope", False)] + ([("native", True)] if ropekit.METHODS[method].native is not None else [])
    for _, native in forms:
        keys = transformers_config(plan, native=native)
        block = rope_block_of(keys, plan)
        config = LlamaConfig(
            hidden_size=head_dim * 4,
            num_attention_heads=4,
            head_dim=head_dim,
            max_position_embeddings=keys["max_position_embeddings"],
            rope_parameters=block,
        )
        kind = block["rope_type"]
        if kind == "default":  # a base change: plain RoPE at the new rope_theta, as `linear` ×1 computes it
            config.rope_parameters = {**block, "rope_type": "linear", "factor": 1.0}
            kind = "linear"
        inv_freq, attention = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=target)
        if native or ropekit.METHODS[method].exact_inv_freq:
            assert torch.equal(inv_freq, plan.inv_freq), (method, block["rope_type"])
        else:
            assert torch.allclose(inv_freq, plan.inv_freq, rtol=3e-7, atol=0), (method, block["rope_type"])
        assert attention == pytest.approx(plan.attention_factor, rel=1e-12)
