"""GGUF architectures beyond llama: what llama.cpp's graph applies (ropekit.apply.gguf_archs) decides how a plan
is written, or whether it is refused.

References: llama.cpp's YaRN and linear arithmetic written out literally in the test (`llama_cpp_yarn`,
independent of `ropekit.apply.gguf_native`); ropekit's tested transformers route for the same plan
(`apply_plan` on the converted model); the README table, which must equal the code's table.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import ropekit
from conftest import REPO, tiny_llama
from gguf_fixtures import gguf_fields, vocabulary, write_llama_gguf
from ropekit.apply.gguf import ROPE_FREQS, extend_gguf, gguf_card, open_gguf, read_rope
from ropekit.apply.gguf_archs import ARCHITECTURES, LONGROPE_TENSORS, markdown_table
from ropekit.errors import RopekitError


@pytest.fixture(scope="module")
def model():
    return tiny_llama(len(vocabulary()), seed=5)


def llama_cpp_yarn(base: float, d: int, s: float, length: int, beta_fast=32.0, beta_slow=1.0) -> np.ndarray:
    """llama.cpp's YaRN frequencies, step by step as ggml computes them (corr dims, ramp, mix), in float64."""
    out = []
    for pair in range(d // 2):
        theta = base ** (-2 * pair / d)
        low = max(0.0, math.floor(d * math.log(length / (beta_fast * 2 * math.pi)) / (2 * math.log(base))))
        high = min(d - 1.0, math.ceil(d * math.log(length / (beta_slow * 2 * math.pi)) / (2 * math.log(base))))
        y = (pair - low) / max(0.001, high - low)
        mix = 1 - min(1.0, max(0.0, y))
        out.append(theta / s * (1 - mix) + theta * mix)
    return np.array(out)


def test_readme_table_is_the_codes_table():
    readme = (REPO / "README.md").read_text()
    assert markdown_table() in readme, (
        "README's architecture table differs: paste ropekit.apply.gguf_archs.markdown_table()"
    )


def test_table_records_each_case_with_its_source():
    support = {a.support for a in ARCHITECTURES.values()}
    assert support == {"per-pair", "native only", "refused"}
    for a in ARCHITECTURES.values():
        assert re.match(r"src/(models/[\w-]+\.cpp|llama-model\.cpp)", a.source), a
    assert ARCHITECTURES["llama"].tensors == (ROPE_FREQS,) and ARCHITECTURES["phi3"].tensors == LONGROPE_TENSORS
    assert ARCHITECTURES["gemma3"].layers == "full_attention" and ARCHITECTURES["gemma2"].layers == "all"


@pytest.mark.parametrize("arch", ["llama", "exaone", "phi3"])
def test_per_pair_architectures_take_every_plan_in_their_factor_tensor(arch, model, tmp_path):
    src = write_llama_gguf(tmp_path / "in.gguf", model, arch=arch)
    plan = extend_gguf(src, tmp_path / "out.gguf", target_length=2048, method="dprope")
    new = {t.name: t for t in open_gguf(tmp_path / "out.gguf").tensors}
    for name in ARCHITECTURES[arch].tensors:
        assert np.array_equal(new[name].data, np.float32(plan.factors))
    assert not set(new) & (set(LONGROPE_TENSORS + (ROPE_FREQS,)) - set(ARCHITECTURES[arch].tensors))
    assert gguf_fields(tmp_path / "out.gguf")[f"{arch}.rope.scaling.type"] == "none"
    assert gguf_card(src)["llama_cpp_plan"].startswith("per-pair")


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "starcoder2"])
def test_native_architectures_take_yarn_and_linear_as_rope_scaling_keys(arch, model, tmp_path):
    src = write_llama_gguf(tmp_path / "in.gguf", model, arch=arch)
    base = model.config.rope_parameters["rope_theta"]
    plan = extend_gguf(src, tmp_path / "yarn.gguf", target_length=2048, method="yarn")
    new = gguf_fields(tmp_path / "yarn.gguf")
    p = f"{arch}.rope.scaling."
    assert (new[p + "type"], new[p + "factor"], new[p + "original_context_length"]) == ("yarn", 4.0, 512)
    assert new[f"{arch}.context_length"] == 2048
    # llama.cpp multiplies attn_factor by its own 1 + 0.1 ln s: the file's key is 1, the product YaRN's a
    assert new[p + "attn_factor"] == pytest.approx(1.0) and plan.attention_factor == pytest.approx(
        1 + 0.1 * math.log(4)
    )
    assert np.allclose(llama_cpp_yarn(base, 16, 4.0, 512), plan.inv_freq.double().numpy(), rtol=1e-6)
    assert ROPE_FREQS not in {t.name for t in open_gguf(tmp_path / "yarn.gguf").tensors}
    extend_gguf(src, tmp_path / "pi.gguf", target_length=2048, method="pi")
    assert (gguf_fields(tmp_path / "pi.gguf")[p + "type"], gguf_fields(tmp_path / "pi.gguf")[p + "factor"]) == (
        "linear",
        4.0,
    )
    assert gguf_card(src)["llama_cpp_plan"].startswith("native only: pi, yarn")


