"""The families people run now, as shipped (existing scaling, per-layer-type RoPE, explicit head_dim):
plan → apply → save → stock reload → identical logits, and the reloaded rotary frequencies per
layer type equal the plan. Tiny random configs (2 layers, hidden 64)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from conftest import fast_subset
from ropekit import RopekitError
from ropekit.apply.extend import extend, load_model, read_record
from ropekit.apply.patch import apply, as_plan_list, buffer_name, model_spec
from ropekit.apply.readers import spec_from_config_dict
from ropekit.plan.registry import plan as make_plan

INPUT_LENGTH = 300
COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
PAIRS = 8  # head_dim 16
SLIDING_FULL = ["sliding_attention", "full_attention"]

# family → (config class, extra keys, trained context ropekit should find)
FAMILIES = {
    "llama3.x (llama3 scaling)": (
        T.LlamaConfig,
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500000.0,
            }
        ),
        64,
    ),
    "qwen2.5 (yarn in config)": (
        T.Qwen2Config,
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 1e6,
            }
        ),
        256,
    ),
    "phi-3.5 (longrope)": (
        T.Phi3Config,
        dict(
            original_max_position_embeddings=16,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.05 * i for i in range(PAIRS)],
                "long_factor": [1.0 + 0.75 * i for i in range(PAIRS)],
            },
        ),
        64,
    ),
    "mistral-nemo (explicit head_dim)": (
        T.MistralConfig,
        dict(head_dim=32, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        64,
    ),
    "olmo2": (T.Olmo2Config, dict(), 64),
    "gpt-oss (sliding/full, yarn untruncated)": (
        T.GptOssConfig,
        dict(
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=16,
            layer_types=SLIDING_FULL,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "rope_theta": 150000.0,
            },
        ),
        64,
    ),
    "gemma3 (per layer type)": (T.Gemma3TextConfig, dict(head_dim=16, sliding_window=16, layer_types=SLIDING_FULL), 64),
    "gemma3 (per layer type, linear ×8 on full)": (
        T.Gemma3TextConfig,
        dict(
            head_dim=16,
            sliding_window=16,
            layer_types=SLIDING_FULL,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
        64,
    ),
    "olmo3 (per layer type)": (T.Olmo3Config, dict(sliding_window=16, layer_types=SLIDING_FULL), 64),
    "gemma3n (per layer type)": (
        T.Gemma3nTextConfig,
        dict(
            intermediate_size=[96, 96],
            head_dim=16,
            sliding_window=16,
            layer_types=SLIDING_FULL,
            hidden_size_per_layer_input=8,
            num_kv_shared_layers=0,
            laurel_rank=4,
            altup_num_inputs=2,
            activation_sparsity_pattern=[0.0, 0.0],
        ),
        64,
    ),
    # one RoPE block shared by every RoPE layer, with sliding/global or RoPE/NoPE layer mixes
    "cohere2 (RoPE sliding, NoPE full)": (T.Cohere2Config, dict(sliding_window=16, layer_types=SLIDING_FULL), 64),
    "exaone4 (sliding/full)": (T.Exaone4Config, dict(sliding_window=16, layer_types=SLIDING_FULL), 64),
    "ministral (sliding/full)": (T.MinistralConfig, dict(head_dim=16, sliding_window=16, layer_types=SLIDING_FULL), 64),
    "qwen3 (sliding window layers)": (
        T.Qwen3Config,
        dict(head_dim=16, use_sliding_window=True, sliding_window=16, max_window_layers=1),
        64,
    ),
    "smollm3 (NoPE layers)": (T.SmolLM3Config, dict(no_rope_layers=[1, 0]), 64),
    "llama4 text (chunked, NoPE layers)": (
        T.Llama4TextConfig,
        dict(
            head_dim=16,
            intermediate_size_mlp=96,
            num_local_experts=2,
            no_rope_layers=[1, 0],
            attention_chunk_size=16,
            interleave_moe_layer_step=1,
        ),
        64,
    ),
}


def make_model(family: str):
    config_cls, extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config_cls(**{**COMMON, **extra}), dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rotary_state(model) -> dict:
    """{(module path, buffer): (inv_freq, attention scaling)} of every rotary module."""
    state = {}
    for path, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            for name, buf in module.named_buffers(recurse=False):
                if name.endswith("inv_freq") and "original" not in name:
                    scaling = getattr(module, name.replace("inv_freq", "attention_scaling"))
                    state[(path, name)] = (buf.clone(), float(scaling))
    return state


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 96, (1, INPUT_LENGTH), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "family", fast_subset(FAMILIES, {"llama3.x (llama3 scaling)", "phi-3.5 (longrope)", "gemma3 (per layer type)"})
)
def test_round_trip_through_stock_reload(family, input_ids, tmp_path):
    source = make_model(family)
    source.save_pretrained(tmp_path / "src")
    before = rotary_state(source)
    trained = FAMILIES[family][2]
    plans = as_plan_list(extend(str(tmp_path / "src"), tmp_path / "out", target_length=2 * trained, method="dprope"))
    assert all(p.spec.context_length == trained for p in plans)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    patched = apply(load_model(str(tmp_path / "src"), dtype="float32"), plans)
    planned = {buffer_name(p.spec.layer_type): p for p in plans}
    for (path, name), (inv_freq, scaling) in rotary_state(reloaded).items():
        if name in planned:  # exactly the plan
            assert torch.equal(inv_freq, planned[name].inv_freq), (path, name)
            assert scaling == pytest.approx(planned[name].attention_factor, rel=1e-12)
        else:  # layer types not planned keep their RoPE
            assert torch.equal(inv_freq, before[(path, name)][0]) and scaling == before[(path, name)][1], (path, name)
    assert (logits(patched, input_ids) - logits(reloaded, input_ids)).abs().max() <= 1e-5
    assert read_record(tmp_path / "out")["plan"]["original_length"] == trained


@pytest.mark.parametrize(
    "family", fast_subset([f for f in FAMILIES if "per layer type" in f], {"gemma3 (per layer type)"})
)
def test_per_layer_type_default_changes_full_attention_only(family, input_ids):
    model = make_model(family)
    spec = model_spec(model)
    assert spec.layer_type == "full_attention"
    sliding = model_spec(model, layer_type="sliding_attention")
    plan = make_plan(spec, 128, "yarn")
    before = rotary_state(model)
    by_config, by_buffer = apply(make_model(family), plan), apply(make_model(family), plan, route="inv_freq")
    assert (logits(by_config, input_ids) - logits(by_buffer, input_ids)).abs().max() <= 1e-5
    for (path, name), (inv_freq, _) in rotary_state(by_config).items():
        if name == "sliding_attention_inv_freq":
            assert torch.equal(inv_freq, before[(path, name)][0]) and torch.equal(inv_freq, sliding.inv_freq())
        else:  # yarn re-expressed as longrope: within 2.5 float32 ulps of yarn's own arithmetic
            assert torch.allclose(inv_freq, plan.inv_freq, rtol=3e-7, atol=0)
    assert by_config.config.rope_parameters["sliding_attention"]["rope_type"] == "default"


@pytest.mark.slow
def test_per_layer_type_both_types_on_request(input_ids, tmp_path):
    family = "gemma3 (per layer type)"
    make_model(family).save_pretrained(tmp_path / "src")
    plans = extend(
        str(tmp_path / "src"),
        tmp_path / "out",
        target_length=128,
        method="pi",
        layer_types=["full_attention", "sliding_attention"],
    )
    assert set(plans) == {"full_attention", "sliding_attention"}
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    rotary = reloaded.model.rotary_emb
    for layer_type, plan in plans.items():
        assert torch.equal(getattr(rotary, f"{layer_type}_inv_freq"), plan.inv_freq)
    patched = apply(load_model(str(tmp_path / "src"), dtype="float32"), plans)
    assert (logits(patched, input_ids) - logits(reloaded, input_ids)).abs().max() <= 1e-5


def test_gemma3_v4_hub_config_reads_per_layer_type():
    cfg = {
        "model_type": "gemma3_text",
        "hidden_size": 2560,
        "num_attention_heads": 8,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    }
    full = spec_from_config_dict(cfg, name="gemma-3-4b")
    sliding = spec_from_config_dict(cfg, name="gemma-3-4b", layer_type="sliding_attention")
    assert (full.layer_type, full.base, full.context_length, full.is_extended) == ("full_attention", 1e6, 131072, True)
    assert torch.equal(full.inv_freq(), full.base_inv_freq() / 8)
    assert (sliding.base, sliding.is_extended) == (10000.0, False)
    with pytest.raises(RopekitError, match="layer type 'global'"):
        spec_from_config_dict(cfg, name="gemma-3-4b", layer_type="global")


def test_unsupported_layouts_are_refused_with_one_clear_line():
    gemma4 = T.Gemma4TextConfig(**{**COMMON, "head_dim": 16}).to_dict()
    with pytest.raises(RopekitError, match="'proportional' RoPE"):
        spec_from_config_dict(gemma4, name="gemma4", from_scratch=True)
    sliding_only = {
        **gemma4,
        "model_type": "some_new_family",
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    }
    with pytest.raises(RopekitError, match="without a 'full_attention' block"):
        spec_from_config_dict(sliding_only, name="x")
    with pytest.raises(RopekitError, match="one RoPE block for every layer"):
        spec_from_config_dict(FAMILIES["olmo2"][0](**COMMON).to_dict(), name="olmo2", layer_type="full_attention")
    # a per-layer-type module ropekit has not tested is refused before anything changes
    model = make_model("gemma3 (per layer type)")
    plan = make_plan(model_spec(model), 128, "pi")
    model.config.model_type = "untested_family"
    with pytest.raises(RopekitError, match="not tested"):
        apply(model, plan)
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "default"


def test_gemma3_cli_extend_and_inspect_per_layer_type(tmp_path):
    from typer.testing import CliRunner

    from ropekit.apply.inspect import model_card
    from ropekit.cli.main import app

    make_model("gemma3 (per layer type)").save_pretrained(tmp_path / "src")
    card = model_card(str(tmp_path / "src"))
    layers = card["layer_types"]
    assert layers["full_attention"]["extended_by_default"] and not layers["sliding_attention"]["extended_by_default"]
    assert (layers["full_attention"]["rope_theta"], layers["sliding_attention"]["rope_theta"]) == (1e6, 1e4)
    result = CliRunner().invoke(
        app,
        [
            "extend",
            str(tmp_path / "src"),
            "--target-length",
            "256",
            "--out",
            str(tmp_path / "out"),
            "--layer-types",
            "full_attention",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "full_attention layers" in result.stdout and "no exact llama.cpp form" in result.stdout
    extended = model_card(str(tmp_path / "out"))
    assert extended["trained_context"] == 256 and "--from-scratch" in extended["note"]
    result = CliRunner().invoke(
        app,
        [
            "extend",
            str(tmp_path / "src"),
            "--target-length",
            "256",
            "--out",
            str(tmp_path / "bad"),
            "--layer-types",
            "global",
        ],
    )
    assert result.exit_code == 2 and "no RoPE block for layer type 'global'" in result.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_from_scratch_plan_replaces_the_existing_scaling(input_ids, tmp_path):
    family = "llama3.x (llama3 scaling)"
    make_model(family).save_pretrained(tmp_path / "src")
    plan = extend(str(tmp_path / "src"), tmp_path / "out", target_length=128, method="dprope", from_scratch=True)
    assert (plan.spec.context_length, plan.spec.is_extended) == (16, False)  # the llama3 block's original length
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert torch.equal(reloaded.model.rotary_emb.inv_freq, plan.inv_freq)
    patched = apply(load_model(str(tmp_path / "src"), dtype="float32"), plan)
    assert (logits(patched, input_ids) - logits(reloaded, input_ids)).abs().max() <= 1e-5
    # a plan composed for other existing factors does not fit this model
    other = spec_from_config_dict(
        {
            **make_model(family).config.to_dict(),
            "rope_parameters": {**FAMILIES[family][1]["rope_parameters"], "factor": 4.0},
        },
        name="other",
    )
    with pytest.raises(RopekitError, match="existing scaling factors"):
        apply(make_model(family), make_plan(other, 128, "pi"))


@pytest.mark.parametrize("version", [5, 4])
def test_gemma3_exports_reload_per_layer_type(version):
    from ropekit.apply.export import transformers_config

    config = T.Gemma3TextConfig(**{**COMMON, **FAMILIES["gemma3 (per layer type, linear ×8 on full)"][1]})
    plan = make_plan(spec_from_config_dict(config.to_dict(), name="g3"), 128, "dprope")
    keys = transformers_config(plan, version=version)
    base = {k: v for k, v in config.to_dict().items() if k not in ("rope_parameters", "max_position_embeddings")}
    if version == 4:  # the v4 form: rope_scaling for the full-attention layers, rope_local_base_freq for sliding
        keys = {**keys, "rope_local_base_freq": 1e4}
    else:  # v5: the planned layer type's block; the others as in the model
        keys["rope_parameters"] = {**config.rope_parameters, **keys["rope_parameters"]}
    torch.manual_seed(0)
    rotary = T.AutoModelForCausalLM.from_config(T.Gemma3TextConfig(**base, **keys)).model.rotary_emb
    assert torch.equal(rotary.full_attention_inv_freq, plan.inv_freq)
    assert torch.equal(rotary.sliding_attention_inv_freq, model_spec_inv_freq(config, "sliding_attention"))
    sliding_plan = make_plan(
        spec_from_config_dict(config.to_dict(), name="g3", layer_type="sliding_attention"), 128, "pi"
    )
    with pytest.raises(RopekitError, match="no RoPE block for sliding_attention"):
        transformers_config(sliding_plan, version=4)


def model_spec_inv_freq(config, layer_type):
    return spec_from_config_dict(config.to_dict(), name="g3", layer_type=layer_type).inv_freq()
