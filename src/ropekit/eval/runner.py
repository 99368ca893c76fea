"""`ropekit eval`: one model, several plans side by side, every task measured cell by cell through the store.

`evaluate(cfg)`:

1. checks the configuration: tasks, their options, lengths, methods, backend (nothing read yet);
2. checks `--out`, opens the backend (configuration and tokenizer, no weights), checks the lengths
   against the run's limit;
3. reads the documents and each task's inputs (prompts that must fit, files): still no weights;
4. for each method, its plan; for each task and cell, the stored value, or else the model (loaded
   on first need, with the plan applied) measures it and the evaluation store keeps it. An
   interrupted run loses at most the cell in progress, and a rerun measures nothing twice; two
   methods with identical plans share their cells;
5. builds the results (one header, each method's plan and task entries, the warnings) and with
   `--out` writes results.json, results.csv, report.md and the tasks' figures, renamed into place
   complete.

The store lives in ropekit's cache (`cache_root()/eval/cells.sqlite`) unless `store` names another
file; `fresh=True` measures every cell again and replaces what the store held.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ropekit._version import __version__
from ropekit.domains import TOKEN_WINDOW
from ropekit.errors import Interrupted, RopekitError
from ropekit.eval.backend import Backend, Scorer, TransformersBackend
from ropekit.eval.llamacpp import LlamaCppBackend
from ropekit.eval.registry import TASKS, get_task, options_for, task_options
from ropekit.eval.store import (
    AS_SAVED,
    CellKey,
    EvalStore,
    documents_fingerprint,
    plan_fingerprint,
    plan_record,
)
from ropekit.eval.tasks.record import ROW_FIELDS, Cell, Row, Task, TaskOptions, TaskRun
from ropekit.output import OutputTarget, atomic_directory, prepare_output
from ropekit.paths import cache_root

if TYPE_CHECKING:
    import numpy as np
    from tqdm.auto import tqdm

    from ropekit.plan.scaling import Plan

__all__ = [
    "AS_SAVED",
    "BACKENDS",
    "EvalConfig",
    "Evaluation",
    "best_by_length",
    "default_store_path",
    "evaluate",
    "markdown_report",
    "open_backend",
    "prepare_runs",
    "result_rows",
    "write_report",
]

REPORT_KIND = "eval report"  # the kind of output in the report directory's manifest (ropekit.manifest.KINDS)
BACKENDS: dict[str, type[Backend]] = {"transformers": TransformersBackend, "llama.cpp": LlamaCppBackend}


def open_backend(name: str, model: str) -> Backend:
    """The backend `name` for `model` (nothing is loaded yet)."""
    if name not in BACKENDS:
        raise RopekitError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return BACKENDS[name](model)


def default_store_path() -> Path:
    """Where `ropekit eval` keeps measured cells unless told otherwise: ropekit's cache."""
    return cache_root() / "eval" / "cells.sqlite"


