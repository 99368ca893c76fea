"""Task `nll`: next-token NLL by position beyond and within the trained length, and short-context
retention, from one causal pass per document and length (`ropekit.eval.position_nll`).

This is what `ropekit tune` optimises and what the real-model study (`bench/real_model.py`)
measures: NLL over the positions the model never saw (t ≥ trained length), over those it saw, and
the perplexity of each document's first P tokens as a window of their own (retention: a plan that
keeps short-context quality leaves it unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropekit.domains import POSITIVE_INTEGER, TOKEN_WINDOW
from ropekit.errors import RopekitError
from ropekit.eval.backend import Scorer
from ropekit.eval.position_nll import DEFAULT_BUCKET, DEFAULT_PREFIXES, bucket_means, check_window, position_nll
from ropekit.eval.tasks.record import Cell, Row, Task, TaskOptions, TaskRun, option, row
from ropekit.plan.plots import new_figure


@dataclass(frozen=True)
class NllOptions(TaskOptions):
    nll_bucket: int = option(
        DEFAULT_BUCKET, "positions per bucket of the NLL-by-position curve", unit="tokens", domain=POSITIVE_INTEGER
    )
    retention: tuple[int, ...] = option(
        DEFAULT_PREFIXES,
        "retention windows P: perplexity of each document's first P tokens (those above a length are left out there)",
        domain=TOKEN_WINDOW,
    )
    trained_length: int | None = option(
        None,
        "positions from here on are 'beyond'",
        unit="tokens",
        domain=TOKEN_WINDOW,
        shown_default="the model's trained length",
    )


def trained_length(run: TaskRun[NllOptions]) -> int:
    """--trained-length, else the model's (its spec's original length)."""
    value = run.options.trained_length or run.trained_length
    if value is None:
        raise RopekitError("the nll task needs the model's trained length: give --trained-length")
    return value


def prepare(run: TaskRun[NllOptions]) -> None:
    """Refuse, before any weights load, documents shorter than the longest window."""
    check_window(
        run.documents,
        length=max(run.lengths),
        trained_length=trained_length(run),
        bucket=run.options.nll_bucket,
        prefixes=retention_windows(run.options.retention, max(run.lengths)),
    )


def retention_windows(retention: Sequence[int], length: int) -> list[int]:
    return [p for p in retention if p <= length]


def cells(run: TaskRun[NllOptions]) -> list[Cell]:
    return [{"length": n, "trained_length": trained_length(run)} for n in run.lengths]


def measure(scorer: Scorer, run: TaskRun[NllOptions], cell: Cell) -> dict[str, Any]:
    n = cell["length"]
    result = position_nll(
        scorer,
        run.documents,
        length=n,
        trained_length=cell["trained_length"],
        bucket=run.options.nll_bucket,
        prefixes=retention_windows(run.options.retention, n),
    )
    return result.as_dict()


def rows(method: str, entry: dict[str, Any]) -> list[Row]:
    out = []
    for n, r in entry.items():
        tokens = (int(n) - 1) * r["documents"]
        out.append(row(method, "nll", r["nll"], length=int(n), convention="mean NLL, nats", tokens_scored=tokens))
        out.append(row(method, "nll:within", r["nll_within"], length=int(n), convention=f"t < {r['trained_length']}"))
        if r["nll_beyond"] is not None:
            out.append(
                row(method, "nll:beyond", r["nll_beyond"], length=int(n), convention=f"t ≥ {r['trained_length']}")
            )
        for p, ppl in r["prefix_ppl"].items():
            out.append(row(method, f"retention:{p}", ppl, length=int(n), convention=f"perplexity of the first {p}"))
    return out


def report(results: dict[str, Any], rows: list[Row]) -> list[str]:
    """One table: per method and length, NLL over all positions, within and beyond the trained length,
    and the retention windows' perplexities."""
    entries = {m: e["nll"] for m, e in results["methods"].items() if e.get("nll")}
    if not entries:
        return []
    first = next(iter(next(iter(entries.values())).values()))
    windows = list(first["prefix_ppl"])
    trained = first["trained_length"]
    head = ["method", "length", "NLL", f"NLL < {trained:,}", f"NLL ≥ {trained:,}", *(f"ppl first {p}" for p in windows)]
    lines = [
        f"## NLL by position (nats; one causal pass per document, {first['documents']} documents)",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for method, by_length in entries.items():
        for n, r in by_length.items():
            beyond = "—" if r["nll_beyond"] is None else f"{r['nll_beyond']:.4f}"
            retention = [f"{r['prefix_ppl'][p]:.3f}" if p in r["prefix_ppl"] else "—" for p in windows]
            lines.append(
                f"| {method} | {n} | {r['nll']:.4f} | {r['nll_within']:.4f} | {beyond} | "
                + " | ".join(retention)
                + " |"
            )
    return [*lines, ""]


def plot(results: dict[str, Any], rows: list[Row], directory: Path) -> Path:
    return plot_nll_by_position(results, directory / "nll_by_position.png")


def plot_nll_by_position(results: dict[str, Any], path: Path) -> Path:
    """Mean next-token NLL by position bucket per method (the `nll` task's longest window), with the
    trained length dotted."""
    fig, ax = new_figure(figsize=(7, 4.2))
    trained = None
    for method, entry in results["methods"].items():
        by_length = entry.get("nll")
        if not by_length:
            continue
        r = by_length[max(by_length, key=int)]
        starts, means = bucket_means(r)
        ax.plot(starts, means, marker="o", ms=2.5, lw=1, label=f"{method} ({r['nll']:.3f})")
        trained = r["trained_length"]
    if trained:
        ax.axvline(trained, color="grey", ls=":", lw=1.2, label=f"trained length ({trained})")
    ax.set(xlabel="position (bucket start, tokens)", ylabel="mean next-token NLL (nats)", title="NLL by position")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


TASK = Task(
    "nll",
    "NLL by position beyond/within the trained length + retention (one causal pass per document; tune's measure)",
    NllOptions,
    measure,
    rows,
    cells=cells,
    prepare=prepare,
    report=report,
    plot=plot,
    uses_documents=True,
    protocol="nll/1",
    better="lower",
    metric="NLL",
)