@pytest.mark.parametrize(
    ("arch", "kwargs", "expected"),
    [
        (
            "qwen2",
            {"method": "dprope"},
            "applies no per-pair factors, so a dprope plan cannot run there; methods that run: pi, yarn",
        ),
        ("qwen2", {"method": "llama3"}, "methods that run: pi, yarn"),
        ("qwen2", {"method": "yarn", "beta_fast": 16.0}, "reads no yarn_beta_fast/slow keys"),
        ("qwen2", {"method": "yarn", "truncate": False}, "truncate=False"),
        ("qwen2vl", {"method": "yarn"}, "refused: multimodal RoPE sections"),
        ("deepseek2", {"method": "yarn"}, "refused: MLA's decoupled RoPE"),
        ("mamba", {"method": "yarn"}, "has not read llama.cpp's 'mamba' graph"),
    ],
)
def test_what_llama_cpp_cannot_run_is_refused_with_one_line(arch, kwargs, expected, model, tmp_path):
    src = write_llama_gguf(tmp_path / "in.gguf", model, arch=arch)
    with pytest.raises(RopekitError) as err:
        extend_gguf(src, tmp_path / "out.gguf", target_length=2048, **kwargs)
    assert expected in str(err.value) and "\n" not in str(err.value) and arch in str(err.value)
    assert not (tmp_path / "out.gguf").exists()


def test_mistral3_reads_yarn_betas(model, tmp_path):
    src = write_llama_gguf(tmp_path / "in.gguf", model, arch="mistral3")
    extend_gguf(src, tmp_path / "out.gguf", target_length=2048, method="yarn", beta_fast=16.0)  # per-pair anyway
    assert read_rope(tmp_path / "out.gguf").rope_freqs is not None