@dataclass
class EvalConfig:
    """Everything `evaluate` needs. Task options go in `options` by name (e.g. {"stride": 128}); every
    option not given takes its task record's default. See `ropekit.eval.registry.task_options()`."""

    model: str  # model directory, hub id or .gguf file
    out: Path | None = None  # report directory; None: return the results and write no report
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    lengths: list[int] = field(default_factory=lambda: [512])  # context lengths, tokens
    methods: list[str] = field(default_factory=list)  # empty: evaluate the model as saved
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # method → its parameters
    target_length: int | None = None  # plan target, tokens; default: the largest length
    bins: int = 360  # histogram bins K for the plans' disturbance (and dprope's per-pair choice)
    data: str | None = None  # documents (text file, folder, or JSONL with a "text" field) for ppl, longppl, nll
    max_tokens: int | None = 16384  # tokens read per document; None: all
    options: dict[str, Any] = field(default_factory=dict)  # task option name → value
    backend: str = "transformers"  # or "llama.cpp": a .gguf in llama.cpp itself
    store: Path | None = None  # the evaluation store (SQLite); None: default_store_path()
    fresh: bool = False  # measure every cell again, replacing what the store holds
    progress: bool = True
    overwrite: bool = False  # replace an earlier ropekit report at `out` (never anything else)

    def validate(self) -> None:
        """Refuse a configuration that cannot run, before anything is read."""
        self.selected_tasks()

    def selected_tasks(self) -> list[tuple[Task[Any], TaskOptions]]:
        """Each task asked for, with its options (given values checked, the rest at their defaults)."""
        from ropekit.plan.registry import get_method

        if not self.tasks:
            raise RopekitError(f"no task given; choose from {', '.join(TASKS)}")
        tasks = [get_task(name) for name in dict.fromkeys(self.tasks)]
        if not self.lengths:
            raise RopekitError("--lengths needs at least one value")
        for n in self.lengths:
            TOKEN_WINDOW.check("each --lengths value", n)
        for method in self.methods:
            get_method(method)
        backend = BACKENDS.get(self.backend)
        if backend is None:
            raise RopekitError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        backend.check_source(self.model)
        for task in tasks:
            missing = task.needs - backend.capabilities
            if missing:
                raise RopekitError(
                    f"task {task.name} needs {', '.join(sorted(missing))}, which the {self.backend} backend does not "
                    f"give; use --backend transformers"
                )
        reading = [t.name for t in tasks if t.uses_documents]
        if reading and not self.data:
            who = f"the {' and '.join(reading)} task{'s need' if len(reading) > 1 else ' needs'}"
            raise RopekitError(f"{who} --data (a text file, a folder, or JSONL with a 'text' field)")
        if reading and self.max_tokens is not None and self.max_tokens < max(self.lengths):
            raise RopekitError(f"--max-tokens {self.max_tokens} is below the longest length {max(self.lengths)}")
        check_options_belong(self.options, tasks)
        selected = [(task, options_for(task, self.options)) for task in tasks]
        for task, options in selected:
            if task.check is not None:
                task.check(options, self.lengths)
        return selected

    def limit(self, backend: Backend) -> int:
        """The longest length this run may ask for: the plans' target, else the model's own context."""
        if self.methods:
            return self.target_length or max(self.lengths)
        return backend.context_length

    def store_path(self) -> Path:
        return Path(self.store) if self.store is not None else default_store_path()


