"""Tables and plots for an evaluation run: perplexity vs length per method, passkey heatmaps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.ticker

from ropekit.eval.passkey import other_scorer
from ropekit.plan.plots import new_figure


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plain_number(value: float, _position=None) -> str:
    """Log-axis tick label as a plain number (12, 0.5, 1500), not 1.2×10¹."""
    return f"{value:g}" if value >= 1e-3 else f"{value:.1e}"


def text_colour(rgba) -> str:
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


def _longppl_cell(row: dict | None) -> str:
    if row is None:
        return "—"
    return f"{row['value']:.3f} (key tokens: {row['tokens_scored']})" if row["value"] is not None else "no key tokens"


def markdown_report(results: dict[str, Any], rows: list[dict[str, Any]], figures: list[str]) -> str:
    cfg = results["config"]
    lines = [
        f"# ropekit eval: {cfg['model']}",
        "",
        f"ropekit {results['ropekit_version']}; tasks {', '.join(cfg['tasks'])}; seed {cfg['seed']}.",
        "",
    ]
    ppl = [r for r in rows if r["task"] == "ppl"]
    if ppl:
        lengths = sorted({r["length"] for r in ppl})
        lines += [
            f"## Perplexity ({cfg['convention']}, stride {cfg['stride']}, token-weighted; data {cfg['data']})",
            "",
            "| method | " + " | ".join(str(n) for n in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for method in dict.fromkeys(r["method"] for r in ppl):
            values = {r["length"]: r for r in ppl if r["method"] == method}
            lines.append(
                f"| {method} | "
                + " | ".join(f"{values[n]['value']:.3f} ({values[n]['tokens_scored']} tokens)" for n in lengths)
                + " |"
            )
        lines.append("")
    lp = [r for r in rows if r["task"] == "longppl"]
    if lp:
        lengths = sorted({r["length"] for r in lp})
        lines += [
            f"## LongPPL (key tokens: long − short log-prob > {cfg['longppl_threshold']} nats, "
            f"short context {cfg['short_length']}; the model is its own evaluator)",
            "",
            "| method | " + " | ".join(str(n) for n in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for method in dict.fromkeys(r["method"] for r in lp):
            values = {r["length"]: r for r in lp if r["method"] == method}
            lines.append(f"| {method} | " + " | ".join(_longppl_cell(values.get(n)) for n in lengths) + " |")
        lines.append("")
    ruler = [r for r in rows if r["task"].startswith("ruler:")]
    if ruler:
        lengths = sorted({r["length"] for r in ruler})
        lines += [
            f"## RULER (string match ×100, {cfg['trials']} samples per cell, greedy)",
            "",
            "| method | task | " + " | ".join(str(n) for n in lengths) + " |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for method, task in dict.fromkeys((r["method"], r["task"]) for r in ruler):
            values = {r["length"]: r["value"] for r in ruler if r["method"] == method and r["task"] == task}
            lines.append(f"| {method} | {task[6:]} | " + " | ".join(f"{values[n]:.1f}" for n in lengths) + " |")
        lines.append("")
        for method, entry in results["methods"].items():
            for task, why in entry.get("ruler", {}).get("skipped", {}).items():
                lines.append(f"- {method}: RULER {task} skipped ({why})")
        lines.append("")
    for method, entry in results["methods"].items():
        lb = entry.get("longbench")
        if lb:
            buckets = ["0-4k", "4-8k", "8k+"]
            lines += [
                f"## LongBench-E, {method} (window {lb['window']} tokens, middle truncation, scores ×100)",
                "",
                "| dataset | " + " | ".join(buckets) + " |",
                "|---" * 4 + "|",
            ]
            for dataset, scores in {**lb["scores"], "average": lb["average"]}.items():
                lines.append(
                    f"| {dataset} | " + " | ".join(f"{scores[b]:.1f}" if b in scores else "—" for b in buckets) + " |"
                )
            lines.append("")
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
    if results.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    lines += [""] + [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(lines)
