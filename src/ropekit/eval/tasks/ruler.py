"""Task `ruler`: RULER's synthetic tasks, one cell per (RULER task, length) (`ropekit.eval.ruler`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ropekit.errors import RopekitError
from ropekit.eval.backend import TRANSFORMERS, Scorer
from ropekit.eval.ruler import PROTOCOL, make_sample, read_essay, run_ruler, runnable_tasks
from ropekit.eval.ruler import TASKS as RULER_TASKS
from ropekit.eval.ruler import get_task as get_ruler_task
from ropekit.eval.ruler_qa import load_qa
from ropekit.eval.store import path_fingerprint
from ropekit.eval.tasks.record import Cell, Row, Task, TaskRun, Trials, first_entry, merged, option, row


@dataclass(frozen=True)
class RulerOptions(Trials):
    ruler_tasks: tuple[str, ...] = option(
        tuple(RULER_TASKS),
        "RULER's tasks to run: niah_single_1 … niah_multiquery, vt, cwe, fwe, qa_1, qa_2",
        choices=tuple(RULER_TASKS),
        nonempty=True,
        shown_default=f"all {len(RULER_TASKS)}",
    )
    ruler_essay: str | None = option(None, "essay haystack, a text file or folder", path=True, shown_default="--data")
    ruler_qa_dir: str | None = option(
        None,
        "folder with SQuAD / HotpotQA files for qa_1 / qa_2",
        path=True,
        shown_default="none, and qa_1 / qa_2 are skipped",
    )


@dataclass(frozen=True)
class Inputs:
    essay_path: str | None  # --ruler-essay, else --data
    essay_sha256: str | None  # of the essay's files: part of every cell's key
    tasks: list[str]  # the runnable tasks, in the order asked
    skipped: dict[str, str]  # task → why it cannot run


def prepare(run: TaskRun[RulerOptions]) -> Inputs:
    """The runnable tasks; refuses, before any weights load, a task whose prompt cannot fit the shortest length."""
    o = run.options
    essay_path = o.ruler_essay or run.data
    essay = read_essay(essay_path)
    tasks, skipped = runnable_tasks(list(o.ruler_tasks), essay=essay, qa_dir=o.ruler_qa_dir)
    if not tasks:
        raise RopekitError("no RULER task could run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    shortest = min(run.lengths)
    for task in tasks:
        qa = load_qa(o.ruler_qa_dir, task.dataset) if task.kind == "qa" else None  # a bad file: its own error
        try:
            make_sample(task, run.tokenizer, shortest, 0, essay=essay, qa=qa)
        except RopekitError:
            raise RopekitError(
                f"RULER task {task.name} does not fit in {shortest} tokens with this tokenizer; "
                "use longer --lengths or drop it from --ruler-tasks"
            ) from None
    sha = None if essay_path is None else path_fingerprint(essay_path)
    return Inputs(essay_path, sha, [t.name for t in tasks], skipped)


def cells(run: TaskRun[RulerOptions]) -> list[Cell]:
    essay = run.inputs.essay_sha256
    return [{"task": task, "length": n, "essay": essay} for task in run.inputs.tasks for n in run.lengths]


def measure(scorer: Scorer, run: TaskRun[RulerOptions], cell: Cell) -> dict[str, Any]:
    o = run.options
    result = run_ruler(
        scorer.model,
        run.tokenizer,
        tasks=[cell["task"]],
        lengths=[cell["length"]],
        samples=o.trials,
        seed=o.seed,
        essay_path=run.inputs.essay_path,
        qa_dir=o.ruler_qa_dir,
        progress=run.progress,
        label=run.label,
    )
    return result.as_dict()


def collect(run: TaskRun[RulerOptions], measured: list[tuple[Cell, Any]]) -> dict[str, Any]:
    """One `RulerResult` over every cell: the cells' scores and rows, with the run's tasks, lengths and skips."""
    inputs = run.inputs
    return merged(
        measured, unions=("score", "sizes"), tasks=inputs.tasks, lengths=list(run.lengths), skipped=inputs.skipped
    )


def rows(method: str, entry: dict[str, Any]) -> list[Row]:
    out = []
    for cell, value in entry["score"].items():
        task, n = cell.split("@")
        out.append(row(method, f"ruler:{task}", value, length=int(n), convention=f"{get_ruler_task(task).metric} ×100"))
    return out


def report(results: dict[str, Any], rows: list[Row]) -> list[str]:
    ruler = [r for r in rows if r["task"].startswith("ruler:")]
    lengths = sorted({r["length"] for r in ruler})
    lines = [
        f"## RULER (string match ×100, {results['config']['trials']} samples per cell, greedy)",
        "",
        "| method | task | " + " | ".join(str(n) for n in lengths) + " |",
        "|---" * (len(lengths) + 2) + "|",
    ]
    for method, task in dict.fromkeys((r["method"], r["task"]) for r in ruler):
        values = {r["length"]: r["value"] for r in ruler if r["method"] == method and r["task"] == task}
        lines.append(f"| {method} | {task[6:]} | " + " | ".join(f"{values[n]:.2f}" for n in lengths) + " |")
    lines.append("")
    first = first_entry(results, "ruler")
    if first is not None:
        lines += [
            f"Samples follow NVIDIA/RULER's generator ({first['words']}; {first['sentences']}). "
            f"Differences: {'; '.join(first['deviations'])}.",
            "",
        ]
    for method, entry in results["methods"].items():
        for task, why in entry.get("ruler", {}).get("skipped", {}).items():
            lines.append(f"- {method}: RULER {task} skipped ({why})")
    return [*lines, ""]


TASK = Task(
    "ruler",
    "RULER's 13 synthetic tasks (needles, variable tracking, common/frequent words, QA), string match ×100",
    RulerOptions,
    measure,
    rows,
    cells=cells,
    collect=collect,
    prepare=prepare,
    report=report,
    needs=frozenset({TRANSFORMERS}),
    protocol=PROTOCOL,
)
