"""`ropekit eval` on the real stories260K: report files, protocol recorded, and clean refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import plot_pixels, require_asset
from ropekit.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def s260k(llama_model_dir):
    """stories260K converted, or a random-weight model of its shape without ../shared."""
    return str(llama_model_dir)


@pytest.mark.slow
def test_eval_compares_methods_and_writes_report(s260k, tmp_path):
    require_asset("stories260K/stories260K.bin")  # the perplexity claims below need the trained model
    text = require_asset("text/tinystories/tinystories_val_head.txt")
    out = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "eval",
            s260k,
            "--tasks",
            "ppl,longppl,passkey",
            "--lengths",
            "256,4096",
            "--method",
            "none",
            "--method",
            "dprope",
            "--data",
            str(text),
            "--max-tokens",
            "4096",
            "--trials",
            "1",
            "--depths",
            "0,1",
            "--short-length",
            "256",
            "--longppl-window",
            "128",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["convention"] == "strided" and results["config"]["stride"] == 256
    none, dprope = results["methods"]["none"]["ppl"], results["methods"]["dprope"]["ppl"]
    assert none["256"]["tokens_scored"] == dprope["256"]["tokens_scored"] == 16 * 255  # stride = window: disjoint
    # stories260K was trained at 512: without scaling, perplexity at 8× that blows up; dprope stays bounded
    assert none["4096"]["perplexity"] > 2 * dprope["4096"]["perplexity"]
    assert results["methods"]["dprope"]["plan"]["target_length"] == 4096
    assert set(results["methods"]["none"]["passkey"]["accuracy"]) == {"256@0", "256@1", "4096@0", "4096@1"}
    for name in ("ppl_vs_length.png", "passkey_heatmaps.png"):
        plot_pixels(out / name)
    report = (out / "report.md").read_text()
    assert "| none |" in report and "| dprope |" in report
    longppl = results["methods"]["dprope"]["longppl"]
    assert set(longppl) == {"4096"} and longppl["4096"]["short_length"] == 256 and longppl["4096"]["key_tokens"] > 0
    assert (longppl["4096"]["sliding_window"], longppl["4096"]["beta"]) == (128, -2.0)
    assert longppl["4096"]["evaluator"].startswith("self") and longppl["4096"]["protocol"] == "longppl/3"
    assert "## LongPPL" in report
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 2 * (2 + 1 + 4)


@pytest.mark.slow
def test_eval_ruler_records_protocol_and_skipped_tasks(s260k, story_text, tmp_path):
    text = story_text
    out = tmp_path / "ruler"
    result = runner.invoke(
        app,
        [
            "eval",
            s260k,
            "--tasks",
            "ruler",
            "--ruler-tasks",
            "niah_single_1,niah_single_2,qa_1",
            "--lengths",
            "1024",
            "--method",
            "none",
            "--trials",
            "1",
            "--ruler-essay",
            str(text),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    ruler = json.loads((out / "results.json").read_text())["methods"]["none"]["ruler"]
    assert set(ruler["score"]) == set(ruler["sizes"]) == {"niah_single_1@1024", "niah_single_2@1024"}
    assert all(0.0 <= v <= 100.0 for v in ruler["score"].values())
    assert ruler["protocol"] == "ruler/3" and ruler["prompts"] == "ropekit wording" and ruler["essay"] == str(text)
    report = (out / "report.md").read_text()
    assert "## RULER" in report and "qa_1 skipped" in report


@pytest.mark.slow
def test_eval_longbench_from_local_files(s260k, tmp_path):
    from pathlib import Path

    fixture = Path(__file__).parents[1] / "fixtures" / "longbench_e"
    out = tmp_path / "lb"
    result = runner.invoke(
        app,
        [
            "eval",
            s260k,
            "--tasks",
            "longbench",
            "--longbench-dir",
            str(fixture),
            "--longbench-datasets",
            "hotpotqa,trec",
            "--lengths",
            "512",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    lb = json.loads((out / "results.json").read_text())["methods"]["as-saved"]["longbench"]
    assert lb["window"] == 512 and set(lb["scores"]) == set(lb["bucket_sizes"]) == {"hotpotqa", "trec"}
    assert set(lb["scores"]["trec"]) == {"0-4k", "8k+"} and all(0 <= r["score"] <= 100 for r in lb["rows"])
    assert "## LongBench-E, as-saved" in (out / "report.md").read_text()


def test_eval_bad_inputs_exit_2_without_results(s260k, story_text, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    garbled = tmp_path / "garbled.txt"
    garbled.write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "lb").mkdir()  # an input folder: the outputs below must not be inside it
    nofield = tmp_path / "x.jsonl"
    nofield.write_text(json.dumps({"content": "hi"}) + "\n")
    good = str(story_text)
    cases = {
        "empty file": (["--data", str(empty)], "empty"),
        "garbled": (["--data", str(garbled)], "UTF-8"),
        "jsonl without text": (["--data", str(nofield)], "'text'"),
        "beyond limit": (["--data", good, "--lengths", "4096"], "beyond"),
        "no data": ([], "the ppl task needs --data"),
        "unknown task": (["--tasks", "ppl,bogus", "--data", good], "unknown task"),
        "unknown ruler task": (["--tasks", "ruler", "--ruler-tasks", "niah_singel"], "did you mean"),
        "longbench without dir": (["--tasks", "longbench"], "--longbench-dir"),
        "longbench bad dataset": (
            ["--tasks", "longbench", "--longbench-dir", str(garbled.parent / "lb"), "--longbench-datasets", "trek"],
            "did you mean",
        ),
        "ruler task too long": (["--tasks", "ruler", "--ruler-tasks", "vt", "--lengths", "128"], "does not fit"),
        "method option, no method": (["--data", good, "--beta-fast", "8"], "needs --method"),
        "option of no method given": (["--data", good, "--method", "pi", "--beta-fast", "8"], "does not apply to any"),
    }
    for case, (args, expected) in cases.items():
        out = tmp_path / f"out-{case.replace(' ', '_')}"
        result = runner.invoke(app, ["eval", s260k, "--out", str(out), *args])
        assert result.exit_code == 2, (case, result.output)
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, (case, result.stderr)
        assert not (out / "results.json").exists(), case


@pytest.mark.slow
def test_eval_applies_method_options_to_the_methods_that_take_them(s260k, tmp_path):
    import ropekit

    text = str(require_asset("text/tinystories/tinystories_val_head.txt"))
    out = tmp_path / "report"
    args = ["eval", s260k, "--lengths", "256", "--target-length", "1024", "--data", text, "--max-tokens", "256"]
    result = runner.invoke(app, [*args, "--method", "yarn", "--method", "pi", "--beta-fast", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    methods = json.loads((out / "results.json").read_text())["methods"]
    spec = ropekit.RopeSpec.from_pretrained(s260k)
    assert methods["yarn"]["plan"]["factors"] == list(ropekit.make_plan(spec, 1024, "yarn", beta_fast=8.0).factors)
    assert methods["yarn"]["plan"]["factors"] != list(ropekit.make_plan(spec, 1024, "yarn").factors)
    assert methods["pi"]["plan"]["factors"] == [2.0] * spec.num_pairs


@pytest.mark.slow
def test_eval_bins_reaches_the_plan_and_is_recorded(s260k, tmp_path):
    """--bins K changes dprope's per-pair choice as in `make_plan(..., bins=K)`; results.json records K."""
    import ropekit

    text = str(require_asset("text/tinystories/tinystories_val_head.txt"))
    out = tmp_path / "report"
    args = ["eval", s260k, "--lengths", "256", "--target-length", "1024", "--data", text, "--max-tokens", "256"]
    result = runner.invoke(app, [*args, "--method", "dprope", "--bins", "36", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "results.json").read_text())["methods"]["dprope"]["plan"]
    spec = ropekit.RopeSpec.from_pretrained(s260k)
    expected = ropekit.make_plan(spec, 1024, "dprope", bins=36)
    assert plan["factors"] == list(expected.factors) and plan["bins"] == 36
    assert plan["disturbance"] == pytest.approx(expected.disturbance)
    assert plan["factors"] != list(ropekit.make_plan(spec, 1024, "dprope").factors)  # K = 360 chooses otherwise


@pytest.mark.slow
def test_eval_through_the_entry_point(small_model, small_text, tmp_path):
    """The one subprocess smoke test of `ropekit eval` (the others run in-process): the installed entry point
    writes the report, prints the table, and names the evaluation store on stderr."""
    import subprocess
    import sys

    out, store = tmp_path / "report", tmp_path / "cells.sqlite"
    args = ["eval", str(small_model), "--data", str(small_text), "--lengths", "32,64", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "ropekit.cli.main", *args, "--store", str(store)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]["as-saved"]["ppl"]) == {"32", "64"} and results["store"]["measured"] == 2
    assert f"evaluation store: {store} (0 cells stored)" in proc.stderr and "as-saved" in proc.stdout
