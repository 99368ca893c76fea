"""Figures: angle histograms of one pair (the paper's Fig. 3), disturbance per pair for each
method (Fig. 7), and factors per pair for every method side by side. PNG or SVG by suffix."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ropekit.plan.analysis.angles import DEFAULT_BINS
from ropekit.plan.analysis.bounds import critical_dimension
from ropekit.plan.analysis.disturbance import distribution, kl_per_pair, pre_training_distribution
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.scaling import Plan


def new_figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float],
    constrained_layout: bool = False,
    **subplot_kw: Any,
) -> tuple[Figure, Any]:
    """(figure, axes) without pyplot: no global backend choice, no figure registry to close."""
    fig = Figure(figsize=figsize, layout="constrained" if constrained_layout else None)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def plot_angle_histograms(
    spec: RopeSpec, target_length: int, pair: int, path: str | Path, *, bins: int = DEFAULT_BINS
) -> Path:
    """Pair `pair`'s angle distribution: pre-training (θ, L), interpolated (θ/s, L'), extrapolated (θ, L')."""
    s = target_length / spec.context_length
    inv = spec.inv_freq()
    p = pre_training_distribution(spec, bins)[pair]
    curves = {
        f"original (L={spec.context_length})": p,
        f"interpolated θ/s (L'={target_length})": distribution(inv / s, target_length, bins)[pair],
        f"extrapolated θ (L'={target_length})": distribution(inv, target_length, bins)[pair],
    }
    degrees = [k * 360 / bins for k in range(bins)]
    fig, axes = new_figure(3, 1, figsize=(8, 6.5), sharex=True, sharey=True)
    for ax, (label, q) in zip(axes, curves.items()):
        d = float(kl_per_pair(p[None], q[None])[0])
        title = label if q is p else f"{label}   KL(P‖Q) = {d:.3f} nats"
        ax.fill_between(degrees, q.numpy(), step="post", alpha=0.7)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("share of positions")
    axes[-1].set_xlabel(f"rotary angle (degrees, {bins} bins)")
    wavelength = 2 * math.pi / float(inv[pair])
    fig.suptitle(f"{spec.name or 'model'}: rotary pair {pair} (wavelength {wavelength:,.0f} tokens)")
    return _save(fig, path)


def plot_pair_disturbance(plans: dict[str, Plan], path: str | Path) -> Path:
    """D_i per pair for each method, log scale, critical dimension marked."""
    spec = next(iter(plans.values())).spec
    fig, ax = new_figure(figsize=(9, 4.5))
    for name, plan in plans.items():
        ax.plot(
            range(spec.num_pairs),
            plan.pair_disturbance.clamp(min=1e-6).numpy(),
            marker=".",
            label=f"{name} ({plan.disturbance:.1f})",
        )
    _mark_critical(ax, spec)
    ax.set_yscale("log")
    ax.set_xlabel("rotary pair i (high → low frequency)")
    ax.set_ylabel("disturbance D_i = KL(P_i‖Q_i) (nats)")
    target = next(iter(plans.values())).target_length
    ax.set_title(f"{spec.name or 'model'} → {target} tokens: disturbance per pair (legend: 1000 × mean)")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def plot_factors(plans: dict[str, Plan], path: str | Path) -> Path:
    """Per-pair factors f_i (θ'_i = θ_i/f_i) of every method, one small panel each."""
    spec = next(iter(plans.values())).spec
    n = len(plans)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = new_figure(rows, cols, figsize=(3.2 * cols, 2.6 * rows), sharex=True, squeeze=False)
    top = max(max(p.factors) for p in plans.values()) * 1.3
    bottom = min(min(min(p.factors) for p in plans.values()) / 1.3, 0.8)
    for ax, (name, plan) in zip(axes.flat, plans.items()):
        pairs = range(spec.num_pairs)
        ax.fill_between(pairs, 1.0, plan.factors, step="mid", alpha=0.6)  # from f = 1, visible on a log axis
        ax.step(pairs, plan.factors, where="mid", lw=1.0)
        ax.axhline(1.0, color="grey", lw=0.6)
        if all(abs(f - 1.0) < 1e-12 for f in plan.factors):
            ax.text(0.35, 0.6, "f = 1 for every pair\n(no scaling)", transform=ax.transAxes, ha="center", fontsize=8)
        ax.set_yscale("log", base=2)
        ax.set_ylim(bottom, top)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(times_label))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{name}  (a = {plan.attention_factor:.3f})", fontsize=9)
        _mark_critical(ax, spec, label=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.supxlabel("rotary pair i")
    fig.supylabel("factor f_i")
    fig.suptitle(f"{spec.name or 'model'}: per-pair factors, scale {next(iter(plans.values())).scale:g}")
    return _save(fig, path)


def times_label(value: float, _position: int | None = None) -> str:
    """A factor tick as a multiple: 1×, 2×, 4×, 0.5× (not 4×10⁰)."""
    return f"{value:g}×"


def _mark_critical(ax: Axes, spec: RopeSpec, *, label: bool = True) -> None:
    crit_pair = critical_dimension(spec) / 2
    ax.axvline(crit_pair - 0.5, color="black", ls="--", lw=0.8, label="critical dimension" if label else None)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
