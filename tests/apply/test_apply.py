"""apply / extend on real transformers models of every listed family, and on stories260K."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

import ropekit
from conftest import fast_subset, optional_asset, require_asset, write_llama2c
from ropekit import RopekitError
from ropekit.apply.extend import extend, load_model
from ropekit.apply.patch import apply, model_spec, rotary_modules
from ropekit.apply.readers import spec_from_config_dict
from ropekit.cli.main import app

ORIGINAL, TARGET, INPUT_LENGTH = 64, 256, 200
COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=ORIGINAL,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": (T.LlamaConfig, dict(num_key_value_heads=2)),
    "mistral": (T.MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": (T.Qwen2Config, dict(num_key_value_heads=2)),
    "qwen3": (T.Qwen3Config, dict(num_key_value_heads=2, head_dim=16)),
    "phi3": (T.Phi3Config, dict(num_key_value_heads=2)),
    "gemma": (T.GemmaConfig, dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": (T.Gemma2Config, dict(num_key_value_heads=2, head_dim=16, sliding_window=512)),
    "gpt_neox": (
        T.GPTNeoXConfig,
        dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    ),
}


def make_model(family: str):
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 96, (1, INPUT_LENGTH), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", fast_subset(FAMILIES, {"llama", "gpt_neox"}))
@pytest.mark.parametrize("method", ["dprope", "yarn"])
def test_extend_round_trip_logits(family, method, input_ids, tmp_path):
    make_model(family).save_pretrained(tmp_path / "src")
    plan = extend(str(tmp_path / "src"), tmp_path / "out", target_length=TARGET, method=method)
    patched = apply(load_model(str(tmp_path / "src")), plan)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.max_position_embeddings == TARGET
    for _, _, module in rotary_modules(reloaded):
        assert torch.allclose(module.inv_freq, plan.inv_freq, rtol=3e-7, atol=0)
        assert module.attention_scaling == pytest.approx(plan.attention_factor)
    assert (logits(patched, input_ids) - logits(reloaded, input_ids)).abs().max() <= 1e-5
    record = json.loads((tmp_path / "out" / "ropekit.json").read_text())
    assert record["plan"]["method"] == plan.method and record["plan"]["ropekit_version"] == ropekit.__version__


@pytest.mark.parametrize("family", fast_subset(FAMILIES, {"llama", "gpt_neox"}))
def test_inv_freq_route_equals_config_route(family, input_ids):
    by_config, by_buffer = make_model(family), make_model(family)
    plan = ropekit.make_plan(model_spec(by_config), TARGET, "dprope")
    apply(by_config, plan)
    apply(by_buffer, plan, route="inv_freq")
    assert (logits(by_config, input_ids) - logits(by_buffer, input_ids)).abs().max() <= 1e-5
    # the plan changes the model: its logits past the original context differ from the unextended ones
    assert (logits(make_model(family), input_ids) - logits(by_config, input_ids)).abs().max() > 1e-4


def test_refusals():
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    llama = make_model("llama")
    with pytest.raises(RopekitError, match="no RoPE"):
        model_spec(gpt2)
    other = ropekit.make_plan(ropekit.RopeSpec(head_dim=16, base=500000.0, context_length=ORIGINAL), TARGET, "pi")
    with pytest.raises(RopekitError, match="rope_theta"):
        apply(llama, other)
    shorter = ropekit.make_plan(ropekit.RopeSpec(head_dim=16, base=10000.0, context_length=32), TARGET, "pi")
    with pytest.raises(RopekitError, match="original length"):
        apply(llama, shorter)
    vl = {
        "model_type": "qwen2_vl",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    }
    with pytest.raises(RopekitError, match="multimodal"):
        spec_from_config_dict(vl, name="vl")


# ---- stories260K end to end through the CLI, reloaded by a Python with no ropekit -------------

STOCK_LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert "ropekit" not in sys.modules
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    out = model(ids).logits[0]
print(json.dumps({"inv_freq": [m.inv_freq.tolist() for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")],
                  "logits": out[-1].tolist()}))
"""