def check_options_belong(given: dict[str, Any], tasks: list[Task[Any]]) -> None:
    """Refuse an option no registered task has, and one that belongs only to tasks this run leaves out."""
    known = task_options()
    for name in given:
        if name not in known:
            raise RopekitError(f"unknown task option {name!r}; the tasks' options are: {', '.join(known)}")
        owners = known[name].specs
        if not any(task.name in owners for task in tasks):
            flag = known[name].spec.shown
            raise RopekitError(
                f"option {flag} is for the {'/'.join(owners)} task, which this run leaves out "
                f"(--tasks {','.join(t.name for t in tasks)})"
            )


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every task for every method; with `cfg.out`, write results.json, results.csv, report.md and figures."""
    selected = cfg.selected_tasks()
    target = None
    if cfg.out is not None:  # before any work
        target = prepare_output(
            cfg.out,
            kind=REPORT_KIND,
            overwrite=cfg.overwrite,
            marker="results.json",
            inputs=(cfg.model, cfg.data, *input_paths(cfg)),
        )
        refuse_store_inside(cfg.store_path(), target.path, cfg.out)
    backend = open_backend(cfg.backend, cfg.model)
    limit = cfg.limit(backend)  # from the configuration alone: refuse before loading any weights
    if max(cfg.lengths) > limit:
        raise RopekitError(
            f"length {max(cfg.lengths)} is beyond this run's limit of {limit} tokens "
            "(raise --target-length, or evaluate a model extended that far)"
        )
    plans = {method: plan_of(backend, method, cfg, limit) for method in cfg.methods or [AS_SAVED]}  # refusals first
    runs = prepare_runs(
        backend,
        selected,
        lengths=cfg.lengths,
        limit=limit,
        data=cfg.data,
        max_tokens=cfg.max_tokens,
        progress=cfg.progress,
    )
    results = results_header(cfg, backend, runs)
    results["methods"], evaluation = measure_plans(cfg, backend, runs, plans)
    results["store"].update(measured=evaluation.measured, reused=evaluation.reused)
    results["warnings"] += [w for _, run in runs for w in run.warnings]
    results["warnings"] += non_finite_warnings(result_rows(results))
    for line in results["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    if target is not None:
        write_report(results, target)
    return results


def measure_plans(
    cfg: EvalConfig, backend: Backend, runs: list[tuple[Task[Any], TaskRun[Any]]], plans: dict[str, Plan | None]
) -> tuple[dict[str, Any], Evaluation]:
    """Each method's results entry (its plan and every task's), every cell through the evaluation store;
    the evaluation, for its counts. Ctrl-C becomes one line saying what is kept."""
    store_path = cfg.store_path()
    store_path.parent.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {}
    with EvalStore(store_path) as store:
        print(f"evaluation store: {store_path} ({len(store)} cells stored)", file=sys.stderr)
        evaluation = Evaluation(backend, runs, store, fresh=cfg.fresh)
        with evaluation.progress_bar(len(plans), enabled=cfg.progress):
            try:
                for method, plan in plans.items():
                    entry = {} if plan is None else {"plan": plan_entry(plan, cfg.bins)}
                    entries[method] = {**entry, **evaluation.measure(plan, label=method)}
            except KeyboardInterrupt:
                raise Interrupted(
                    f"interrupted; the cells measured in this run ({evaluation.measured}) are kept in the "
                    f"evaluation store {store_path}: run the same command again to resume"
                ) from None
    print(f"cells: {evaluation.measured} measured, {evaluation.reused} read from the evaluation store", file=sys.stderr)
    return entries, evaluation


def refuse_store_inside(store: Path, out: Path, shown: str | Path) -> None:
    """The evaluation store is read and written while the run works; the report directory is replaced at
    its end: refuse a store inside it (it would be deleted, or block the replacement)."""
    real = Path(os.path.realpath(store))
    if real == out or out in real.parents:
        raise RopekitError(
            f"--store {store} is inside the output directory {shown}, which the run replaces at its end; "
            "keep the evaluation store outside it (default: ropekit's cache)"
        )


def plan_of(backend: Backend, method: str, cfg: EvalConfig, limit: int) -> Plan | None:
    """`method`'s plan for the model at the run's limit (None for the model as saved)."""
    if method == AS_SAVED:
        return None
    return backend.plan(method, limit, bins=cfg.bins, params=cfg.method_params.get(method, {}))


def input_paths(cfg: EvalConfig) -> list[str]:
    """Files and folders the tasks read (--out must not be inside or around them)."""
    specs = task_options()
    return [str(v) for k, v in cfg.options.items() if k in specs and specs[k].spec.record.path and v]


def prepare_runs(
    backend: Backend,
    selected: list[tuple[Task[Any], TaskOptions]],
    *,
    lengths: list[int],
    limit: int,
    data: str | None,
    max_tokens: int | None,
    documents: list[np.ndarray] | None = None,
    progress: bool = False,
) -> list[tuple[Task[Any], TaskRun[Any]]]:
    """Each task's run: the documents (`documents` as given, else `data` read once and tokenised with the
    backend's tokenizer), cut to `max_tokens`, and its inputs from `prepare`. Reads files, never weights."""
    from ropekit.data.documents import read_documents, tokenize_documents

    tokenizer = backend.tokenizer
    if documents is None and any(task.uses_documents for task, _ in selected):
        if data is None:
            raise RopekitError("--data is needed")
        documents = tokenize_documents(read_documents(data), tokenizer)
    documents = [doc[:max_tokens] for doc in documents] if documents and max_tokens else documents or []
    runs = []
    for task, options in selected:
        run = TaskRun(
            options,
            list(lengths),
            limit,
            tokenizer,
            documents if task.uses_documents else [],
            data,
            backend.trained_length,
            backend.source,
            progress=progress,
        )
        if task.prepare is not None:
            run.inputs = task.prepare(run)
        runs.append((task, run))
    return runs


