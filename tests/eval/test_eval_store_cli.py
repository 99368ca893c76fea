"""`ropekit eval` measures every cell through the evaluation store: an interrupted run resumes without
measuring anything twice (counted in forward passes), identical plans share cells, --fresh measures
again, and two processes sharing one store do not corrupt it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from ropekit.cli.main import app
from ropekit.eval.backend import TransformersBackend

runner = CliRunner()


def eval_args(model: Path, text: Path, store: Path, *extra: str) -> list[str]:
    """ppl and nll at one length: 2 cells per plan."""
    args = ["eval", str(model), "--tasks", "ppl,nll", "--lengths", "64", "--target-length", "1024"]
    return [*args, "--data", str(text), "--max-tokens", "64", "--retention", "16", "--store", str(store), *extra]


def count_forward_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """[passes]: decoder forward passes of every model the transformers backend loads from now on."""
    passes = [0]
    load = TransformersBackend._load_model

    def counting(self: TransformersBackend) -> torch.nn.Module:
        model = load(self)
        model.get_decoder().register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
        return model

    monkeypatch.setattr(TransformersBackend, "_load_model", counting)
    return passes


def measured(results: dict) -> dict:
    return {m: {k: v for k, v in e.items() if k != "plan"} for m, e in results["methods"].items()}


@pytest.mark.slow
def test_an_interrupted_eval_resumes_and_measures_nothing_twice(small_model, small_text, tmp_path, monkeypatch):
    methods = ["--method", "none", "--method", "pi"]  # cells in order: none ppl, nll; pi ppl, nll
    reference = runner.invoke(
        app, eval_args(small_model, small_text, tmp_path / "ref.sqlite", *methods, "--out", str(tmp_path / "ref"))
    )
    assert reference.exit_code == 0, reference.output

    import ropekit.eval.tasks.nll as nll_task

    calls = []
    original = nll_task.position_nll

    def interrupt_on_the_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # pi's nll: 3 cells are done
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    store, out = tmp_path / "cells.sqlite", tmp_path / "report"
    with monkeypatch.context() as patch:
        patch.setattr(nll_task, "position_nll", interrupt_on_the_second)
        stopped = runner.invoke(app, eval_args(small_model, small_text, store, *methods, "--out", str(out)))
    assert stopped.exit_code == 130 and not out.exists()
    assert f"interrupted; the cells measured in this run (3) are kept in the evaluation store {store}" in stopped.stderr

    passes = count_forward_passes(monkeypatch)
    resumed = runner.invoke(app, eval_args(small_model, small_text, store, *methods, "--out", str(out)))
    assert resumed.exit_code == 0, resumed.output
    assert "cells: 1 measured, 3 read from the evaluation store" in resumed.stderr
    resumed_passes = passes[0]
    passes[0] = 0
    only_pi_nll = runner.invoke(
        app, eval_args(small_model, small_text, tmp_path / "pi.sqlite", "--method", "pi", "--tasks", "nll")
    )
    assert only_pi_nll.exit_code == 0 and resumed_passes == passes[0] > 0  # exactly the missing cell's passes
    results = json.loads((out / "results.json").read_text())
    assert measured(results) == measured(json.loads((tmp_path / "ref" / "results.json").read_text()))
    assert results["store"] == {"path": str(store), "measured": 1, "reused": 3}

    passes[0] = 0
    again = runner.invoke(app, eval_args(small_model, small_text, store, *methods))
    assert again.exit_code == 0 and passes[0] == 0 and "cells: 0 measured, 4 read" in again.stderr


@pytest.mark.slow
def test_identical_plans_share_cells_and_fresh_measures_again(small_model, small_text, tmp_path, monkeypatch):
    """ntk with α = 1 leaves every frequency as it is: the same plan as none, measured once."""
    passes = count_forward_passes(monkeypatch)
    store = tmp_path / "cells.sqlite"
    args = eval_args(small_model, small_text, store, "--method", "none", "--method", "ntk", "--alpha", "1")
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "cells: 2 measured, 2 read from the evaluation store" in result.stderr
    methods = json.loads((tmp_path / "r" / "results.json").read_text())["methods"]
    assert methods["ntk"]["plan"]["factors"] == methods["none"]["plan"]["factors"]
    assert measured({"methods": {"x": methods["none"]}}) == measured({"methods": {"x": methods["ntk"]}})
    first = passes[0]
    fresh = runner.invoke(app, [*args, "--fresh"])
    assert fresh.exit_code == 0 and "cells: 2 measured, 2 read" in fresh.stderr and passes[0] == 2 * first
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 2  # replaced, not added


def test_the_default_store_lives_in_ropekits_cache(small_model, small_text, tmp_path, monkeypatch):
    monkeypatch.setenv("ROPEKIT_CACHE", str(tmp_path / "cache"))
    args = ["eval", str(small_model), "--lengths", "32", "--data", str(small_text), "--max-tokens", "32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    store = tmp_path / "cache" / "eval" / "cells.sqlite"
    assert f"evaluation store: {store} (0 cells stored)" in result.stderr and store.is_file()


def _evaluate_in_a_process(model: str, text: str, store: str, methods: list[str], out: str) -> None:
    from ropekit.eval.runner import EvalConfig, evaluate

    cfg = EvalConfig(model, Path(out), tasks=["ppl", "nll"], lengths=[32, 64], methods=methods, target_length=1024)
    cfg.data = text
    cfg.max_tokens, cfg.options, cfg.store, cfg.progress = 64, {"retention": (16,)}, Path(store), False
    evaluate(cfg)


@pytest.mark.slow
def test_two_processes_sharing_one_store_do_not_corrupt_it(small_model, small_text, tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    store = tmp_path / "cells.sqlite"
    jobs = [
        context.Process(
            target=_evaluate_in_a_process,
            args=(str(small_model), str(small_text), str(store), methods, str(tmp_path / f"r{i}")),
        )
        for i, methods in enumerate((["none", "pi", "yarn"], ["yarn", "pi", "ntk"]))
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=600)
        assert job.exitcode == 0
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 4 * 4  # none, pi, yarn, ntk
    first, second = (json.loads((tmp_path / f"r{i}" / "results.json").read_text()) for i in range(2))
    for method in ("pi", "yarn"):  # measured by one process, or by both with the first stored value kept
        assert measured(first)[method] == measured(second)[method]