@pytest.mark.slow
def test_stories260k_convert_extend_and_stock_reload(tmp_path):
    ckpt = require_asset("stories260K/stories260K.bin")
    runner = CliRunner()
    converted, extended = tmp_path / "s260k", tmp_path / "s260k-2k"
    result = runner.invoke(
        app, ["convert", "llama2c", str(ckpt), str(ckpt.with_name("tok512.bin")), "--out", str(converted)]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["extend", str(converted), "--method", "dprope", "--target-length", "2048", "--out", str(extended)]
    )
    assert result.exit_code == 0, result.output
    plan = ropekit.make_plan(ropekit.RopeSpec.from_pretrained(str(converted)), 2048, "dprope")
    ids = torch.randint(3, 512, (1, 1500), generator=torch.Generator().manual_seed(2))
    proc = subprocess.run(
        [sys.executable, "-c", STOCK_LOADER, str(extended), json.dumps(ids[0].tolist())],
        capture_output=True,
        text=True,
        check=True,
    )
    stock = json.loads(proc.stdout)
    assert stock["inv_freq"] and all(layer == plan.inv_freq.tolist() for layer in stock["inv_freq"])
    patched = apply(load_model(str(converted)), plan)
    assert (torch.tensor(stock["logits"]) - logits(patched, ids)[0, -1]).abs().max() <= 1e-5


def cli_errors(tmp_path, ckpt, tok):
    cut = tmp_path / "cut.bin"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_head": 2}))
    out = str(tmp_path / "out")
    return {
        "missing checkpoint": (["convert", "llama2c", str(tmp_path / "none.bin"), str(tok), "--out", out], "not found"),
        "missing tokenizer": (["convert", "llama2c", str(ckpt), str(tmp_path / "none.bin"), "--out", out], "not found"),
        "wrong checksum": (
            ["convert", "llama2c", str(ckpt), str(tok), "--out", out, "--sha256", "0" * 64],
            "does not match",
        ),
        "truncated": (["convert", "llama2c", str(cut), str(tok), "--out", out], "truncated"),
        "non-RoPE model": (["extend", str(gpt2), "--target-length", "2048", "--out", out], "no RoPE"),
        "missing model": (
            ["extend", str(tmp_path / "nomodel"), "--target-length", "2048", "--out", out],
            "no such file",
        ),
        "inspect non-RoPE": (["inspect", str(gpt2)], "no RoPE"),
    }


def test_cli_bad_inputs_exit_2_and_write_nothing(tmp_path):
    ckpt = optional_asset("stories260K/stories260K.bin")
    if ckpt is None:  # without ../shared: a tiny llama2.c checkpoint and tokenizer
        ckpt, tok = write_llama2c(tmp_path / "llama2c")
    else:
        tok = ckpt.with_name("tok512.bin")
    for case, (args, expected) in cli_errors(tmp_path, ckpt, tok).items():
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (case, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (case, result.stderr)
        assert not (tmp_path / "out").exists(), case
        assert not list(tmp_path.glob(".out.partial-*")), case


def test_no_public_name_is_both_a_subpackage_and_a_function():
    import types

    import ropekit.apply.export  # noqa: F401 - a later submodule import must not rebind any name
    import ropekit.plan.plots  # noqa: F401

    for name in ("plan", "apply", "train", "eval", "data", "cli"):
        __import__(f"ropekit.{name}")
        assert isinstance(getattr(ropekit, name), types.ModuleType), name
    assert callable(ropekit.apply_plan) and callable(ropekit.make_plan) and callable(ropekit.extend)
    assert not set(ropekit.__all__) & {"plan", "apply"}
    model = make_model("llama")
    ropekit.apply_plan(model, ropekit.make_plan(model_spec(model), TARGET, "pi"))
    assert model.config.rope_parameters["rope_type"] == "longrope"
