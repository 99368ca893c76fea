"""Issue 25's plumbing through the engine: `--longppl-coverage` reaches `long_ppl` (the documented token
counts of each coverage), and report.md states the RULER generator, LongBench-E's bucket rule and LongPPL's
scored tokens and offsets with the values results.json holds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from ropekit.cli.main import app
from ropekit.data.documents import read_documents, tokenize_documents
from ropekit.eval.longbench import LongBenchResult
from ropekit.eval.longppl import COVERAGES
from ropekit.eval.ruler import DEVIATIONS, RulerResult
from ropekit.eval.ruler_text import splitter_record, words_record
from ropekit.eval.tasks import longbench, ruler

runner = CliRunner()
SHORT, WINDOW, LENGTH, MAX_TOKENS = 64, 32, 128, 300


def longppl_args(model, text, out, *extra: str) -> list[str]:
    return [
        "eval", str(model), "--tasks", "longppl", "--lengths", str(LENGTH), "--short-length", str(SHORT),
        "--longppl-window", str(WINDOW), "--data", str(text), "--max-tokens", str(MAX_TOKENS),
        "--store", str(out.parent / "cells.sqlite"), "--out", str(out), *extra,
    ]  # fmt: skip


def documented_tokens(documents, coverage: str) -> int:
    """Tokens past the short context that LongPPL considers, from the docstring of each coverage: disjoint
    windows of LENGTH across each whole document, or each document's first LENGTH − 1 tokens."""
    if coverage == "official":
        windows = [len(doc[: LENGTH - 1]) for doc in documents]
    else:
        windows = [min(LENGTH, len(doc) - start) for doc in documents for start in range(0, len(doc), LENGTH)]
    return sum(n - SHORT for n in windows if n > SHORT)


