"""Already-extended models: ropekit plans from the current frequencies (transformers' own
ROPE_INIT_FUNCTIONS are the reference), composes a new plan with them, and the exported config
reloads in stock transformers to exactly the composed frequencies and attention scaling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from typer.testing import CliRunner

import ropekit
from ropekit import RopekitError
from ropekit.apply.export import transformers_config, write_exports
from ropekit.apply.inspect import model_card
from ropekit.apply.readers import spec_from_config_dict
from ropekit.cli.main import app

HEAD = 64
# one config per existing scaling type: rope block, max_position_embeddings, expected trained context
EXISTING = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, 2048, 2048),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, 2048, 2048),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 2048, 2048),
    "yarn-qwen2.5": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}, 512, 2048),
    "yarn-mscale": (
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "mscale": 0.707,
            "mscale_all_dim": 0.707 * 1.1,
        },
        2048,
        2048,
    ),
    "yarn-untruncated": (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 256,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        2048,
        2048,
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        4096,
        4096,
    ),
    "longrope": (
        {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.01 * i for i in range(HEAD // 2)],
            "long_factor": [1.0 + 0.5 * i for i in range(HEAD // 2)],
            "original_max_position_embeddings": 512,
        },
        4096,
        4096,
    ),
}


def config_dict(rope: dict, max_positions: int, base: float = 10000.0) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": 2 * HEAD,
        "num_attention_heads": 2,
        "head_dim": HEAD,
        "max_position_embeddings": max_positions,
        "rope_parameters": {**rope, "rope_theta": base},
    }


def hf_current(rope: dict, max_positions: int, seq_len: int):
    """transformers' own (inv_freq, attention) for the block at a sequence of `seq_len` tokens."""
    config = LlamaConfig(**{k: v for k, v in config_dict(rope, max_positions).items() if k != "model_type"})
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu", seq_len=seq_len)


def reloaded_rope(keys: dict, length: int):
    """inv_freq and attention scaling of a stock LlamaRotaryEmbedding built from the exported keys, after a forward at `length`."""
    config = LlamaConfig(hidden_size=2 * HEAD, num_attention_heads=2, head_dim=HEAD, **keys)
    rotary = LlamaRotaryEmbedding(config)
    with torch.no_grad():
        rotary(torch.zeros(1, length, 8), torch.arange(length)[None])
    return rotary.inv_freq, rotary.attention_scaling


@pytest.mark.parametrize("kind", list(EXISTING))
def test_current_frequencies_are_transformers_own(kind):
    rope, max_positions, trained = EXISTING[kind]
    spec = spec_from_config_dict(config_dict(rope, max_positions), name=kind)
    assert spec.context_length == trained and spec.length_source
    inv_freq, attention = hf_current(rope, max_positions, seq_len=trained)
    assert torch.equal(spec.inv_freq(), inv_freq)
    assert spec.prior_attention_factor == pytest.approx(attention, rel=1e-12)
    if kind != "dynamic":  # the closed-form factors describe the same frequencies
        assert torch.allclose(
            spec.base_inv_freq().double() / torch.tensor(spec.prior_factors), inv_freq.double(), rtol=3e-7
        )


@pytest.mark.parametrize("kind", list(EXISTING))
@pytest.mark.parametrize("method", ["dprope", "yarn", "pi", "llama3"])
def test_composed_plan_reloads_exactly(kind, method):
    rope, max_positions, trained = EXISTING[kind]
    spec = spec_from_config_dict(config_dict(rope, max_positions), name=kind)
    target = 2 * trained
    plan = ropekit.make_plan(spec, target, method)
    inv_freq, attention = reloaded_rope(transformers_config(plan), target)
    if spec.is_extended:
        assert torch.equal(inv_freq, plan.inv_freq)
    else:  # dynamic: plain frequencies up to L_t, so the plan is an ordinary one (longrope within 2.5 ulps)
        assert torch.allclose(inv_freq, plan.inv_freq, rtol=3e-7, atol=0)
    current, current_attention = hf_current(rope, max_positions, seq_len=trained)
    method_only = ropekit.make_plan(spec.__class__(head_dim=HEAD, base=10000.0, context_length=trained), target, method)
    # runtime = current / new factors (within float32 rounding), attention factors multiply
    assert torch.allclose(plan.inv_freq.double(), current.double() / torch.tensor(plan.factors), rtol=4e-7, atol=0)
    method_attention = plan.scaling.details.get("method_attention_factor", plan.attention_factor)  # dynamic: plain
    assert attention == pytest.approx(current_attention * method_attention, rel=1e-12)
    if method in ("pi", "yarn"):  # methods defined from (b, d, L_t) keep their factors and attention factor
        assert plan.factors == method_only.factors
        assert plan.attention_factor == pytest.approx(current_attention * method_only.attention_factor, rel=1e-12)


