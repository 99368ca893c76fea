"""GGUF in and out on tiny random Llama models written with the gguf package (tests/gguf_fixtures.py).

References: the gguf package's own reader (keys and raw tensor bytes), transformers' own GGUF
loader (`from_pretrained(dir, gguf_file=...)`), and ropekit's tested transformers route
(`ropekit.apply_plan` on the original model) for what an extended GGUF must compute.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ropekit
from conftest import tiny_llama
from gguf_fixtures import gguf_fields, vocabulary, write_llama_gguf
from ropekit.apply.gguf import ROPE_FREQS, extend_gguf, open_gguf, read_rope, write_extended_gguf
from ropekit.cli.main import app
from ropekit.errors import RopekitError

runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(len(vocabulary()), seed=3)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, model):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


@pytest.fixture(scope="module")
def q8_path(tmp_path_factory, model):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf", model, quantize=True)


def test_geometry_from_gguf_matches_the_model(gguf_path, model):
    spec = ropekit.RopeSpec.from_pretrained(str(gguf_path))
    assert spec == ropekit.RopeSpec(
        head_dim=16, base=model.config.rope_parameters["rope_theta"], context_length=512, name=str(gguf_path)
    )
    assert spec.current_scaling is None and read_rope(gguf_path).architecture == "llama"


def test_extend_copies_tensors_byte_for_byte_and_sets_the_rope_keys(q8_path, tmp_path):
    plan = ropekit.make_plan(ropekit.RopeSpec.from_gguf(str(q8_path)), 2048, "yarn")
    out = write_extended_gguf(q8_path, plan, tmp_path / "ext.gguf")
    src, dst = open_gguf(q8_path), open_gguf(out)
    before = {t.name: t for t in src.tensors}
    after = {t.name: t for t in dst.tensors}
    assert set(after) == set(before) | {ROPE_FREQS}
    assert {t.tensor_type.name for t in src.tensors} == {"Q8_0", "F32"}
    for name, t in before.items():  # no requantisation: identical type, shape and bytes
        assert after[name].tensor_type == t.tensor_type and list(after[name].shape) == list(t.shape)
        assert after[name].data.tobytes() == t.data.tobytes()
    freqs = after[ROPE_FREQS]
    assert freqs.tensor_type.name == "F32" and np.array_equal(freqs.data, np.asarray(plan.factors, dtype=np.float32))
    old, new = gguf_fields(q8_path), gguf_fields(out)
    changed = {
        "llama.context_length": 2048,
        "llama.rope.scaling.type": "none",
        "llama.rope.scaling.original_context_length": 512,
        "ropekit.method": "yarn",
    }
    for key, value in changed.items():
        assert new[key] == value
    assert new["llama.rope.scaling.attn_factor"] == pytest.approx(plan.attention_factor, rel=1e-7)
    assert plan.attention_factor == pytest.approx(0.1 * np.log(4) + 1)  # yarn's own a, no llama.cpp mscale on top
    assert {k: v for k, v in new.items() if k in old and k not in changed} == {
        k: v for k, v in old.items() if k not in changed
    }


@pytest.mark.slow
def test_converted_extended_gguf_computes_the_plan(gguf_path, model, tmp_path):
    """GGUF → extend → convert: stock transformers on the directory = ropekit.apply_plan(model, plan), 3× past L."""
    from transformers import AutoModelForCausalLM

    from ropekit.apply.gguf_convert import convert_gguf

    plan = extend_gguf(gguf_path, tmp_path / "ext.gguf", target_length=2048, method="dprope")
    convert_gguf(tmp_path / "ext.gguf", tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert loaded.config.max_position_embeddings == 2048
    reference = ropekit.apply_plan(tiny_llama(len(vocabulary()), seed=3), plan)
    ids = torch.randint(0, len(vocabulary()), (1, 1536), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < 1e-5
    assert json.loads((tmp_path / "hf" / "ropekit.json").read_text())["ropekit_method"] == "dprope"


def test_convert_matches_transformers_own_gguf_loader(q8_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ropekit.apply.gguf_convert import convert_gguf

    convert_gguf(q8_path, tmp_path / "hf")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(q8_path.parent, gguf_file=q8_path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, len(vocabulary()), (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template and tok.convert_ids_to_tokens(tok(" the").input_ids) == ["Ġthe"]  # merges kept
    gguf_tok = AutoTokenizer.from_pretrained(q8_path.parent, gguf_file=q8_path.name)
    text = "the cat sat on a mat, the end"
    assert tok(text).input_ids == gguf_tok(text).input_ids


def test_existing_yarn_composes_and_from_scratch_replaces_it(tmp_path, model):
    """A yarn GGUF (×4 from 128) is planned from its yarn frequencies over 512 tokens, as the same model as a
    transformers config would be; --from-scratch plans plain RoPE at 128 and replaces the yarn keys."""
    keys = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    path = write_llama_gguf(
        tmp_path / "yarn.gguf",
        model,
        extra_keys={
            "llama.rope.scaling.type": "yarn",
            "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 128,
        },
    )
    spec = ropekit.RopeSpec.from_gguf(str(path))
    cfg = {
        **model.config.to_dict(),
        "rope_parameters": {**keys, "rope_theta": model.config.rope_parameters["rope_theta"]},
    }
    from ropekit.apply.readers import spec_from_config_dict

    hf = spec_from_config_dict(cfg)
    assert (spec.context_length, spec.pretrained_length) == (512, 128) == (hf.context_length, hf.pretrained_length)
    assert spec.current_inv_freq == hf.current_inv_freq and spec.prior_attention_factor == hf.prior_attention_factor
    assert "llama.context_length" in spec.length_source
    plan = extend_gguf(path, tmp_path / "ext.gguf", target_length=1024, method="pi")
    rope = read_rope(tmp_path / "ext.gguf")
    assert rope.rope_freqs == tuple(float(np.float32(g * 2.0)) for g in hf.prior_factors)  # g_i × f_i, f = 2
    assert rope.scaling["attn_factor"] == pytest.approx(plan.attention_factor) == pytest.approx(1 + 0.1 * np.log(4))
    new = gguf_fields(tmp_path / "ext.gguf")
    assert "llama.rope.scaling.factor" not in new and new["llama.rope.scaling.type"] == "none"
    assert new["llama.rope.scaling.original_context_length"] == 128 and new["llama.context_length"] == 1024
    extend_gguf(path, tmp_path / "scratch.gguf", target_length=1024, method="pi", from_scratch=True)
    assert read_rope(tmp_path / "scratch.gguf").rope_freqs == (8.0,) * 8


def test_existing_rope_freqs_composes_over_the_files_context(tmp_path, model):
    old = np.linspace(1, 8, 8, dtype=np.float32)  # like a Llama 3.1 GGUF: factors, no original length
    path = write_llama_gguf(tmp_path / "l31.gguf", model, extra_tensors={ROPE_FREQS: old})
    assert read_rope(path).rope_freqs == tuple(float(x) for x in old)
    spec = ropekit.RopeSpec.from_gguf(str(path))
    assert spec.context_length == 512 and spec.prior_factors == tuple(float(x) for x in old)
    extend_gguf(path, tmp_path / "ext.gguf", target_length=2048, method="pi")
    names = [t.name for t in open_gguf(tmp_path / "ext.gguf").tensors]
    assert names.count(ROPE_FREQS) == 1 and read_rope(tmp_path / "ext.gguf").rope_freqs == tuple(4.0 * old)
    with pytest.raises(RopekitError, match="--original-length"):  # replacing needs the pre-scaling length
        extend_gguf(path, tmp_path / "scratch.gguf", target_length=2048, method="pi", from_scratch=True)
    assert not (tmp_path / "scratch.gguf").exists()
    extend_gguf(
        path, tmp_path / "scratch.gguf", target_length=2048, method="pi", from_scratch=True, original_length=512
    )
    assert read_rope(tmp_path / "scratch.gguf").rope_freqs == (4.0,) * 8


def test_old_linear_key_is_read(tmp_path, model):
    path = write_llama_gguf(
        tmp_path / "lin.gguf",
        model,
        extra_keys={"llama.rope.scale_linear": 2.0, "llama.rope.scaling.original_context_length": 256},
    )
    rope = read_rope(path)
    assert rope.scaling_type == "linear" and rope.spec(from_scratch=True).context_length == 256
    spec = rope.spec()  # composing: θ/2 over the file's 512-token context
    assert (spec.context_length, spec.pretrained_length, spec.prior_factors) == (512, 256, (2.0,) * 8)


@pytest.mark.parametrize(
    "case",
    ["longrope-without-factors", "rope_freqs-and-longrope", "not-gguf", "truncated", "unsupported-arch", "same-file"],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path, model, gguf_path):
    src = tmp_path / "in.gguf"
    if case == "longrope-without-factors":
        write_llama_gguf(src, model, extra_keys={"llama.rope.scaling.type": "longrope"})
    elif case == "rope_freqs-and-longrope":
        ones = np.ones(8, dtype=np.float32)
        write_llama_gguf(
            src,
            model,
            extra_tensors={ROPE_FREQS: ones, "rope_factors_long.weight": ones, "rope_factors_short.weight": ones},
        )
    elif case == "not-gguf":
        src.write_text("{}")
    elif case == "truncated":
        src.write_bytes(gguf_path.read_bytes()[:200_000])
    elif case == "unsupported-arch":  # dprope (the default) on a graph without per-pair factors
        write_llama_gguf(src, model, arch="qwen2")
    else:
        src.write_bytes(gguf_path.read_bytes())
    out = src if case == "same-file" else tmp_path / "out.gguf"
    expected = {
        "longrope-without-factors": "conflicting",
        "rope_freqs-and-longrope": "conflicting",
        "not-gguf": "not a GGUF",
        "truncated": "truncated",
        "unsupported-arch": "qwen2",
        "same-file": "is the input",
    }[case]
    before = sorted(os.listdir(tmp_path))
    r = runner.invoke(app, ["extend", str(src), "--target-length", "2048", "--out", str(out)])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert expected in r.stderr
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.slow
def test_bad_gguf_through_the_entry_point(tmp_path, run_main):
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00")
    code, _, stderr = run_main("inspect", str(tmp_path / "x.gguf"))
    assert code == 2 and stderr.startswith("error: ") and "truncated" in stderr and stderr.count("\n") == 1


def test_cli_inspect_plan_and_convert(gguf_path, tmp_path):
    def cli(*args):
        r = runner.invoke(app, list(args))
        assert r.exit_code == 0, r.stderr
        return r.stdout

    card = json.loads(cli("inspect", str(gguf_path), "--json"))
    assert (card["format"], card["architecture"], card["head_dim"], card["trained_context"]) == (
        "gguf",
        "llama",
        16,
        512,
    )
    assert card["llama_cpp_plan"].startswith("per-pair: every method")
    planned = json.loads(
        cli("plan", "--model", str(gguf_path), "--target-length", "2048", "--method", "pi", "--json", "--no-write")
    )
    assert planned["original_length"] == 512 and planned["factors"] == [4.0] * 8
    cli("convert", "gguf", str(gguf_path), "--out", str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.slow
def test_eval_of_a_gguf_is_eval_of_its_model(gguf_path, model, tmp_path, monkeypatch):
    """`ropekit eval X.gguf` converts once into the cache; an F32 GGUF scores exactly like its source model."""
    from ropekit.apply.gguf_convert import load_gguf_tokenizer
    from ropekit.eval.runner import EvalConfig, evaluate

    monkeypatch.setenv("ROPEKIT_CACHE", str(tmp_path / "cache"))
    model.save_pretrained(tmp_path / "hf")
    load_gguf_tokenizer(gguf_path).save_pretrained(tmp_path / "hf")
    text = tmp_path / "doc.txt"
    text.write_text(" the cat sat on the mat and the dog ran after a ball." * 40)
    scores = []
    for source in (gguf_path, tmp_path / "hf"):
        cfg = EvalConfig(
            model=str(source),
            out=tmp_path / f"eval-{len(scores)}",
            tasks=["ppl"],
            lengths=[128],
            data=str(text),
            progress=False,
        )
        scores.append(evaluate(cfg)["methods"]["as-saved"]["ppl"]["128"]["perplexity"])
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1


@pytest.mark.slow
def test_llama_cpp_runs_the_extended_tiny_gguf_like_transformers_with_the_plan(gguf_path, tmp_path):
    """The real llama.cpp on F32 weights, 3× past the trained 512 tokens: the same logits as
    transformers + plan up to float rounding (f16 KV cache), and far from the unextended file."""
    from gguf_fixtures import require_llama_cpp

    require_llama_cpp()
    from ropekit.eval.gguf_parity import agreement, transformers_logits
    from ropekit.eval.llamacpp import llama_cpp_logits

    plan = extend_gguf(gguf_path, tmp_path / "yarn.gguf", target_length=2048, method="yarn")
    ids = torch.randint(0, len(vocabulary()), (1536,), generator=torch.Generator().manual_seed(0)).tolist()
    positions = list(range(1280, 1536))
    reference = transformers_logits(ropekit.apply_plan(tiny_llama(len(vocabulary()), seed=3), plan), ids, positions)
    extended = agreement(llama_cpp_logits(tmp_path / "yarn.gguf", ids, positions), reference)
    unextended = agreement(llama_cpp_logits(gguf_path, ids, positions), reference)
    assert extended["top1_agreement"] == 1.0 and extended["max_abs_logit_diff"] < 1e-4
    assert unextended["mean_abs_logit_diff"] > 20 * extended["mean_abs_logit_diff"]


@pytest.mark.slow
def test_llama_cpp_perplexity_backend_matches_transformers(gguf_path, tmp_path, monkeypatch):
    """`ropekit eval X.gguf --backend llama.cpp --method yarn --beta-fast 8`: the same plan (method options
    reach both backends), same windows, same perplexity as transformers."""
    from gguf_fixtures import require_llama_cpp

    require_llama_cpp()
    from ropekit.eval.runner import EvalConfig, evaluate

    monkeypatch.setenv("ROPEKIT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "doc.txt"
    text.write_text(" the cat sat on the mat and the dog ran after a ball." * 60)
    runs = {}
    for backend in ("llama.cpp", "transformers"):
        cfg = EvalConfig(
            model=str(gguf_path),
            out=tmp_path / backend,
            tasks=["ppl"],
            lengths=[256, 1024],
            methods=["yarn"],
            method_params={"yarn": {"beta_fast": 8.0}},
            data=str(text),
            options={"convention": "strided", "stride": 200},
            backend=backend,
            progress=False,
        )
        runs[backend] = evaluate(cfg)["methods"]["yarn"]
    default_yarn = extend_gguf(gguf_path, tmp_path / "default.gguf", target_length=1024, method="yarn")
    assert runs["llama.cpp"]["plan"] == runs["transformers"]["plan"]
    assert runs["llama.cpp"]["plan"]["factors"] != list(default_yarn.factors)
    for n in ("256", "1024"):
        cpp, tf = runs["llama.cpp"]["ppl"][n], runs["transformers"]["ppl"][n]
        assert cpp["tokens_scored"] == tf["tokens_scored"] and cpp["windows"] == tf["windows"]
        assert cpp["perplexity"] == pytest.approx(tf["perplexity"], rel=1e-5)


def test_extend_to_a_directory_says_how_to_get_a_gguf_that_keeps_the_plan(model, tmp_path):
    model.save_pretrained(tmp_path / "hf")
    r = runner.invoke(
        app,
        ["extend", str(tmp_path / "hf"), "--method", "pi", "--target-length", "2048", "--out", str(tmp_path / "ext")],
    )
    assert r.exit_code == 0, r.stderr
    assert "ropekit extend MODEL.gguf --method pi --target-length 2048" in " ".join(r.stdout.split())
    assert "convert_hf_to_gguf.py" in r.stderr and "runs unextended" in " ".join(r.stderr.split())


@pytest.mark.slow
@pytest.mark.parametrize(
    "keys",
    [
        {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
        {
            "llama.rope.scaling.type": "yarn",
            "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 128,
        },
        {
            "llama.rope.scaling.type": "yarn",
            "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 128,
            "llama.rope.scaling.attn_factor": 0.9,
        },  # llama.cpp: 0.9 × its own 1 + 0.1 ln 4
    ],
    ids=["linear", "yarn", "yarn-attn_factor"],
)
def test_converted_scaling_computes_what_llama_cpp_computes(keys, model, tmp_path):
    """`convert gguf` maps a GGUF's own scaling keys to transformers; llama.cpp on the same file is the reference."""
    from gguf_fixtures import require_llama_cpp

    require_llama_cpp()
    from ropekit.apply.gguf_convert import load_gguf_model
    from ropekit.eval.gguf_parity import agreement, transformers_logits
    from ropekit.eval.llamacpp import llama_cpp_logits

    path = write_llama_gguf(tmp_path / "scaled.gguf", model, extra_keys=keys)
    ids = torch.randint(0, len(vocabulary()), (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    positions = list(range(768, 1024))
    cpp = llama_cpp_logits(path, ids, positions)
    converted = agreement(cpp, transformers_logits(load_gguf_model(path), ids, positions))
    plain = agreement(cpp, transformers_logits(model, ids, positions))
    assert (
        converted["max_abs_logit_diff"] < 1e-4 and plain["mean_abs_logit_diff"] > 20 * converted["mean_abs_logit_diff"]
    )


def llama31_factors(head_dim: int, base: float, original: int, factor: float = 4.0) -> np.ndarray:
    """Llama 3.1's rope_freqs as llama.cpp's converter writes them (low/high frequency factors 1 and 4)."""
    out = []
    for i in range(head_dim // 2):
        wavelength = 2 * np.pi * base ** (2 * i / head_dim)
        if wavelength < original / 4:
            out.append(1.0)
        elif wavelength > original:
            out.append(factor)
        else:
            smooth = (original / wavelength - 1) / 3
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="module")
def llama31_gguf(tmp_path_factory, model):
    """A Llama-3.1-style GGUF: llama3 factors (×4 from 128) in rope_freqs.weight, context_length 512, and no
    rope.scaling keys at all, as llama.cpp's converter writes Llama 3.1."""
    old = llama31_factors(16, model.config.rope_parameters["rope_theta"], 128)
    return write_llama_gguf(tmp_path_factory.mktemp("l31") / "l31.gguf", model, extra_tensors={ROPE_FREQS: old}), old


@pytest.mark.slow
def test_llama31_style_gguf_extended_again_reloads_to_the_composed_frequencies(llama31_gguf, model, tmp_path):
    """dprope on top of the llama3 factors: the file carries g_i·f_i; transformers (through `convert gguf`, built on
    transformers' own GGUF reader) reloads exactly the plan's frequencies, and transformers' `gguf_file=` loader
    gives the same weights but plain θ, because it reads no RoPE scaling for llama."""
    from transformers import AutoModelForCausalLM

    from ropekit.apply.gguf_convert import convert_gguf

    path, old = llama31_gguf
    plan = extend_gguf(path, tmp_path / "ext.gguf", target_length=2048, method="dprope")
    assert plan.spec.is_extended and plan.spec.context_length == 512
    assert read_rope(tmp_path / "ext.gguf").rope_freqs == tuple(
        float(np.float32(g * f)) for g, f in zip(old, plan.factors)
    )
    convert_gguf(tmp_path / "ext.gguf", tmp_path / "hf")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert torch.allclose(ours.model.rotary_emb.inv_freq, plan.inv_freq, rtol=4e-7, atol=0)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="ext.gguf", dtype=torch.float32).eval()
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(
        theirs.model.rotary_emb.inv_freq,
        ropekit.RopeSpec(head_dim=16, base=model.config.rope_parameters["rope_theta"], context_length=512).inv_freq(),
    )


@pytest.mark.slow
def test_llama31_style_gguf_extended_again_runs_the_composition_in_llama_cpp(llama31_gguf, tmp_path):
    """llama.cpp on the composed file = transformers with the composed plan (F32 weights, 3× past 512 tokens)."""
    from gguf_fixtures import require_llama_cpp

    require_llama_cpp()
    from ropekit.apply.gguf_convert import load_gguf_model
    from ropekit.eval.gguf_parity import agreement, transformers_logits
    from ropekit.eval.llamacpp import llama_cpp_logits

    path, _ = llama31_gguf
    plan = extend_gguf(path, tmp_path / "ext.gguf", target_length=2048, method="dprope")
    ids = torch.randint(0, len(vocabulary()), (1536,), generator=torch.Generator().manual_seed(0)).tolist()
    positions = list(range(1280, 1536))
    reference = transformers_logits(ropekit.apply_plan(load_gguf_model(path), plan), ids, positions)  # llama3 + plan
    composed = agreement(llama_cpp_logits(tmp_path / "ext.gguf", ids, positions), reference)
    before = agreement(llama_cpp_logits(path, ids, positions), reference)
    assert composed["top1_agreement"] == 1.0 and composed["max_abs_logit_diff"] < 1e-4
    assert before["mean_abs_logit_diff"] > 20 * composed["mean_abs_logit_diff"]
