"""Inputs that used to end in a traceback or be silently accepted: each is now one `error:` line
with exit 2 (130 for an interrupt) and nothing written, or handled correctly (a corrupted cache
entry is rebuilt, NaN results are reported and kept, a .json data file is parsed)."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
from test_output_contract import assert_one_line_error, eval_args, no_work, save_tiny_model, write_llama2c, write_text
from typer.testing import CliRunner

import ropekit
from conftest import plot_pixels
from ropekit import RopekitError
from ropekit.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_model(root / "model"), write_text(root / "text.txt")


def broken_copy(model, tmp_path, weights: bytes):
    """A copy of the tiny model whose model.safetensors is `weights`."""
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(model, copy)
    (copy / "model.safetensors").write_bytes(weights)
    return copy


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_damaged_safetensors_is_one_line_in_extend_eval_finetune(damage, tiny, tmp_path):
    model, text = tiny
    data = (model / "model.safetensors").read_bytes()
    broken = broken_copy(model, tmp_path, data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    out = tmp_path / "out"
    commands = {
        "extend": ["extend", str(broken), "--target-length", "1024", "--method", "pi", "--out", str(out)],
        "eval": eval_args(broken, text, out),
        "finetune": [
            "finetune",
            str(broken),
            "--data",
            str(text),
            "--target-length",
            "1024",
            "--train-length",
            "64",
            "--steps",
            "1",
            "--global-batch",
            "1",
            "--report-to",
            "none",
            "--out",
            str(out),
        ],
    }
    for name, args in commands.items():
        result = runner.invoke(app, args)
        assert_one_line_error(result, "could not load the model", after_work=True)
        assert "Traceback" not in result.output, name
        assert not out.exists() or name == "finetune" and not (out / "model.safetensors").exists(), name


def test_corrupted_cache_entry_is_rebuilt_and_reported(tiny, tmp_path, capsys):
    from test_output_contract import char_tokenizer

    from ropekit.data.documents import tokenize_documents

    docs = [("a", "the cat sat on the mat"), ("b", "a dog ran")]
    tok = char_tokenizer()
    fresh = tokenize_documents(docs, tok, cache_dir=None)
    cache = tmp_path / "cache"
    tokenize_documents(docs, tok, cache_dir=cache)
    entries = sorted(cache.glob("*.npz"))
    assert len(entries) == 2
    raw = bytearray(entries[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the stored ids: caught by the zip CRC
    entries[0].write_bytes(bytes(raw))
    entries[1].write_bytes(entries[1].read_bytes()[:20])  # truncated
    capsys.readouterr()
    again = tokenize_documents(docs, tok, cache_dir=cache)
    assert [a.tolist() for a in again] == [f.tolist() for f in fresh]
    assert capsys.readouterr().err.count("was corrupted; rebuilding it") == 2
    assert [a.tolist() for a in tokenize_documents(docs, tok, cache_dir=cache)] == [f.tolist() for f in fresh]


def test_enumerated_options_are_refused_before_any_work(tiny, tmp_path, monkeypatch):
    model, text = tiny
    no_work(monkeypatch)
    out = tmp_path / "out"
    finetune = ["finetune", str(model), "--data", str(text), "--target-length", "1024", "--out", str(out)]
    cases = {
        "mixed precision": ([*finetune, "--mixed-precision", "foo"], "--mixed-precision must be one of"),
        "report to": ([*finetune, "--report-to", "tensorbord"], "--report-to must be"),
        "base rule": ([*finetune, "--method", "base", "--base-rule", "men2023"], "did you mean 'men2024'"),
        "inner method": ([*finetune, "--method", "resonance", "--inner", "yarm"], "did you mean 'yarn'"),
        "convention": ([*eval_args(model, text, out), "--convention", "sliding"], "--convention must be one of"),
        "depths": (
            [*eval_args(model, text, out), "--tasks", "passkey", "--depths", "0,1.5"],
            "each --depths value must be a number in [0, 1]",
        ),
        "format": (
            ["analyze", "--preset", "llama2-7b", "--target-length", "8192", "--format", "jpg", "--out", str(out)],
            "png or svg",
        ),
    }
    for case, (args, expected) in cases.items():
        assert_one_line_error(runner.invoke(app, args), expected)
        assert not out.exists(), case


@pytest.mark.slow
def test_nan_model_eval_names_the_cell_and_still_writes_results(tmp_path):
    model = save_tiny_model(tmp_path / "nan-model", nan=True)
    text = write_text(tmp_path / "text.txt")
    out = tmp_path / "report"
    result = runner.invoke(app, eval_args(model, text, out, "--lengths", "16,32"))
    assert result.exit_code == 0, result.output
    assert "warning: as-saved · ppl @ 16: non-finite result (nan)" in result.stderr
    results = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert results["methods"]["as-saved"]["ppl"]["32"]["perplexity"] is None
    assert any("ppl @ 32: non-finite" in w for w in results["warnings"])
    plot_pixels(out / "ppl_vs_length.png")  # drawn from the finite cell
    assert "## Warnings" in (out / "report.md").read_text()


def test_convert_refuses_nan_weights_and_trailing_bytes(tmp_path):
    out = tmp_path / "out"
    ckpt, tok = write_llama2c(tmp_path / "nan", nan=True)
    assert_one_line_error(
        runner.invoke(app, ["convert", "llama2c", str(ckpt), str(tok), "--out", str(out)]), "NaN/inf values"
    )
    assert not out.exists()
    result = runner.invoke(app, ["convert", "llama2c", str(ckpt), str(tok), "--out", str(out), "--allow-non-finite"])
    assert result.exit_code == 0, result.output
    ckpt, tok = write_llama2c(tmp_path / "long", trailing=b"\0" * 12)
    assert_one_line_error(
        runner.invoke(app, ["convert", "llama2c", str(ckpt), str(tok), "--out", str(tmp_path / "o2")]),
        "12 unexpected bytes after the weights",
    )
    assert not (tmp_path / "o2").exists()


def test_python_api_type_errors_name_the_argument():
    from ropekit.plan.analysis.bounds import (
        base_for_bound,
        critical_dimension,
        extrapolation_bound,
        min_base_for_length,
    )

    spec = ropekit.RopeSpec.from_preset("llama2-7b")
    cases = [
        (lambda: ropekit.make_plan(spec, 8192, "dprope", threshold="x"), "threshold must be a number"),
        (lambda: ropekit.make_plan(spec, 8192, "longrope", factors="abc"), "factors must be a list of numbers"),
        (lambda: ropekit.make_plan(spec, 8192, "yarn", beta_fast="32"), "beta_fast must be a number"),
        (
            lambda: ropekit.make_plan(spec, 8192, "dprope", interpolated_dims=True),
            "interpolated_dims must be an integer",
        ),
        (lambda: ropekit.make_plan("llama2-7b", 8192, "pi"), "spec must be a RopeSpec"),
        (lambda: critical_dimension("x"), "spec must be a RopeSpec"),
        (lambda: extrapolation_bound(spec, base=0.5), "base must be a finite number > 1"),
        (lambda: base_for_bound(spec, -1), "bound must be a number of tokens above 2π"),
        (lambda: min_base_for_length(spec, 0), r"length \(tokens\) must be an integer in \[2, 4194304\]"),
        (lambda: min_base_for_length(spec, 10**12), r"length \(tokens\) must be an integer in \[2, 4194304\]"),
        (
            lambda: ropekit.make_plan(spec, 8192, "base", new_base=1.0),
            r"new_base \(--new-base\) must be a number in \(1, ",
        ),
    ]
    for call, expected in cases:
        with pytest.raises(RopekitError, match=expected):
            call()
    assert math.isclose(base_for_bound(spec, extrapolation_bound(spec)), spec.base, rel_tol=1e-12)  # still the inverse


def test_absurd_target_length_and_base_are_refused_at_once(tmp_path):
    from ropekit.plan.registry import MAX_TARGET_LENGTH

    for target in (10**12, 2**40, MAX_TARGET_LENGTH + 1):
        started = time.perf_counter()
        result = runner.invoke(
            app, ["plan", "--preset", "llama2-7b", "--target-length", str(target), "--out", str(tmp_path / "o")]
        )
        assert_one_line_error(result, "beyond ropekit's bound of 4,194,304 tokens")
        assert time.perf_counter() - started < 60  # the bug: minutes at 100% CPU (generous bound, not a timing test)
    for base in ("1", "0.5", "-3"):
        result = runner.invoke(
            app,
            [
                "plan",
                "--preset",
                "llama2-7b",
                "--target-length",
                "8192",
                "--method",
                "base",
                "--new-base",
                base,
                "--out",
                str(tmp_path / "o"),
            ],
        )
        assert_one_line_error(result, "new_base (--new-base) must be a number in (1, ")
    assert not (tmp_path / "o").exists()


def test_json_data_is_parsed_not_read_as_text(tmp_path):
    from ropekit.data.documents import read_documents

    texts = ["the cat sat", "a dog ran home"]
    (tmp_path / "docs.json").write_text(json.dumps([{"text": t} for t in texts]))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "strings.json").write_text(json.dumps(texts))
    expected = [t for _, t in read_documents(tmp_path / "docs.jsonl")]
    assert [t for _, t in read_documents(tmp_path / "docs.json")] == expected == texts
    assert [t for _, t in read_documents(tmp_path / "strings.json")] == texts
    (tmp_path / "bad.json").write_text(json.dumps([{"content": "x"}]))
    with pytest.raises(RopekitError, match="item 0 is neither a string nor an object with a string field 'text'"):
        read_documents(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('[{"text": "x"},')
    with pytest.raises(RopekitError, match="not valid JSON"):
        read_documents(tmp_path / "broken.json")


def test_mistyped_local_path_is_not_tried_on_the_hub(tiny, tmp_path, monkeypatch):
    import importlib

    geometry = importlib.import_module("ropekit.apply.readers")

    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path was sent to the hub")

    monkeypatch.setattr(geometry, "_config_dict_from_hub", no_hub)
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    model, text = tiny
    for args in (
        ["inspect", "out/s260kk"],
        ["plan", "--model", "out/s260kk", "--target-length", "8192"],
        eval_args("out/s260kk", text, tmp_path / "r"),
        ["extend", "out/s260kk", "--target-length", "1024", "--out", "x"],
    ):
        assert_one_line_error(runner.invoke(app, args), "out/s260kk: no such file or directory")


def test_hints_name_commands_that_exist(tiny, tmp_path):
    model, _ = tiny
    result = runner.invoke(
        app,
        [
            "analyze",
            "--preset",
            "llama2-7b",
            "--target-length",
            "8192",
            "--methods",
            "pi,longrope",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert_one_line_error(result, "ropekit plan --method longrope --factors-file")
    card = json.loads(runner.invoke(app, ["inspect", str(model), "--json"]).stdout)
    assert "--compare" not in card["next"] and "ropekit plan --model" in card["next"]


@pytest.mark.slow
def test_interrupted_finetune_exits_130_and_writes_the_loss_curve(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    text = write_text(tmp_path / "long.txt", words=3000)
    monkeypatch.setattr("ropekit.train.loop.any_rank", lambda accelerator, flag: True)  # as if Ctrl-C during step 1
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "finetune",
            str(model),
            "--data",
            str(text),
            "--target-length",
            "1024",
            "--train-length",
            "64",
            "--steps",
            "3",
            "--global-batch",
            "1",
            "--report-to",
            "none",
            "--out",
            str(out),
        ],
    )
    assert_one_line_error(result, "interrupted after step 1", code=130, after_work=True)
    curve = (out / "logs" / "loss_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,loss") and len(curve) == 2
    assert (
        json.loads((out / "ropekit.json").read_text())["written_by"] == "ropekit"
    )  # an earlier run --overwrite may replace
    again = runner.invoke(
        app, ["finetune", str(model), "--data", str(text), "--target-length", "1024", "--out", str(out)]
    )
    assert_one_line_error(again, "already holds a run; pass --resume to continue it, --overwrite to start it again")


@pytest.mark.slow
def test_eval_shows_tokens_scored_warns_on_short_documents_and_names_progress(tiny, tmp_path):
    model, _ = tiny
    text = write_text(tmp_path / "short.txt", words=3)  # ~15 characters: shorter than a 32-token window
    out = tmp_path / "r"
    result = runner.invoke(app, eval_args(model, text, out, "--lengths", "8,32"))
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    scored = results["methods"]["as-saved"]["ppl"]["32"]["tokens_scored"]
    assert "warning: 1 of 1 documents are shorter than the 32-token window" in result.stderr
    assert "as-saved · perplexity @ 32" in result.stderr and "eval: as-saved · ppl" in result.stderr
    assert f"({scored} tokens)" in (out / "report.md").read_text() and "tokens scored" in result.stdout


def test_summary_and_plot_helpers():
    from ropekit.eval.report import plain_number, text_colour
    from ropekit.eval.runner import best_by_length
    from ropekit.plan.plots import times_label

    rows = [
        {"method": m, "task": "ppl", "length": n, "value": v}
        for m, n, v in [
            ("none", 512, 9.0),
            ("pi", 512, 8.0),
            ("none", 1024, float("nan")),
            ("pi", 1024, 12.0),
            ("yarn", 1024, 11.0),
        ]
    ]
    rows += [
        {"method": m, "task": "passkey", "length": 512, "value": v}
        for m, v in [("none", 1.0), ("none", 0.0), ("pi", 0.75)]
    ]
    rows += [{"method": m, "task": "passkey", "length": 1024, "value": 0.0} for m in ("none", "pi")]
    assert best_by_length(rows) == [
        "best perplexity @ 512: pi (8)",
        "best perplexity @ 1024: yarn (11)",
        "best passkey accuracy @ 512: pi (75%)",
        "best passkey accuracy @ 1024: all methods tie (0%)",
    ]
    assert [times_label(v) for v in (1.0, 2.0, 4.0, 0.5)] == ["1×", "2×", "4×", "0.5×"]
    assert [plain_number(v) for v in (4.0, 12.5, 1000.0)] == ["4", "12.5", "1000"]
    import matplotlib

    cmap = matplotlib.colormaps["RdYlGn"]
    assert text_colour(cmap(0.0)) == "white" and text_colour(cmap(1.0)) == "white" and text_colour(cmap(0.5)) == "black"


def test_tied_weights_warning_of_accelerate_is_silenced():
    import logging

    import ropekit.train.loop  # noqa: F401  (installs the filter)

    logger = logging.getLogger("accelerate.utils.other")
    record = logger.makeRecord(
        logger.name,
        logging.WARNING,
        "other.py",
        403,
        "[RANK 0] Removed shared tensor {'lm_head.weight'} while saving.",
        (),
        None,
    )
    assert not logger.filter(record)
    other = logger.makeRecord(logger.name, logging.WARNING, "other.py", 1, "something else", (), None)
    assert logger.filter(other)


def test_damaged_files_beside_the_inputs_are_one_line(tiny, tmp_path):
    import shutil
    import struct

    model, text = tiny
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    (copy / "ropekit.json").write_text("{not json")
    assert_one_line_error(runner.invoke(app, ["inspect", str(copy)]), "ropekit.json: not a readable JSON file")
    factors = tmp_path / "factors.json"
    factors.write_text(json.dumps({"rope_scaling": [1.0, 2.0]}))
    result = runner.invoke(
        app,
        ["plan", "--preset", "llama2-7b", "--target-length", "8192", "--method", "longrope"]
        + ["--factors-file", str(factors)],
    )
    assert_one_line_error(result, "expected a list of numbers")
    ckpt, tok = write_llama2c(tmp_path / "odd")
    data = bytearray(ckpt.read_bytes())
    data[0:4], data[12:16], data[16:20] = struct.pack("<i", 6), struct.pack("<i", 2), struct.pack("<i", 2)
    ckpt.write_bytes(bytes(data))  # dim 6 over 2 heads: head dimension 3
    result = runner.invoke(app, ["convert", "llama2c", str(ckpt), str(tok), "--out", str(tmp_path / "o")])
    assert_one_line_error(result, "odd head dimension 3")
