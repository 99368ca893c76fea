"""Task `ppl`: token-weighted perplexity over --data, one cell per window length (`ropekit.eval.perplexity`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropekit.domains import POSITIVE_INTEGER
from ropekit.errors import RopekitError
from ropekit.eval.backend import Scorer
from ropekit.eval.perplexity import CONVENTIONS, perplexity
from ropekit.eval.report import length_table, plot_ppl
from ropekit.eval.tasks.record import Cell, Row, Task, TaskOptions, TaskRun, option, row

DEFAULT_STRIDE = 256  # tokens


@dataclass(frozen=True)
class PplOptions(TaskOptions):
    convention: str = option(
        "strided",
        "windows: strided (window L moved by the stride, each token scored once), disjoint or truncated",
        choices=CONVENTIONS,
    )
    stride: int = option(
        DEFAULT_STRIDE,
        "stride S of the strided convention, at most the longest window; a window shorter than S moves by its "
        "own length",
        unit="tokens",
        domain=POSITIVE_INTEGER,
    )


def check(options: PplOptions, lengths: Sequence[int]) -> None:
    """A stride given beyond every window is a mistake (the default is simply cut to short windows)."""
    if options.convention == "strided" and options.stride > max(lengths) and options.stride != DEFAULT_STRIDE:
        raise RopekitError(
            f"--stride {options.stride} is beyond the longest window ({max(lengths)} tokens): the stride of the "
            "strided convention must be in [1, window length]"
        )


def measure(scorer: Scorer, run: TaskRun[PplOptions], cell: Cell) -> dict[str, Any]:
    n, o = cell["length"], run.options
    result = perplexity(
        scorer,
        run.documents,
        length=n,
        convention=o.convention,
        stride=min(o.stride, n),
        progress=run.progress,
        label=run.label,
    )
    return result.as_dict()


def prepare(run: TaskRun[PplOptions]) -> None:
    run.warnings.extend(short_document_warnings(run.documents, run.lengths))


def short_document_warnings(documents: list[Any], lengths: list[int]) -> list[str]:
    """One line per window length that some documents do not fill (their perplexity uses fewer tokens)."""
    out = []
    for n in lengths:
        short = [len(d) for d in documents if len(d) < n]
        if short:
            out.append(
                f"{len(short)} of {len(documents)} documents are shorter than the {n}-token window "
                f"(shortest {min(short)} tokens); perplexity @ {n} scores them with less context"
            )
    return out


def rows(method: str, entry: dict[str, Any]) -> list[Row]:
    return [
        row(
            method,
            "ppl",
            r["perplexity"],
            length=int(n),
            convention=r["convention"],
            stride=r["stride"],
            tokens_scored=r["tokens_scored"],
        )
        for n, r in entry.items()
    ]


def report(results: dict[str, Any], rows: list[Row]) -> list[str]:
    cfg = results["config"]
    title = f"## Perplexity ({cfg['convention']}, stride {cfg['stride']}, token-weighted; data {cfg['data']})"
    return length_table(
        title,
        [r for r in rows if r["task"] == "ppl"],
        lambda r: f"{r['value']:.3f} ({r['tokens_scored']} tokens)",
    )


def plot(results: dict[str, Any], rows: list[Row], directory: Path) -> Path:
    return plot_ppl(rows, directory / "ppl_vs_length.png", trained_length=results.get("trained_length"))


TASK = Task(
    "ppl",
    "token-weighted perplexity over --data, one window length per --lengths value",
    PplOptions,
    measure,
    rows,
    check=check,
    prepare=prepare,
    report=report,
    plot=plot,
    uses_documents=True,
    protocol="ppl/1",
    better="lower",
    metric="perplexity",
)