@dataclass
class Evaluation:
    """Prepared tasks against one backend and one store: `measure(plan)` gives every task's entry for
    that plan, each cell from the store when it holds it. (`ropekit tune` measures its candidates so.)"""

    backend: Backend
    runs: list[tuple[Task[Any], TaskRun[Any]]]
    store: EvalStore
    fresh: bool = False  # measure every cell again (once in this evaluation), replacing stored values
    deadline: float | None = (
        None  # time.perf_counter() after which no cell is measured (a task missing one is left out)
    )
    measured: int = 0  # cells measured by this evaluation
    reused: int = 0  # cells read from the store
    skipped: int = 0  # cells left unmeasured at the deadline
    bar: tqdm | None = None
    _done: set[str] = field(default_factory=set)  # digests measured by this evaluation

    @classmethod
    def of(
        cls,
        backend: Backend,
        store: EvalStore,
        tasks: dict[str, dict[str, Any]],
        *,
        lengths: list[int],
        limit: int | None = None,
        data: str | None = None,
        documents: list[np.ndarray] | None = None,
        max_tokens: int | None = None,
        fresh: bool = False,
        deadline: float | None = None,
    ) -> Evaluation:
        """An evaluation of `tasks` ({task name: its options}) at `lengths`: the documents are `documents` (token
        ids) or read from `data`, cut to `max_tokens`; `limit`, the longest context, defaults to the longest
        length; `deadline`: see the field."""
        selected = [(task, options_for(task, given)) for task, given in ((get_task(n), g) for n, g in tasks.items())]
        runs = prepare_runs(
            backend,
            selected,
            lengths=lengths,
            limit=limit or max(lengths),
            data=data,
            documents=documents,
            max_tokens=max_tokens,
        )
        return cls(backend, runs, store, fresh=fresh, deadline=deadline)

    @cached_property
    def model_key(self) -> str:
        return self.backend.fingerprint(self.store)

    @cached_property
    def documents_key(self) -> str:
        documents = next((run.documents for task, run in self.runs if task.uses_documents), [])
        return documents_fingerprint(documents) if documents else ""

    @cached_property
    def task_settings(self) -> dict[str, dict[str, Any]]:
        """Task name → what its options, protocol and the backend put into every cell key."""
        return {
            task.name: {**self.backend.settings(), "protocol": task.protocol, **run.options.key_settings(self.store)}
            for task, run in self.runs
        }

    def key(self, task: Task[Any], plan: Plan | None, cell: Cell) -> CellKey:
        """The store key of one cell of `task` under `plan`."""
        return CellKey(
            model=self.model_key,
            plan=plan_fingerprint(plan),
            task=task.name,
            settings={**self.task_settings[task.name], **cell},
            documents=self.documents_key if task.uses_documents else "",
        )

    def measure(self, plan: Plan | None, *, label: str = AS_SAVED) -> dict[str, Any]:
        """Task name → its results entry for the model under `plan` (None: as saved)."""
        entry: dict[str, Any] = {}
        with self.loaded(plan) as scorer:
            for task, run in self.runs:
                run.label = label
                if self.bar is not None:
                    self.bar.set_description(f"eval: {label} · {task.name}")
                measured, cells = [], task.cells(run)
                for cell in cells:
                    key = self.key(task, plan, cell)
                    fresh = self.fresh and key.digest not in self._done
                    if fresh or key not in self.store:
                        if self.deadline is not None and time.perf_counter() > self.deadline:
                            self.skipped += 1
                            continue
                        scorer()  # loaded before the measurement starts: a cell's seconds are its own
                    value, stored = self.store.measure(
                        key,
                        functools.partial(_measure_cell, task, scorer, run, cell),
                        plan_record=None if plan is None else plan_record(plan),
                        fresh=fresh,
                    )
                    self._done.add(key.digest)
                    self.reused += stored
                    self.measured += not stored
                    measured.append((cell, value))
                    if self.bar is not None:
                        self.bar.update(1)
                collected = task.collect(run, measured) if len(measured) == len(cells) else None
                if collected is not None:
                    entry[task.name] = collected
        return entry

    @contextlib.contextmanager
    def loaded(self, plan: Plan | None) -> Iterator[Callable[[], Scorer]]:
        """A function giving the model under `plan`, loaded on its first call and closed on exit."""
        held: list[Scorer] = []

        def scorer() -> Scorer:
            if not held:
                held.append(self.backend.load(plan))
            return held[0]

        try:
            yield scorer
        finally:
            for s in held:
                s.close()

    @contextlib.contextmanager
    def progress_bar(self, plans: int, *, enabled: bool = True) -> Iterator[None]:
        """The whole-evaluation bar (one unit per cell), above each task's own bars."""
        if not enabled:
            yield
            return
        from tqdm.auto import tqdm

        total = plans * sum(len(task.cells(run)) for task, run in self.runs)
        self.bar = tqdm(total=total, desc="eval", unit="cell", position=0)
        try:
            yield
        finally:
            self.bar.close()
            self.bar = None


def _measure_cell(task: Task[Any], scorer: Callable[[], Scorer], run: TaskRun[Any], cell: Cell) -> Any:
    return task.measure(scorer(), run, cell)


def plan_entry(plan: Plan, bins: int) -> dict[str, Any]:
    """What results.json records of a method's plan: target, per-pair factors, attention factor, disturbance (at K bins)."""
    return {
        "target_length": plan.target_length,
        "factors": list(plan.factors),
        "attention_factor": plan.attention_factor,
        "disturbance": plan.disturbance,
        "bins": bins,
    }