@pytest.mark.parametrize("coverage", ["disjoint", "official"])
def test_longppl_coverage_reaches_long_ppl_with_the_documented_token_counts(
    coverage, small_model, small_text, llama_tokenizer, tmp_path
):
    out = tmp_path / coverage
    args = longppl_args(small_model, small_text, out)
    result = runner.invoke(app, args if coverage == "disjoint" else [*args, "--longppl-coverage", "official"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    cell = results["methods"]["as-saved"]["longppl"][str(LENGTH)]
    documents = [doc[:MAX_TOKENS] for doc in tokenize_documents(read_documents(str(small_text)), llama_tokenizer)]
    assert cell["tokens_considered"] == documented_tokens(documents, coverage) > 0
    assert results["config"]["longppl_coverage"] == cell["coverage"] == coverage
    assert cell["scored"] == COVERAGES[coverage]
    assert f"Scored: {COVERAGES[coverage]}." in (out / "report.md").read_text()
    assert "Token positions from each tokenizer's offsets" not in (out / "report.md").read_text()  # no evaluator


def test_the_two_coverages_differ_on_these_documents(small_text, llama_tokenizer):
    documents = [doc[:MAX_TOKENS] for doc in tokenize_documents(read_documents(str(small_text)), llama_tokenizer)]
    assert documented_tokens(documents, "disjoint") > documented_tokens(documents, "official")


def test_longppl_coverage_is_checked_and_in_help(small_model, small_text, tmp_path):
    bad = runner.invoke(app, [*longppl_args(small_model, small_text, tmp_path / "x"), "--longppl-coverage", "offical"])
    assert bad.exit_code == 2 and "did you mean 'official'" in bad.stderr and not (tmp_path / "x").exists()
    shown = " ".join(runner.invoke(app, ["eval", "--help"], terminal_width=400).stdout.split())
    assert (
        "longppl: which tokens are scored: disjoint windows across each whole document (ropekit), or official: "
        "each document's first LENGTH − 1 tokens, as PKU-ML/LongPPL's perplexity.py (default disjoint)."
    ) in shown.replace("│ ", "").replace(" │", "")


@pytest.mark.slow
def test_longppl_with_an_evaluator_states_the_offset_fallback_count(small_model, small_text, tmp_path):
    out = tmp_path / "evaluated"
    result = runner.invoke(app, [*longppl_args(small_model, small_text, out), "--evaluator", str(small_model)])
    assert result.exit_code == 0, result.output
    cell = json.loads((out / "results.json").read_text())["methods"]["as-saved"]["longppl"][str(LENGTH)]
    assert cell["evaluator"] == str(small_model) and cell["offsets"] is not None
    report = (out / "report.md").read_text()
    assert (
        f"Token positions from each tokenizer's offsets; {cell['offset_fallback_tokens']} tokens past the short "
        "context matched by decoded widths."
    ) in report
    assert f"evaluator {small_model}" in report


def test_ruler_report_names_the_generator_and_its_differences():
    entry = RulerResult(tasks=["niah_single_1"], lengths=[1024], samples=1, seed=0, score={"niah_single_1@1024": 50.0})
    results = {"config": {"trials": 1}, "methods": {"none": {"ruler": entry.as_dict()}}}
    lines = ruler.report(results, ruler.rows("none", entry.as_dict()))
    expected = (
        f"Samples follow NVIDIA/RULER's generator ({words_record()}; {splitter_record()}). "
        f"Differences: {'; '.join(DEVIATIONS)}."
    )
    assert expected in lines and "wonderwords" in expected and "Punkt" in expected
    assert "| none | niah_single_1 | 50.00 |" in lines  # RULER's two decimals


def test_longbench_report_states_scorer_e_and_the_examples_per_bucket():
    entry = LongBenchResult(window=512, max_length=500, chat_template=False, prompts="p", budgets="b")
    entry.bucket_sizes = {"trec": {"0-4k": 3, "4-8k": 0, "8k+": 1}, "hotpotqa": {"0-4k": 2, "4-8k": 1, "8k+": 0}}
    entry.scores = {"trec": {"0-4k": 14.37, "8k+": 100.0}, "hotpotqa": {"0-4k": 50.0, "4-8k": 0.0}}
    entry.average = {"0-4k": 32.185, "4-8k": 0.0, "8k+": 100.0}
    results = {"methods": {"as-saved": {"longbench": entry.as_dict()}}}
    lines = longbench.report(results, [])
    assert (
        "Bucket scores as LongBench's scorer_e, round(100 · mean, 2); buckets without examples are left out "
        "(scorer_e would write NaN). Examples per bucket: trec 0-4k 3, 4-8k 0, 8k+ 1; hotpotqa 0-4k 2, 4-8k 1, "
        "8k+ 0."
    ) in lines
    assert "| trec | 14.37 | — | 100.00 |" in lines


def test_tasks_measured_in_parts_keep_every_part_of_their_per_cell_records():
    """RULER's searched sizes and LongBench-E's bucket sizes come one cell at a time: the method's entry holds
    all of them (not the first cell's only)."""
    parts = [
        {"sizes": {"niah_single_1@512": 10}, "score": {"niah_single_1@512": 1.0}, "rows": [1]},
        {"sizes": {"vt@512": 20}, "score": {"vt@512": 2.0}, "rows": [2]},
    ]
    run = SimpleNamespace(inputs=SimpleNamespace(tasks=["niah_single_1", "vt"], skipped={}), lengths=[512])
    entry = ruler.collect(run, [({}, p) for p in parts])
    assert entry["sizes"] == {"niah_single_1@512": 10, "vt@512": 20} and entry["rows"] == [1, 2]
    lb_parts = [
        {"scores": {"trec": {"0-4k": 10.0}}, "bucket_sizes": {"trec": {"0-4k": 1, "4-8k": 0, "8k+": 0}}, "rows": []},
        {"scores": {"hotpotqa": {"0-4k": 30.0}}, "bucket_sizes": {"hotpotqa": {"0-4k": 2, "4-8k": 0, "8k+": 0}}, "rows": []},
    ]  # fmt: skip
    merged = longbench.collect(SimpleNamespace(), [({}, p) for p in lb_parts])
    assert set(merged["bucket_sizes"]) == {"trec", "hotpotqa"} and merged["average"] == {"0-4k": 20.0}
