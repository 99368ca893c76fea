"""Task `passkey`: retrieval of a seeded key over a grid of length × needle depth, one cell per
(length, depth) (`ropekit.eval.passkey`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropekit.errors import RopekitError
from ropekit.eval.backend import GENERATE, LOGPROBS, Scorer
from ropekit.eval.passkey import (
    DEPTH,
    PROTOCOL,
    SCORERS,
    STYLES,
    build_prompt,
    collect_passkey,
    other_scorer,
    passkey_cell,
    task_line_for,
)
from ropekit.eval.report import plot_passkey_heatmaps
from ropekit.eval.tasks.record import Cell, Row, Task, TaskRun, Trials, option, row


@dataclass(frozen=True)
class PasskeyOptions(Trials):
    depths: tuple[float, ...] = option((0.0, 0.25, 0.5, 0.75, 1.0), "needle depths", domain=DEPTH, nonempty=True)
    passkey_scorer: str = option(
        "generation",
        "generation (greedy, first integer) or teacher-forced (every answer token the argmax)",
        choices=SCORERS,
    )
    passkey_style: str = option("yarn", "prompt: yarn (task line, newline joins) or compact", choices=STYLES)
    passkey_task_file: str | None = option(
        None, "text file with the task line", path=True, shown_default="ropekit's wording"
    )


def prepare(run: TaskRun[PasskeyOptions]) -> tuple[str, str]:
    """(task line, its source); refuses, before any weights load, a prompt that cannot fit the shortest length."""
    o = run.options
    task_line, source = task_line_for(o.passkey_style, o.passkey_task_file)
    try:
        build_prompt(run.tokenizer, min(run.lengths), 0.0, 12345, style=o.passkey_style, task_line=task_line)
    except RopekitError as exc:
        raise RopekitError(f"passkey at {min(run.lengths)} tokens: {exc}; use longer --lengths") from None
    return task_line, source


def cells(run: TaskRun[PasskeyOptions]) -> list[Cell]:
    """One per (length, depth), length-major; `first_trial` places the cell's trials in the grid (which
    trials the other scorer checks)."""
    grid = [(n, d) for n in run.lengths for d in run.options.depths]
    return [{"length": n, "depth": d, "first_trial": i * run.options.trials} for i, (n, d) in enumerate(grid)]


def measure(scorer: Scorer, run: TaskRun[PasskeyOptions], cell: Cell) -> dict[str, Any]:
    o = run.options
    return passkey_cell(
        scorer,
        run.tokenizer,
        length=cell["length"],
        depth=cell["depth"],
        trials=o.trials,
        seed=o.seed,
        scorer=o.passkey_scorer,
        style=o.passkey_style,
        task_line=run.inputs[0],
        first_trial=cell["first_trial"],
        progress=run.progress,
        label=run.label,
    )


def collect(run: TaskRun[PasskeyOptions], measured: list[tuple[Cell, Any]]) -> dict[str, Any]:
    o = run.options
    result = collect_passkey(
        [value for _, value in measured],
        lengths=run.lengths,
        depths=o.depths,
        trials=o.trials,
        seed=o.seed,
        scorer=o.passkey_scorer,
        style=o.passkey_style,
        task_source=run.inputs[1],
    )
    return result.as_dict()


def rows(method: str, entry: dict[str, Any]) -> list[Row]:
    out = []
    for cell, accuracy in entry["accuracy"].items():
        n, d = cell.split("@")
        out.append(row(method, "passkey", accuracy, length=int(n), depth=float(d), convention=entry["scorer"]))
    return out


def report(results: dict[str, Any], rows: list[Row]) -> list[str]:
    lines = []
    for method, entry in results["methods"].items():
        pk = entry.get("passkey")
        if pk:
            mean = sum(pk["accuracy"].values()) / len(pk["accuracy"])
            agree = (
                f"; agreement with the {other_scorer(pk['scorer'])} scorer {pk['agreement']:.0%} "
                f"on {pk['agreement_trials']} trials"
                if pk.get("agreement") is not None
                else ""
            )
            lines.append(
                f"- passkey, {method}: mean accuracy {mean:.0%} ({pk['scorer']}, {pk['trials']} trials per cell{agree})"
            )
    return [*lines, ""] if lines else []


def plot(results: dict[str, Any], rows: list[Row], directory: Path) -> Path:
    return plot_passkey_heatmaps(results, directory / "passkey_heatmaps.png")


TASK = Task(
    "passkey",
    "passkey retrieval over a grid of --lengths × --depths (yarn's prompt; generation or teacher-forced scorer)",
    PasskeyOptions,
    measure,
    rows,
    cells=cells,
    collect=collect,
    prepare=prepare,
    report=report,
    plot=plot,
    needs=frozenset({LOGPROBS, GENERATE}),
    protocol=PROTOCOL,
    better="higher",
    metric="passkey accuracy",
    value_format="{:.0%}",
)
