"""Task `longppl`: perplexity over key tokens (Fang et al. 2024), one cell per length above the short
context (`ropekit.eval.longppl`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ropekit.domains import POSITIVE_INTEGER, TOKEN_WINDOW
from ropekit.errors import RopekitError
from ropekit.eval.backend import TRANSFORMERS, Scorer
from ropekit.eval.longppl import COVERAGES, PROTOCOL, Evaluator, long_ppl
from ropekit.eval.report import length_table
from ropekit.eval.tasks.record import Cell, Row, Task, TaskOptions, TaskRun, first_entry, option, row


@dataclass(frozen=True)
class LongPplOptions(TaskOptions):
    short_length: int = option(4096, "short context (official 4096)", unit="tokens", domain=TOKEN_WINDOW)
    longppl_window: int = option(
        1024, "tokens sharing one short context (official 1024)", unit="tokens", domain=POSITIVE_INTEGER
    )
    longppl_threshold: float = option(2.0, "α, long − short log-prob difference of a key token", unit="nats")
    longppl_beta: float = option(-2.0, "β, floor on a key token's long-context log-prob", unit="nats")
    evaluator: str | None = option(
        None, "model that finds the key tokens", path=True, shown_default="the model under test itself"
    )
    longppl_coverage: str = option(
        "disjoint",
        "which tokens are scored: disjoint windows across each whole document (ropekit), or official: each "
        "document's first LENGTH − 1 tokens, as PKU-ML/LongPPL's perplexity.py",
        choices=tuple(COVERAGES),
    )


def check(options: LongPplOptions, lengths: Sequence[int]) -> None:
    """Key tokens lie past the short context: a run whose every length is within it has nothing to score."""
    if options.short_length >= max(lengths):
        raise RopekitError(
            f"--short-length {options.short_length} must be below the longest --lengths value ({max(lengths)}): "
            "LongPPL scores only tokens past the short context"
        )


def prepare(run: TaskRun[LongPplOptions]) -> Callable[[], Evaluator] | None:
    """The evaluator, loaded when a cell is first measured (a resumed run may need none); a warning for the
    lengths within the short context, which LongPPL leaves out."""
    within = [n for n in run.lengths if n <= run.options.short_length]
    if within:
        run.warnings.append(
            f"longppl leaves out --lengths {','.join(map(str, within))}: not beyond --short-length "
            f"{run.options.short_length}, so no token there can be key"
        )
    path = run.options.evaluator
    return None if path is None else functools.cache(lambda: load_evaluator(path))


def load_evaluator(path: str) -> Evaluator:
    """The LongPPL key-token evaluator: a model (as saved) and its own tokenizer."""
    from ropekit.apply.extend import load_model, load_tokenizer

    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise RopekitError(f"--evaluator {path}: no tokenizer found beside the model")
    return Evaluator(load_model(path, dtype="float32"), tokenizer, path)


def cells(run: TaskRun[LongPplOptions]) -> list[Cell]:
    """One per length beyond the short context (shorter windows hold no token that can be key)."""
    return [{"length": n} for n in run.lengths if n > run.options.short_length]


def measure(scorer: Scorer, run: TaskRun[LongPplOptions], cell: Cell) -> dict[str, Any]:
    o = run.options
    result = long_ppl(
        scorer.model,
        run.documents,
        length=cell["length"],
        short_length=o.short_length,
        sliding_window=o.longppl_window,
        threshold=o.longppl_threshold,
        beta=o.longppl_beta,
        evaluator=run.inputs() if run.inputs else None,
        tokenizer=run.tokenizer,
        coverage=o.longppl_coverage,
    )
    return result.as_dict()


def rows(method: str, entry: dict[str, Any]) -> list[Row]:
    return [
        row(
            method,
            "longppl",
            r["long_ppl"],
            length=int(n),
            convention=f"short {r['short_length']}/{r['sliding_window']}, α {r['threshold']}, β {r['beta']}, "
            f"evaluator {r['evaluator']}",
            tokens_scored=r["key_tokens"],
        )
        for n, r in entry.items()
    ]


def _cell(r: Row) -> str:
    return f"{r['value']:.3f} (key tokens: {r['tokens_scored']})" if r["value"] is not None else "no key tokens"


def report(results: dict[str, Any], rows: list[Row]) -> list[str]:
    cfg = results["config"]
    evaluator = f"evaluator {cfg['evaluator']}" if cfg.get("evaluator") else "the model is its own evaluator"
    title = (
        f"## LongPPL (key tokens: long − short log-prob > {cfg['longppl_threshold']} nats, "
        f"short context {cfg['short_length']}; {evaluator})"
    )
    table = length_table(title, [r for r in rows if r["task"] == "longppl"], _cell)
    cells: dict[str, dict[str, Any]] | None = first_entry(results, "longppl")
    if not cells:
        return table
    first = next(iter(cells.values()))
    lines = [f"Scored: {first['scored']}."]
    if first.get("offsets"):  # a separate evaluator
        lines.append(
            f"Token positions from each tokenizer's offsets; {per_length(cells, 'offset_fallback_tokens')} tokens "
            "past the short context matched by decoded widths."
        )
    return [*table, " ".join(lines), ""]


def per_length(cells: dict[str, dict[str, Any]], field: str) -> str:
    """`field` of every length's cell: one number when they agree, else "a at n1, b at n2"."""
    values = {n: cell[field] for n, cell in cells.items()}
    if len(set(values.values())) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{v} at {n}" for n, v in values.items())


TASK = Task(
    "longppl",
    "perplexity over key tokens (LongPPL): the tokens the long context predicts much better than a short one",
    LongPplOptions,
    measure,
    rows,
    cells=cells,
    check=check,
    prepare=prepare,
    report=report,
    needs=frozenset({TRANSFORMERS}),
    uses_documents=True,
    protocol=PROTOCOL,
)