def test_native_composition_linear_on_linear_and_refusal_otherwise(model, tmp_path):
    src = write_llama_gguf(
        tmp_path / "in.gguf",
        model,
        arch="qwen2",
        extra_keys={"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 2.0},
    )
    extend_gguf(src, tmp_path / "pi.gguf", target_length=2048, method="pi")  # θ/2 over 512, ×4 more: linear 8
    assert gguf_fields(tmp_path / "pi.gguf")["qwen2.rope.scaling.factor"] == 8.0
    with pytest.raises(
        RopekitError, match="linear scaling times a yarn plan is not one of the forms .* --from-scratch"
    ):
        extend_gguf(src, tmp_path / "yarn.gguf", target_length=2048, method="yarn")
    extend_gguf(src, tmp_path / "yarn.gguf", target_length=2048, method="yarn", from_scratch=True, original_length=256)
    new = gguf_fields(tmp_path / "yarn.gguf")
    assert (new["qwen2.rope.scaling.factor"], new["qwen2.rope.scaling.original_context_length"]) == (8.0, 256)


def gemma3_gguf(path, model, **keys):
    return write_llama_gguf(path, model, arch="gemma3", extra_keys={"gemma3.attention.sliding_window": 64, **keys})


def test_gemma3_full_attention_layers_only(model, tmp_path):
    """llama.cpp's gemma3 graph scales only the full-attention layers (rope_freq_scale_train_swa stays 1), which
    is what ropekit's per-layer-type plans do: the spec is the full layers', yarn runs natively, dprope is refused,
    and an attention factor other than YaRN's own (which would reach the sliding layers) is refused."""
    src = gemma3_gguf(tmp_path / "in.gguf", model)
    rope = read_rope(src)
    assert rope.layer_type == "full_attention" and rope.spec().layer_type == "full_attention"
    assert "full-attention layers only" in gguf_card(src)["llama_cpp_plan"]
    plan = extend_gguf(src, tmp_path / "yarn.gguf", target_length=2048, method="yarn")
    assert plan.spec.layer_type == "full_attention"
    assert gguf_fields(tmp_path / "yarn.gguf")["gemma3.rope.scaling.type"] == "yarn"
    with pytest.raises(RopekitError, match="'gemma3' graph applies no per-pair factors"):
        extend_gguf(src, tmp_path / "dprope.gguf", target_length=2048, method="dprope")
    with pytest.raises(RopekitError, match="sliding-window layers' cos and sin"):
        extend_gguf(src, tmp_path / "a.gguf", target_length=2048, method="yarn", attention_factor=1.3)
    plain = write_llama_gguf(tmp_path / "plain.gguf", model, arch="gemma3")  # no sliding window: every layer is full
    assert read_rope(plain).layer_type is None


@pytest.mark.slow
def test_gemma3_native_yarn_converts_to_transformers_per_layer_type(tmp_path):
    """The extended gemma3 GGUF's keys, read back by `convert gguf`'s config, give transformers' Gemma 3 the plan on
    its full-attention layers and plain RoPE (base 10,000) on the sliding ones."""
    from transformers import Gemma3TextConfig

    from ropekit.apply.gguf_convert import rope_scaling_block

    cfg = Gemma3TextConfig(
        vocab_size=len(vocabulary()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    from transformers import Gemma3ForCausalLM

    gemma = Gemma3ForCausalLM(cfg)
    src = gemma3_gguf(tmp_path / "in.gguf", tiny_llama(len(vocabulary())))  # full layers at the file's base, 10,000
    plan = extend_gguf(src, tmp_path / "yarn.gguf", target_length=2048, method="yarn")
    rope = read_rope(tmp_path / "yarn.gguf")
    cfg.rope_parameters = {
        **cfg.rope_parameters,
        "full_attention": {"rope_theta": rope.base, **rope_scaling_block(rope)},
    }
    cfg.max_position_embeddings = 2048
    rotary = type(gemma.model.rotary_emb)(cfg)
    assert torch.allclose(rotary.full_attention_inv_freq, plan.inv_freq, rtol=1e-6, atol=0)
    assert rotary.full_attention_attention_scaling == pytest.approx(plan.attention_factor)
    assert rotary.sliding_attention_attention_scaling == 1.0
    assert torch.equal(
        rotary.sliding_attention_inv_freq, ropekit.RopeSpec(head_dim=16, base=1e4, context_length=512).inv_freq()
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["yarn", "pi"])
def test_llama_cpp_runs_native_keys_like_transformers_with_the_plan(method, model, tmp_path):
    """The real llama.cpp, qwen2 graph (no factor tensor): the native keys ropekit writes compute the plan. The tiny
    Llama written as qwen2 (rotate-half rows, as llama.cpp's NEOX RoPE) is the same function in both runtimes;
    F32 weights, 3× past the trained 512 tokens."""
    from gguf_fixtures import require_llama_cpp

    require_llama_cpp()
    from ropekit.eval.gguf_parity import agreement, transformers_logits
    from ropekit.eval.llamacpp import llama_cpp_logits

    src = write_llama_gguf(tmp_path / "qwen2.gguf", model, arch="qwen2")
    plan = extend_gguf(src, tmp_path / "ext.gguf", target_length=2048, method=method)
    ids = torch.randint(0, len(vocabulary()), (1536,), generator=torch.Generator().manual_seed(0)).tolist()
    positions = list(range(1280, 1536))
    plain = transformers_logits(model, ids, positions)
    assert agreement(llama_cpp_logits(src, ids, positions), plain)["max_abs_logit_diff"] < 1e-4  # same function
    reference = transformers_logits(ropekit.apply_plan(tiny_llama(len(vocabulary()), seed=5), plan), ids, positions)
    extended = agreement(llama_cpp_logits(tmp_path / "ext.gguf", ids, positions), reference)
    assert extended["top1_agreement"] == 1.0 and extended["max_abs_logit_diff"] < 1e-4
    assert agreement(plain, reference)["mean_abs_logit_diff"] > 20 * extended["mean_abs_logit_diff"]


def test_cli_passes_from_scratch_and_refuses_layer_types_for_a_gguf(model, tmp_path):
    from typer.testing import CliRunner

    from ropekit.cli.main import app

    keys = {"qwen2.rope.scaling.type": "linear", "qwen2.rope.scaling.factor": 2.0}
    src = write_llama_gguf(tmp_path / "in.gguf", model, arch="qwen2", extra_keys=keys)
    base = ["extend", str(src), "--method", "yarn", "--target-length", "2048"]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a.gguf")])
    assert r.exit_code == 2 and "--from-scratch" in r.stderr and r.stderr.count("\n") == 1
    r = CliRunner().invoke(
        app, [*base, "--from-scratch", "--original-length", "256", "--out", str(tmp_path / "b.gguf")]
    )
    assert r.exit_code == 0, r.stderr
    assert "qwen2.rope.scaling.type yarn" in " ".join(r.stdout.split()) and "no --rope-*" in r.stdout
    r = CliRunner().invoke(app, [*base, "--layer-types", "full_attention", "--out", str(tmp_path / "c.gguf")])
    assert r.exit_code == 2 and "llama.cpp's graph decides" in r.stderr
    planned = CliRunner().invoke(
        app, ["plan", "--model", str(src), "--target-length", "2048", "--method", "pi", "--json", "--no-write"]
    )
    assert planned.exit_code == 0, planned.stderr
    import json

    assert json.loads(planned.stdout)["factors"] == [4.0] * 8  # composing: ×4 on top of the file's ×2
