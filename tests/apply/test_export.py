"""Exported configs load in stock transformers and reproduce the plan exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import ropekit
from registered_methods import NATIVE, REGISTERED, make_plan
from ropekit import RopeSpec
from ropekit.apply.export import llama_cpp_rope_freqs, transformers_config, vllm_hf_overrides, write_exports

SPEC = RopeSpec(head_dim=64, base=10000.0, context_length=256, name="tiny")
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


@pytest.mark.parametrize("method", REGISTERED)
@pytest.mark.parametrize("version", [5, 4])
def test_longrope_export_reloads_to_the_plan(method, version, tmp_path):
    plan = make_plan(SPEC, TARGET, method)
    keys = transformers_config(plan, version=version)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **keys}))
    assert AutoConfig.from_pretrained(tmp_path).max_position_embeddings == TARGET
    inv_freq, attention = runtime_rope(tiny_llama(keys), TARGET)
    assert torch.equal(
        inv_freq,
        ropekit.make_plan(
            SPEC, TARGET, "longrope", factors=plan.factors, attention_factor=plan.attention_factor
        ).inv_freq,
    )
    # re-expressed as 1/(f_i·b^(2i/d)): within 2.5 float32 ulps of the method's own arithmetic
    assert torch.allclose(inv_freq, plan.inv_freq, rtol=3e-7, atol=0)
    assert attention == pytest.approx(plan.attention_factor, rel=1e-12)


def test_per_pair_methods_reload_bit_exact():
    plan = ropekit.make_plan(SPEC, TARGET, "dprope")
    inv_freq, attention = runtime_rope(tiny_llama(transformers_config(plan)), TARGET)
    assert torch.equal(inv_freq, plan.inv_freq) and attention == 1.0


@pytest.mark.parametrize("method", NATIVE)
def test_native_exports_reproduce_the_plan(method):
    plan = make_plan(SPEC, TARGET, method)
    keys = transformers_config(plan, native=True)
    inv_freq, attention = runtime_rope(tiny_llama(keys), TARGET)
    if keys["rope_parameters"]["rope_type"] == "dynamic":
        # transformers' runtime recomputes the base with tensor (float32) arithmetic; its init function,
        # which ropekit matches bit for bit (test_transformers_parity), uses Python floats
        assert torch.allclose(inv_freq, plan.inv_freq, rtol=1e-5, atol=0)
    else:
        assert torch.equal(inv_freq, plan.inv_freq)
    assert attention == pytest.approx(plan.attention_factor, rel=1e-12)


# vLLM's rope-scaling semantics (vllm/model_executor/layers/rotary_embedding: get_rope and the
# Phi3LongRoPEScaled / YaRNScaling / Llama3 / LinearScaling embeddings), re-implemented here from
# their documented formulas: vLLM is not a dependency. Each returns the per-pair inverse frequency a
# position is multiplied by and the magnitude (mscale) cos/sin are multiplied by.


def vllm_pair_exponents(rotary_dim: int) -> torch.Tensor:
    return torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim


def vllm_rope(config: dict, head_dim: int, max_model_len: int) -> tuple[torch.Tensor, float]:
    """What vLLM computes from a config (v5 `rope_parameters` or v4 `rope_scaling` + `rope_theta`)."""
    if "rope_parameters" in config:
        params = dict(config["rope_parameters"])
    else:
        params = {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {})}
        params.setdefault("rope_type", params.get("type", "default"))
        if "partial_rotary_factor" in config:
            params["partial_rotary_factor"] = config["partial_rotary_factor"]
    base = params.get("rope_theta", 10000.0)
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    max_position = config["max_position_embeddings"]
    default = 1.0 / (base ** vllm_pair_exponents(rotary_dim))
    kind = params["rope_type"]
    if kind == "default":
        return default, 1.0
    if kind == "linear":  # positions are divided by the factor
        return default / params["factor"], 1.0
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        original = params["original_max_position_embeddings"]
        wavelength = 2 * math.pi / default
        smooth = (original / wavelength - low) / (high - low)
        scaled = torch.where(
            wavelength > original / low, default / factor, (1 - smooth) * default / factor + smooth * default
        )
        return torch.where(wavelength < original / high, default, scaled), 1.0
    if kind == "yarn":
        factor, original = params["factor"], params["original_max_position_embeddings"]
        beta_fast, beta_slow = params.get("beta_fast", 32), params.get("beta_slow", 1)

        def correction_dim(rotations):
            return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), rotary_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: extrapolate (keep the original frequency), 0: interpolate
        inv_freq = default / factor * (1 - keep) + default * keep
        return inv_freq, (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    if kind == "longrope":
        original = params["original_max_position_embeddings"]
        # long factors whenever the served length exceeds the original one (vLLM never switches mid-sequence)
        factors = params["long_factor"] if max_model_len > original else params["short_factor"]
        mscale = params.get("long_mscale") if max_model_len > original else params.get("short_mscale")
        if mscale is None:  # Phi-3's default magnitude
            scale = max_position / original
            mscale = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base ** vllm_pair_exponents(rotary_dim)), mscale
    raise AssertionError(f"no vLLM reference for {kind}")


@pytest.mark.parametrize("method", REGISTERED)
@pytest.mark.parametrize("version", [5, 4])
def test_vllm_overrides_give_vllm_the_plans_frequencies_and_magnitude(method, version):
    plan = make_plan(SPEC, TARGET, method)
    overrides = vllm_hf_overrides(plan, version=version)
    for served in (TARGET, SPEC.context_length):  # long and short branch: short = long, so no switch
        inv_freq, mscale = vllm_rope({"max_position_embeddings": TARGET, **overrides}, SPEC.head_dim, served)
        assert torch.allclose(inv_freq, plan.inv_freq, rtol=3e-7, atol=0)
        assert mscale == pytest.approx(plan.attention_factor, rel=1e-12)


def test_without_the_overrides_vllm_would_use_phi3s_magnitude():
    """Why the vLLM form carries short/long_mscale: vLLM ignores `attention_factor` in a longrope block."""
    for method in ("dprope", "yarn"):
        plan = ropekit.make_plan(SPEC, TARGET, method)
        _, mscale = vllm_rope(transformers_config(plan), SPEC.head_dim, TARGET)
        assert mscale == pytest.approx(math.sqrt(1 + math.log(TARGET / 256) / math.log(256)))
        assert mscale != pytest.approx(plan.attention_factor)


@pytest.mark.parametrize("method", NATIVE)
def test_native_exports_mean_the_plan_in_vllm(method):
    plan = make_plan(SPEC, TARGET, method)
    keys = transformers_config(plan, native=True)
    if keys["rope_parameters"]["rope_type"] == "dynamic":
        pytest.skip("vLLM's dynamic NTK scales with the running length; this file has no reference for it")
    inv_freq, mscale = vllm_rope(keys, SPEC.head_dim, TARGET)
    assert torch.allclose(inv_freq, plan.inv_freq, rtol=1e-6, atol=0)
    assert mscale == pytest.approx(plan.attention_factor, rel=1e-12)


@pytest.mark.parametrize("method", REGISTERED)
def test_llama_cpp_rope_freqs_mean_the_plan(method):
    """llama.cpp divides each pair's θ_i = base^(-2i/d) by rope_freqs[i] and scales cos/sin by attn_factor."""
    plan = make_plan(SPEC, TARGET, method)
    cpp = llama_cpp_rope_freqs(plan)
    assert cpp["tensor"] == "rope_freqs.weight" and cpp["shape"] == [SPEC.head_dim // 2]
    i = torch.arange(SPEC.head_dim // 2, dtype=torch.float64)
    theta = cpp["rope_freq_base"] ** (-2 * i / SPEC.head_dim) / torch.tensor(cpp["values"], dtype=torch.float64)
    assert torch.allclose(theta.float(), plan.inv_freq, rtol=3e-7, atol=0)
    assert cpp["attention_factor"] == pytest.approx(plan.attention_factor, rel=1e-12)
    assert cpp["context_length"] == TARGET


def test_partial_rotary_export_keeps_the_fraction():
    spec = RopeSpec(head_dim=64, base=10000.0, context_length=256, partial_rotary_factor=0.5)
    plan = ropekit.make_plan(spec, 1024, "dprope")
    block = transformers_config(plan)["rope_parameters"]
    assert block["partial_rotary_factor"] == 0.5 and len(block["long_factor"]) == 16
    config = LlamaConfig(
        hidden_size=128, num_attention_heads=2, head_dim=64, max_position_embeddings=1024, rope_parameters=block
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=1024)
    assert torch.equal(inv_freq, plan.inv_freq)
    inv_freq, mscale = vllm_rope(vllm_hf_overrides(plan), spec.head_dim, 1024)  # vLLM: rotary_dim = 64 · 0.5
    assert torch.allclose(inv_freq, plan.inv_freq, rtol=3e-7, atol=0) and mscale == plan.attention_factor


def test_write_exports_files(tmp_path):
    written = write_exports(ropekit.make_plan(SPEC, TARGET, "yarn"), tmp_path)
    assert set(written) >= {
        "transformers_v5",
        "transformers_v4",
        "vllm_hf_overrides",
        "llama_cpp_rope_freqs",
        "transformers_v5_native",
    }
    assert json.loads(written["transformers_v5_native"].read_text())["rope_parameters"]["rope_type"] == "yarn"


@pytest.mark.parametrize("method", ["dprope", "yarn", "pi", "dynamic-ntk"])
def test_every_export_sets_the_context_the_runtime_serves(method, tmp_path):
    """The served length is the target L' in every file (transformers' dynamic alone keeps L there: it reads L
    from max_position_embeddings); vLLM derives max_model_len from the overrides' max_position_embeddings."""
    spec = RopeSpec(head_dim=64, base=10000.0, context_length=2048)
    plan = ropekit.make_plan(spec, 8192, method)
    files = {k: json.loads(p.read_text()) for k, p in write_exports(plan, tmp_path).items()}
    for kind in ("transformers_v5", "transformers_v4", "vllm_hf_overrides", "vllm_hf_overrides_v4"):
        assert files[kind]["max_position_embeddings"] == 8192, kind
    assert files["llama_cpp_rope_freqs"]["context_length"] == 8192
    if "transformers_v5_native" in files:
        native = files["transformers_v5_native"]
        assert native["max_position_embeddings"] == (2048 if method == "dynamic-ntk" else 8192)
