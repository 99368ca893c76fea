"""Task `longbench`: LongBench-E from the user's files, one cell per dataset (`ropekit.eval.longbench`)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ropekit.domains import TOKEN_WINDOW
from ropekit.errors import RopekitError
from ropekit.eval.backend import TRANSFORMERS, Scorer
from ropekit.eval.longbench import (
    BUCKETS,
    CHAT_MODES,
    DATASETS,
    PROTOCOL,
    Example,
    PromptConfig,
    load_longbench,
    load_prompt_config,
    run_longbench,
)
from ropekit.eval.store import canonical_json
from ropekit.eval.tasks.record import Cell, Row, Task, TaskOptions, TaskRun, first_entry, merged, option, row


@dataclass(frozen=True)
class LongBenchOptions(TaskOptions):
    longbench_dir: str | None = option(None, "folder of LongBench-E *_e.jsonl files you downloaded", path=True)
    longbench_datasets: tuple[str, ...] = option(
        (), "datasets to run", choices=tuple(DATASETS), shown_default="every known file in the folder"
    )
    longbench_config: str | None = option(
        None,
        "folder with LongBench's dataset2prompt.json / dataset2maxlen.json",
        path=True,
        shown_default="looked for beside --longbench-dir",
    )
    longbench_max_length: int | None = option(
        None,
        "prompt tokens before middle truncation",
        unit="tokens",
        domain=TOKEN_WINDOW,
        shown_default="LongBench's rule, e.g. 3500 for a 4096 window",
    )
    longbench_chat: str = option(
        "auto", "chat template: auto (when the tokenizer has one), on or off", choices=CHAT_MODES
    )


def check(options: LongBenchOptions, lengths: Sequence[int]) -> None:
    if options.longbench_dir is None:
        raise RopekitError("the longbench task needs --longbench-dir (a folder of LongBench-E JSONL files)")


@dataclass(frozen=True)
class Inputs:
    examples: dict[str, list[Example]]  # dataset → its examples
    config: PromptConfig
    config_sha256: str  # of the templates and budgets: part of every cell's key


def prepare(run: TaskRun[LongBenchOptions]) -> Inputs:
    o = run.options
    folder = str(o.longbench_dir)  # `check` refused None
    examples = load_longbench(folder, list(o.longbench_datasets) or None)
    config = load_prompt_config(folder, o.longbench_config)
    tables = canonical_json({"templates": config.templates, "max_new_tokens": config.max_new_tokens})
    return Inputs(examples, config, hashlib.sha256(tables.encode()).hexdigest())


def cells(run: TaskRun[LongBenchOptions]) -> list[Cell]:
    """One per dataset, at the run's window (the plans' target, else the model's context)."""
    return [{"dataset": name, "window": run.limit, "prompts": run.inputs.config_sha256} for name in run.inputs.examples]


def measure(scorer: Scorer, run: TaskRun[LongBenchOptions], cell: Cell) -> dict[str, Any]:
    o = run.options
    result = run_longbench(
        scorer.model,
        run.tokenizer,
        {cell["dataset"]: run.inputs.examples[cell["dataset"]]},
        window=cell["window"],
        max_length=o.longbench_max_length,
        config=run.inputs.config,
        chat=o.longbench_chat,
        progress=run.progress,
        label=run.label,
    )
    return result.as_dict()


def collect(run: TaskRun[LongBenchOptions], measured: list[tuple[Cell, Any]]) -> dict[str, Any]:
    """One `LongBenchResult` over every dataset: their scores and rows, and the mean over datasets per bucket."""
    result = merged(measured, unions=("scores", "bucket_sizes"))
    per_bucket = {bucket: [s[bucket] for s in result["scores"].values() if bucket in s] for bucket, _, _ in BUCKETS}
    result["average"] = {bucket: sum(values) / len(values) for bucket, values in per_bucket.items() if values}
    return result


def rows(method: str, entry: dict[str, Any]) -> list[Row]:
    return [
        row(method, f"longbench:{dataset}", value, depth=bucket, convention="LongBench-E metric ×100")
        for dataset, buckets in entry["scores"].items()
        for bucket, value in buckets.items()
    ]


def report(results: dict[str, Any], rows: list[Row]) -> list[str]:
    lines = []
    buckets = [name for name, _, _ in BUCKETS]
    for method, entry in results["methods"].items():
        lb = entry.get("longbench")
        if lb:
            lines += [
                f"## LongBench-E, {method} (window {lb['window']} tokens, middle truncation, scores ×100)",
                "",
                "| dataset | " + " | ".join(buckets) + " |",
                "|---" * 4 + "|",
            ]
            for dataset, scores in {**lb["scores"], "average": lb["average"]}.items():
                lines.append(
                    f"| {dataset} | " + " | ".join(f"{scores[b]:.2f}" if b in scores else "—" for b in buckets) + " |"
                )
            lines.append("")
    first = first_entry(results, "longbench")
    if first is not None:
        sizes = "; ".join(
            f"{dataset} " + ", ".join(f"{bucket} {n}" for bucket, n in counts.items())
            for dataset, counts in first["bucket_sizes"].items()
        )
        lines += [
            "Bucket scores as LongBench's scorer_e, round(100 · mean, 2); buckets without examples are left out "
            f"(scorer_e would write NaN). Examples per bucket: {sizes}.",
            "",
        ]
    return lines


TASK = Task(
    "longbench",
    "LongBench-E from your --longbench-dir: LongBench's prompts, truncation and metrics, ×100 per length bucket",
    LongBenchOptions,
    measure,
    rows,
    cells=cells,
    collect=collect,
    check=check,
    prepare=prepare,
    report=report,
    needs=frozenset({TRANSFORMERS}),
    protocol=PROTOCOL,
)
