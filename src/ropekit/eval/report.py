"""Tables and plots for an evaluation run: the tables, plots and plot helpers
the tasks share (perplexity vs length, passkey heatmaps, NLL by position; plain log axes, one
colour per method, accuracy heatmaps). Each task's own section lives in its record."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes

from ropekit.plan.plots import new_figure


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plain_number(value: float, _position: Any = None) -> str:
    """Log-axis tick label as a plain number (12, 0.5, 1500), not 1.2×10¹."""
    return f"{value:g}" if value >= 1e-3 else f"{value:.1e}"


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour `rgba` (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def plot_ppl(rows: list[dict[str, Any]], path: Path, *, trained_length: int | None = None) -> Path:
    """Perplexity vs length per method (log-log, plain tick labels); NaN/inf points are skipped and
    a dotted line marks the length the model was trained at."""
    fig, ax = new_figure(figsize=(7, 4.2))
    ppl = [r for r in rows if r["task"] == "ppl"]
    for method in dict.fromkeys(r["method"] for r in ppl):
        points = sorted((r["length"], r["value"]) for r in ppl if r["method"] == method and _finite(r["value"]))
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    if trained_length:
        ax.axvline(trained_length, color="grey", ls=":", lw=1.2, label=f"trained length ({trained_length})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    lengths = sorted({r["length"] for r in ppl})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(plain_number))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(plain_number))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity vs context length")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_passkey_heatmaps(results: dict[str, Any], path: Path) -> Path:
    """Passkey accuracy per method as depth × length heatmaps, with the percentages written in."""
    methods = [m for m, e in results["methods"].items() if "passkey" in e]
    cols = min(len(methods), 3)
    rows = math.ceil(len(methods) / cols)
    fig, axes = new_figure(rows, cols, figsize=(3.6 * cols + 1.2, 3.2 * rows), squeeze=False, constrained_layout=True)
    for index, (ax, method) in enumerate(zip(axes.flat, methods)):
        pk = results["methods"][method]["passkey"]
        grid = [[pk["accuracy"][f"{n}@{d:g}"] for n in pk["lengths"]] for d in pk["depths"]]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(pk["lengths"])), [str(n) for n in pk["lengths"]], fontsize=8)
        ax.set_yticks(range(len(pk["depths"])), [f"{d:g}" for d in pk["depths"]], fontsize=8)
        if index // cols == rows - 1 or index + cols >= len(methods):
            ax.set_xlabel("context length (tokens)")
        if index % cols == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(method)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(
                    j,
                    i,
                    f"{value:.0%}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color=text_colour(image.cmap(image.norm(value))),
                )
    for ax in list(axes.flat)[len(methods) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="passkey accuracy", shrink=0.8)
    fig.savefig(path, dpi=120)
    return path


def plain_log_axes(ax: Axes, *, x: bool = True) -> None:
    """Log axes labelled with plain numbers (100, 200) rather than 10^2, 2×10^2."""
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)  # perplexity spans often sit inside one decade
    ax.tick_params(axis="y", which="minor", labelsize=7)
    if x:
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=6)


METHOD_ORDER = ("none", "pi", "ntk", "yarn", "dprope", "dprope-n", "base")  # colours C0 … C6; others C7


def method_color(method: str) -> str:
    """One colour per method in every plot (matplotlib's cycle: none C0, pi C1, …, any other method C7)."""
    return f"C{METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)}"


def accuracy_heatmap(ax: Axes, acc: np.ndarray, rows: list[str], columns: list[Any]) -> None:
    """Accuracy matrix (rows × columns) in red-yellow-green with percentages; NaN cells show '—'."""
    ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            ax.text(j, i, "—" if np.isnan(acc[i, j]) else f"{acc[i, j]:.0%}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(columns)), columns, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)


# ---- report.md ------------------------------------------------------------------------------------


def length_table(title: str, rows: list[dict[str, Any]], cell: Callable[[dict[str, Any]], str]) -> list[str]:
    """A markdown section: `title`, then one line per method and one column per length ("—" where missing)."""
    if not rows:
        return []
    lengths = sorted({r["length"] for r in rows})
    lines = [
        title,
        "",
        "| method | " + " | ".join(str(n) for n in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        values = {r["length"]: r for r in rows if r["method"] == method}
        lines.append(f"| {method} | " + " | ".join(cell(values[n]) if n in values else "—" for n in lengths) + " |")
    return [*lines, ""]