def results_header(cfg: EvalConfig, backend: Backend, runs: list[tuple[Task[Any], TaskRun[Any]]]) -> dict[str, Any]:
    """The results' frame, the same for every backend: version, configuration (with every task option the
    run used), backend, trained length, store; `methods` and `warnings` are filled in by the run."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "options"}
    for _, run in runs:
        config.update(run.options.as_dict())
    return {
        "ropekit_version": __version__,
        "config": config,
        "backend": backend.describe(),
        "trained_length": backend.trained_length,
        "store": {"path": str(cfg.store_path()), "measured": 0, "reused": 0},
        "methods": {},
        "warnings": [],
    }


def non_finite_warnings(rows: list[Row]) -> list[str]:
    """One line per result that is NaN or inf (e.g. a model with NaN weights)."""
    return [
        f"{r['method']} · {r['task']} @ {r['length'] or r['depth']}: non-finite result ({r['value']}); "
        "check the model's weights"
        for r in rows
        if isinstance(r["value"], float) and not math.isfinite(r["value"])
    ]


def _finite_or_null(value: Any) -> Any:
    """NaN and inf become null, so results.json stays standard JSON (the warnings name them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def best_by_length(rows: list[Row]) -> list[str]:
    """The best method per length on each task that ranks (`Task.better`): e.g. lowest perplexity, highest
    passkey accuracy (mean over depths)."""
    lines = []
    for task in TASKS.values():
        if task.better is None:
            continue
        cells: dict[int, dict[str, list[float]]] = {}
        for r in rows:
            if r["task"] == task.name and isinstance(r["value"], float) and math.isfinite(r["value"]):
                cells.setdefault(r["length"], {}).setdefault(r["method"], []).append(r["value"])
        for n, by_method in sorted(cells.items()):
            if len(by_method) > 1:
                means = {m: sum(v) / len(v) for m, v in by_method.items()}
                pick = min if task.better == "lower" else max
                best = pick(means, key=lambda m: means[m])
                shown = task.value_format.format(means[best])
                tie = len(set(means.values())) == 1
                lines.append(
                    f"best {task.metric} @ {n}: " + (f"all methods tie ({shown})" if tie else f"{best} ({shown})")
                )
    return lines


def result_rows(results: dict[str, Any]) -> list[Row]:
    """Flat rows (`ROW_FIELDS`): method, task, length, depth, value, …, from each registered task's entries."""
    rows = []
    for method, entry in results["methods"].items():
        for name, task in TASKS.items():
            if name in entry:
                rows += [{**dict.fromkeys(ROW_FIELDS, ""), **r} for r in task.rows(method, entry[name])]
    return rows


def write_report(results: dict[str, Any], out: OutputTarget | Path) -> None:
    """results.json (the marker), results.csv, report.md and the tasks' figures, written atomically to `out`
    (an `OutputTarget` from `prepare_output`; a bare path must be new or empty)."""
    rows = result_rows(results)
    with atomic_directory(out, marker="results.json", kind=REPORT_KIND) as tmp:
        figures = []
        for name in results["config"]["tasks"]:
            task = TASKS.get(name)
            if task is not None and task.plot is not None and any(e.get(name) for e in results["methods"].values()):
                figure = task.plot(results, rows, tmp)
                if figure is not None:
                    figures.append(figure)
        with (tmp / "results.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(ROW_FIELDS))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "report.md").write_text(markdown_report(results, rows, [f.name for f in figures]))
        (tmp / "results.json").write_text(json.dumps(_finite_or_null(results), indent=2) + "\n")


def markdown_report(results: dict[str, Any], rows: list[dict[str, Any]], figures: list[str]) -> str:
    """report.md: the run, each task's section (its record's `report`, else a table of its rows), warnings, figures."""
    from ropekit.eval.report import length_table

    cfg = results["config"]
    lines = [
        f"# ropekit eval: {cfg['model']}",
        "",
        f"ropekit {results['ropekit_version']}; tasks {', '.join(cfg['tasks'])}"
        + (f"; seed {cfg['seed']}." if "seed" in cfg else "."),
        "",
    ]
    for name in cfg["tasks"]:
        task = TASKS.get(name)
        if task is None:
            continue
        if task.report is not None:
            lines += task.report(results, rows)
        else:
            mine = [r for r in rows if r["task"] == name]
            lines += length_table(f"## {name} ({task.metric or 'value'})", mine, lambda r: f"{r['value']:.4g}")
    if results.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    lines += [""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
