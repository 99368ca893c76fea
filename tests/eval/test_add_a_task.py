"""Adding an evaluation task takes one options dataclass, one measuring function and one record (the README's
example): `ropekit eval --tasks NAME` runs it, its option is a CLI option, its rows reach results.json,
results.csv and report.md, and its cells go through the evaluation store like every other task's."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from ropekit.cli.main import app

# --- README "Adding an eval task" (keep the two in step) ---
from ropekit.domains import Domain
from ropekit.eval.registry import Task, TaskOptions, option, register_task, row


@dataclass(frozen=True)
class Top1Options(TaskOptions):
    top1_positions: int = option(
        16, "positions scored at the end of each window", unit="tokens", domain=Domain(1, integer=True)
    )


def next_token_accuracy(scorer, run, cell) -> dict:
    """Share of the last k positions of each document's first `length` tokens whose argmax is the next token."""
    n, k = cell["length"], run.options.top1_positions
    hits = 0
    for doc in run.documents:
        ids = [int(t) for t in doc[:n]]
        hits += sum(p == t for p, t in zip(scorer.next_token_argmax(ids[:-1], last=k), ids[-k:]))
    return {"accuracy": hits / (k * len(run.documents)), "positions": k * len(run.documents)}


TOP1 = Task(
    "top1",
    "next-token accuracy at the end of each window",
    Top1Options,
    next_token_accuracy,
    rows=lambda method, entry: [row(method, "top1", r["accuracy"], length=int(n)) for n, r in entry.items()],
    uses_documents=True,
    better="higher",
    metric="next-token accuracy",
)
# register_task(TOP1)
# # now: ropekit eval MODEL --tasks ppl,top1 --top1-positions 32 --lengths 256,1024 --data DOCS
# --- end of the README example ---

runner = CliRunner()


def eval_flags() -> set[str]:
    """The flags `ropekit eval` takes now (as its --help lists them)."""
    import typer

    command = typer.main.get_command(app).commands["eval"]  # type: ignore[attr-defined]
    return {flag for param in command.params for flag in param.opts}


@pytest.fixture
def registered():
    register_task(TOP1)
    try:
        yield TOP1
    finally:
        from ropekit.eval.registry import unregister_task

        unregister_task("top1")


def naive_accuracy(model, documents: list[list[int]], n: int, k: int) -> float:
    """The same quantity from full logits of one forward pass per window (no ropekit code)."""
    hits = total = 0
    for ids in documents:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[: n - 1]])).logits[0]  # (n − 1, V)
        hits += int((logits[-k:].argmax(-1) == torch.tensor(ids[n - k : n])).sum())
        total += k
    return hits / total


@pytest.mark.slow
def test_a_registered_task_runs_through_the_cli_with_its_option(registered, small_model, small_text, tmp_path):
    assert "--top1-positions" in eval_flags()
    out = tmp_path / "report"
    args = ["eval", str(small_model), "--tasks", "ppl,top1", "--lengths", "64,128", "--data", str(small_text)]
    args += ["--max-tokens", "128", "--top1-positions", "24", "--store", str(tmp_path / "s.sqlite"), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    entry = results["methods"]["as-saved"]["top1"]
    assert results["config"]["top1_positions"] == 24 and set(entry) == {"64", "128"}

    from ropekit.apply.extend import load_model, load_tokenizer
    from ropekit.data.documents import read_documents, tokenize_documents

    documents = [
        d[:128].tolist() for d in tokenize_documents(read_documents(small_text), load_tokenizer(str(small_model)))
    ]
    model = load_model(str(small_model), dtype="float32")
    for n in (64, 128):
        assert entry[str(n)]["accuracy"] == pytest.approx(naive_accuracy(model, documents, n, 24), abs=1e-12)
    csv_rows = [r for r in csv.DictReader((out / "results.csv").open()) if r["task"] == "top1"]
    assert [float(r["value"]) for r in csv_rows] == [entry["64"]["accuracy"], entry["128"]["accuracy"]]
    assert "## top1 (next-token accuracy)" in (out / "report.md").read_text()  # the generic section

    again = runner.invoke(app, [*args, "--overwrite"])  # every cell is in the store: nothing measured
    assert again.exit_code == 0 and "cells: 0 measured, 4 read from the evaluation store" in again.stderr


def test_its_option_is_checked_and_refused_without_the_task(registered, tmp_path):
    base = ["eval", str(tmp_path), "--lengths", "64", "--data", str(tmp_path), "--max-tokens", "64"]  # refused first
    low = runner.invoke(app, [*base, "--tasks", "top1", "--top1-positions", "0"])
    assert low.exit_code == 2 and "--top1-positions must be an integer ≥ 1, got 0" in low.stderr
    other = runner.invoke(app, [*base, "--tasks", "ppl", "--top1-positions", "8"])
    assert other.exit_code == 2 and "--top1-positions is for the top1 task, which this run leaves out" in other.stderr


def test_unregistering_removes_the_task_and_its_option(tmp_path):
    register_task(TOP1)
    from ropekit.eval.registry import TASKS, unregister_task

    unregister_task("top1")
    assert "top1" not in TASKS and "--top1-positions" not in eval_flags()
    base = ["eval", str(tmp_path), "--lengths", "64", "--data", str(tmp_path)]  # refused before any file is read
    unknown = runner.invoke(app, [*base, "--tasks", "top1"])
    assert unknown.exit_code == 2 and "unknown task 'top1'" in unknown.stderr
    gone = runner.invoke(app, [*base, "--top1-positions", "8"])
    assert gone.exit_code == 2 and "No such option" in gone.output


def test_two_tasks_defining_one_option_differently_are_refused():
    from ropekit.errors import RopekitError

    @dataclass(frozen=True)
    class Clash(TaskOptions):
        stride: int = option(128, "another stride")  # ppl's --stride defaults to 256

    with pytest.raises(RopekitError, match="define option 'stride' differently"):
        register_task(Task("clash", "x", Clash, next_token_accuracy, rows=lambda m, e: []))
    from ropekit.eval.registry import TASKS

    assert "clash" not in TASKS


def test_the_readme_shows_this_example():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("### Adding an eval task", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    here = Path(__file__).read_text().split("# --- README", 1)[1].split("# --- end", 1)[0]
    example = [line.removeprefix("# ") for line in here.splitlines()[1:]]
    shown = [line for line in block.splitlines() if not line.startswith(("import ", "from dataclasses"))]
    assert [line for line in example if line.strip()] == [line for line in shown if line.strip()]