def test_phi3_longrope_top_level_original_length_reloads_exactly():
    rope = EXISTING["longrope"][0]
    cfg = {
        **config_dict({k: v for k, v in rope.items() if k != "original_max_position_embeddings"}, 4096),
        "model_type": "phi3",
        "original_max_position_embeddings": 512,
    }
    spec = spec_from_config_dict(cfg, name="phi3.5-like")
    plan = ropekit.make_plan(spec, 8192, "dprope")
    keys = transformers_config(plan)
    config = Phi3Config(hidden_size=2 * HEAD, num_attention_heads=2, original_max_position_embeddings=512, **keys)
    rotary = Phi3RotaryEmbedding(config)
    with torch.no_grad():
        rotary(torch.zeros(1, 8192, 8), torch.arange(8192)[None])
    assert torch.equal(rotary.inv_freq, plan.inv_freq)
    expected_attention = math.sqrt(1 + math.log(4096 / 512) / math.log(512))  # Phi-3's long mscale, a_dprope = 1
    assert rotary.attention_scaling == pytest.approx(expected_attention, rel=1e-12)


# ---- Llama 3.1 as shipped: the acceptance case --------------------------------------

LLAMA31 = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


@pytest.fixture
def llama31_dir(tmp_path):
    (tmp_path / "llama31").mkdir()
    (tmp_path / "llama31" / "config.json").write_text(json.dumps(LLAMA31))
    return tmp_path / "llama31"


@pytest.mark.slow
def test_llama31_inspect_and_plan_from_its_trained_context(llama31_dir):
    card = model_card(str(llama31_dir))
    assert card["trained_context"] == 131072 and "max_position_embeddings 131072" in card["trained_context_source"]
    assert "--target-length 262144" in card["next"]
    spec = ropekit.RopeSpec.from_pretrained(str(llama31_dir))
    config = LlamaConfig(**{k: v for k, v in LLAMA31.items() if k != "model_type"})
    llama3_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert torch.equal(spec.inv_freq(), llama3_inv_freq)
    plan = ropekit.make_plan(spec, 262144, "dprope")
    assert set(plan.factors) == {1.0, 2.0}
    keys = transformers_config(plan)
    assert keys["rope_parameters"]["original_max_position_embeddings"] == 8192
    reloaded = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128, **keys)
    inv_freq, attention = ROPE_INIT_FUNCTIONS["longrope"](reloaded, "cpu", seq_len=262144)
    assert torch.equal(inv_freq, plan.inv_freq) and attention == 1.0
    assert torch.allclose(inv_freq.double(), llama3_inv_freq.double() / torch.tensor(plan.factors), rtol=4e-7, atol=0)


def test_from_scratch_keeps_the_previous_behaviour(llama31_dir):
    spec = ropekit.RopeSpec.from_pretrained(str(llama31_dir), from_scratch=True)
    assert (spec.context_length, spec.prior_factors, spec.base) == (8192, None, 500000.0)
    assert torch.equal(spec.inv_freq(), spec.base_inv_freq())
    plan = ropekit.make_plan(spec, 32768, "dprope")
    assert plan.runtime_factors == plan.factors
    assert transformers_config(plan)["rope_parameters"]["original_max_position_embeddings"] == 8192


def test_target_below_current_context_is_refused_with_one_line(llama31_dir, tmp_path):
    with pytest.raises(RopekitError, match="already handles"):
        ropekit.make_plan(ropekit.RopeSpec.from_pretrained(str(llama31_dir)), 32768, "dprope")
    result = CliRunner().invoke(app, ["plan", "--model", str(llama31_dir), "--target-length", "32768", "--no-write"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--from-scratch" in lines[0]
    result = CliRunner().invoke(
        app, ["plan", "--model", str(llama31_dir), "--target-length", "32768", "--from-scratch", "--json", "--no-write"]
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["original_length"] == 8192


@pytest.mark.slow
def test_cli_plan_and_exports_for_an_extended_model(llama31_dir, tmp_path):
    result = CliRunner().invoke(
        app,
        ["plan", "--model", str(llama31_dir), "--target-length", "262144", "--json", "--out", str(tmp_path / "plan")],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["original_length"] == 131072 and summary["existing_scaling"]["rope_type"] == "llama3"
    spec = ropekit.RopeSpec.from_pretrained(str(llama31_dir))
    plan = ropekit.make_plan(spec, 262144, "dprope")
    assert summary["runtime_factors"] == list(plan.runtime_factors)
    written = write_exports(plan, tmp_path / "exports")
    assert "transformers_v5_native" not in written  # no native form composes with an existing scaling
    cpp = json.loads(written["llama_cpp_rope_freqs"].read_text())
    assert cpp["values"] == list(plan.runtime_factors)


def test_base_rules_refuse_an_extended_model_but_an_explicit_base_composes(llama31_dir):
    spec = ropekit.RopeSpec.from_pretrained(str(llama31_dir))
    with pytest.raises(RopekitError, match="plain RoPE"):
        ropekit.make_plan(spec, 262144, "base")
    plan = ropekit.make_plan(spec, 262144, "base", new_base=1e6)
    assert plan.factors[0] == 1.0 and plan.factors[-1] == pytest.approx(2 ** (126 / 128))
    assert "base" not in ropekit.compare(spec, 262144)
