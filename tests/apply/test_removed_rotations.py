"""Models whose tail pairs do not rotate (transformers' `proportional`: Gemma 4, LFM3) and partial-rotary models,
read, planned, exported and reloaded.

References: transformers' own rotary modules (inv_freq computed by transformers from the same config), the
stock reload of a saved model (from_pretrained), the in-memory inv_freq route, and llama.cpp's Gemma 4
conversion convention (rope_freqs 1e30 for a pair that does not rotate) written in the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import ropekit
from conftest import tiny_llama
from gguf_fixtures import gguf_fields, vocabulary, write_llama_gguf
from ropekit.apply.gguf import ROPE_FREQS, extend_gguf, gguf_card, open_gguf, read_rope
from ropekit.apply.patch import model_spec
from ropekit.apply.readers import spec_from_config_dict
from ropekit.errors import RopekitError

GEMMA4 = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    num_hidden_layers=2,
    intermediate_size=64,
    vocab_size=128,
    max_position_embeddings=128,
    layer_types=["sliding_attention", "full_attention"],
    hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=128,
    sliding_window=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def gemma4(**overrides) -> T.Gemma4ForCausalLM:
    torch.manual_seed(0)
    return T.Gemma4ForCausalLM(T.Gemma4TextConfig(**{**GEMMA4, "global_head_dim": 64, **overrides})).eval()


@pytest.mark.parametrize(
    "config",
    [
        T.Gemma4TextConfig(**GEMMA4, global_head_dim=64),  # full-attention head_dim 64 via per_layer_config
        T.Gemma4TextConfig(
            **{**GEMMA4, "global_head_dim": 64},
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {
                    "rope_type": "proportional",
                    "partial_rotary_factor": 0.5,
                    "rope_theta": 1e6,
                    "factor": 2.0,
                },
            },
        ),
    ],
    ids=["gemma4", "gemma4 with factor 2"],
)
def test_proportional_configs_read_to_transformers_own_inv_freq(config):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    spec = spec_from_config_dict(config.to_dict(), name="gemma4")
    rotary = Gemma4TextRotaryEmbedding(config)
    assert (spec.layer_type, spec.head_dim, spec.rotary_dim) == ("full_attention", 64, 64)
    kept = int(config.rope_parameters["full_attention"]["partial_rotary_factor"] * 64 // 2)
    assert spec.removed_pairs == tuple(range(kept, 32))
    # what the model runs: planning with `none` keeps the model's own frequencies
    plan = ropekit.make_plan(spec, 256, "none")
    assert torch.equal(plan.inv_freq, rotary.full_attention_inv_freq)
    assert spec.is_extended == ("factor" in config.rope_parameters["full_attention"])


def test_lfm3_proportional_and_partial_rotary_models_read_to_transformers_inv_freq():
    from transformers.models.lfm3.modeling_lfm3 import Lfm3RotaryEmbedding

    config = T.Lfm3Config(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_hidden_layers=4,
        vocab_size=128,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    spec = spec_from_config_dict(config.to_dict(), name="lfm3")
    assert torch.equal(spec.model_inv_freq(), Lfm3RotaryEmbedding(config).full_attention_inv_freq)
    # partial rotary (GPT-NeoX): the rotated channels only, exponents over them (no removed pairs)
    neox = T.GPTNeoXConfig(
        hidden_size=64,
        num_attention_heads=2,
        rotary_pct=0.25,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=256,
    )
    spec = spec_from_config_dict(neox.to_dict(), name="neox")
    rotary = T.models.gpt_neox.modeling_gpt_neox.GPTNeoXRotaryEmbedding(neox)
    assert spec.removed_pairs == () and torch.equal(spec.model_inv_freq(), rotary.inv_freq)


@pytest.mark.parametrize(("method", "kwargs"), [("pi", {}), ("p-rope", {"p": 0.5})])
def test_gemma4_plans_export_and_reload_in_stock_transformers(method, kwargs, tmp_path):
    model = gemma4()
    plan = ropekit.make_plan(model_spec(model, layer_type="full_attention"), 512, method, **kwargs)
    ropekit.apply_plan(model, plan)  # writes transformers' proportional block
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "proportional"
    model.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.model.rotary_emb.full_attention_inv_freq, plan.inv_freq)
    in_memory = ropekit.apply_plan(gemma4(), plan, route="inv_freq")
    x = torch.randint(3, 128, (1, 384))  # 3× the trained context
    with torch.no_grad():
        assert (reloaded(x).logits - in_memory(x).logits).abs().max() < 1e-5


def test_a_per_pair_plan_with_removed_pairs_has_no_transformers_form_but_runs_in_memory():
    plan = ropekit.make_plan(model_spec(gemma4(), layer_type="full_attention"), 512, "yarn", attention_factor=1.0)
    with pytest.raises(RopekitError, match="one factor; this plan's differ per pair.*route='inv_freq'") as info:
        ropekit.apply_plan(gemma4(), plan)
    assert "\n" not in str(info.value)
    model = ropekit.apply_plan(gemma4(), plan, route="inv_freq")
    assert torch.equal(model.model.rotary_emb.full_attention_inv_freq, plan.inv_freq)


def test_p_rope_on_a_llama_extends_through_the_api_and_reloads(tmp_path):
    from ropekit.apply.extend import save_extended

    model = tiny_llama(64)
    plan = ropekit.make_plan(model_spec(model), 2048, "p-rope", p=0.75)
    save_extended(ropekit.apply_plan(model, plan), plan, tmp_path / "out", source="tiny")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.model.rotary_emb.inv_freq, plan.inv_freq)
    assert reloaded.config.max_position_embeddings == 2048


# ---- GGUF ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_llama(len(vocabulary()), seed=5)


def gemma4_gguf(path, model, divisors):
    """A gemma4-architecture GGUF as llama.cpp's conversion writes it: rope_freqs 1 for the rotating pairs and
    1e30 for the others, a sliding window (the graph applies rope_freqs to the full-attention layers only)."""
    return write_llama_gguf(
        path,
        model,
        arch="gemma4",
        extra_keys={"gemma4.attention.sliding_window": 16},
        extra_tensors={ROPE_FREQS: np.asarray(divisors, dtype=np.float32)},
    )


def test_gemma4_gguf_reads_its_removed_pairs_and_takes_a_plan_in_rope_freqs(model, tmp_path):
    src = gemma4_gguf(tmp_path / "in.gguf", model, [1.0] * 2 + [1e30] * 6)
    rope = read_rope(src)
    assert rope.removed_pairs == (2, 3, 4, 5, 6, 7) and rope.layer_type == "full_attention"
    spec = rope.spec()
    assert not spec.is_extended and spec.removed_pairs == (2, 3, 4, 5, 6, 7)
    assert gguf_card(src)["llama_cpp_plan"] == "per-pair: every method (rope_freqs.weight, full-attention layers only)"
    plan = extend_gguf(src, tmp_path / "out.gguf", target_length=2048, method="pi")
    written = {t.name: t for t in open_gguf(tmp_path / "out.gguf").tensors}[ROPE_FREQS].data
    assert np.array_equal(written, np.float32([4.0, 4.0] + [1e30] * 6)) and plan.removed_pairs == [2, 3, 4, 5, 6, 7]
    assert read_rope(tmp_path / "out.gguf").removed_pairs == rope.removed_pairs
    # the attention factor would reach the sliding layers too: refused
    with pytest.raises(RopekitError, match="'gemma4' graph multiplies the sliding-window layers"):
        extend_gguf(src, tmp_path / "yarn.gguf", target_length=2048, method="yarn")


def test_p_rope_in_a_llama_gguf_is_rope_freqs_1e30_and_reads_back_removed(model, tmp_path):
    src = write_llama_gguf(tmp_path / "in.gguf", model)
    plan = extend_gguf(src, tmp_path / "out.gguf", target_length=2048, method="p-rope", p=0.5, inner="yarn")
    values = {t.name: t for t in open_gguf(tmp_path / "out.gguf").tensors}[ROPE_FREQS].data
    assert np.array_equal(values[4:], np.float32([1e30] * 4))
    assert np.array_equal(values[:4], np.float32(plan.factors[:4]))
    assert gguf_fields(tmp_path / "out.gguf")["llama.rope.scaling.attn_factor"] == pytest.approx(plan.attention_factor)
    assert read_rope(tmp_path / "out.gguf").spec().removed_pairs == (4, 5, 6, 7)


def test_native_only_architectures_refuse_removed_pairs_in_one_line(model, tmp_path):
    src = write_llama_gguf(tmp_path / "in.gguf", model, arch="qwen2")
    with pytest.raises(RopekitError, match="'qwen2' graph cannot express that .*applies no per-pair factor") as info:
        extend_gguf(src, tmp_path / "out.gguf", target_length=2048, method="p-rope")
    assert "\n" not in str(info.value) and not (tmp_path / "out.gguf").exists()
