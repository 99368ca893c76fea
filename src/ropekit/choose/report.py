"""What a person looks at after `ropekit tune`: report.md (the ranked held-out table first) and three plots.

* objective_by_trial.png: the search's trace on the tuning documents (NLL beyond L per trial;
  plans rejected at the retention check on a band of their own), the running best, the seeds;
* factors.png: the winner's per-pair factors against its seeds and YaRN (θ'_i = θ_i / f_i);
* nll_by_position.png: held-out NLL by position for the report plans, the trained length marked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.ticker
import numpy as np

from ropekit.plan.plots import new_figure

if TYPE_CHECKING:
    from ropekit.choose.study import Context
    from ropekit.plan.scaling import Plan

MAX_POINTS = 64  # position buckets are merged to at most this many points per curve


def markdown_report(results: dict[str, Any], ctx: Context) -> str:
    """The report: held-out ranking, the winner, the search, how to use the plan."""
    s = results["settings"]
    tuned = results["tuned"]
    rows = results["held_out"]
    out = Path(ctx.cfg.out)
    lines = [
        f"# ropekit tune: {ctx.cfg.model} → {s['target_length']:,} tokens",
        "",
        f"Held-out documents ({', '.join(ctx.held_out.names)}), first {s['report_window']:,} tokens of each, one "
        f"causal pass per plan; retention = perplexity of the first {s['retention_length']:,} tokens; trained length "
        f"{s['trained_length']:,}. None of these documents was used to tune. Δ vs YaRN: perplexity ratio − 1 with a "
        "95% interval from a paired block bootstrap over position buckets; per document: the range of that ratio.",
        "",
        "| rank | plan | ppl @ target | Δ vs yarn (95% CI) | per document | retention ppl | vs none | "
        "NLL ≥ L | disturbance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["vs_yarn_ci95"]
        docs = r["per_document_vs_yarn"]
        lines.append(
            f"| {r['rank']} | {'**tuned**' if r['label'] == 'tuned' else r['label']} | {r['ppl']:.3f} | "
            f"{pct(r['vs_yarn'])} ({pct(lo)} … {pct(hi)}) | {pct(min(docs))} … {pct(max(docs))} | "
            f"{r['retention_ppl']:.3f} | {pct(r['retention_vs_none'])} | {r['nll_beyond']:.4f} | "
            f"{r['disturbance']:.2f} |"
        )
    lines += [
        "",
        "The disturbance (1000 × mean KL between each pair's angle histogram in pre-training and under the plan) "
        "says how far a plan moves the angle statistics; it is not a quality score, and a lower one is not a "
        "better plan (on SmolLM2-135M the two ranked methods in opposite orders).",
        "",
        "## The tuned plan",
        "",
        f"Chosen from {tuned['chosen_from']} of the {tuned['family']} family; attention factor "
        f"{tuned['attention_factor']:.4f}; {'meets' if tuned['feasible'] else 'does NOT meet'} the retention "
        f"tolerance ({s['retention_tolerance']:.1%}) on the tuning documents.",
        "",
        "Factors by pair (pair 0 = highest frequency): " + " ".join(f"{f:.3g}" for f in tuned["factors"]),
        "",
        "Apply it:",
        "",
        "```bash",
        f"ropekit extend MODEL --method tuned --from-study {out} --target-length {s['target_length']} --out EXTENDED",
        f"ropekit extend MODEL.gguf --method tuned --from-study {out} --target-length {s['target_length']} "
        "--out EXTENDED.gguf",
        "```",
        "",
        "Exports beside this report: " + ", ".join(f"`{Path(p).name}`" for p in results["exports"].values()) + ".",
        "",
        "## The search",
        "",
        f"{len(results['trials'])} complete trials ({s['sampler']}, {s['search_dimensions']} parameters), "
        f"objective {s['objective']} on the tuning documents ({', '.join(ctx.tuning.names)}, first {s['window']:,} "
        f"tokens), retention tolerance {s['retention_tolerance']:.1%} against the unscaled model "
        f"(ppl {results['reference_retention']:.3f}).",
        "",
        "| screened plan | NLL ≥ L (tuning) | retention vs none | feasible |",
        "|---|---|---|---|",
    ]
    for r in sorted(results["screen"], key=lambda r: r.get("nll_beyond", math.inf)):
        beyond = "—" if r.get("nll_beyond") is None else f"{r['nll_beyond']:.4f}"
        lines.append(
            f"| {r['label']} | {beyond} | {pct(r['retention_ratio'] - 1)} | {'yes' if r['feasible'] else 'no'} |"
        )
    lines += ["", *(f"![{name}]({name})" for name in results["figures"]), ""]
    p = results["process"]
    lines.append(
        f"This process: {p['wall_seconds'] / 60:.1f} min, {p['forward_passes']} document passes "
        f"({p['forward_pass_seconds'] / 60:.1f} min); {p['cells_in_store']} measured cells in the store."
    )
    return "\n".join(lines) + "\n"


def pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def plot_objective(trials: list[dict[str, Any]], screen: list[dict[str, Any]], path: Path) -> Path:
    """NLL beyond L by trial; rejected plans on a band above; the running best; seeds and YaRN marked."""
    fig, ax = new_figure(figsize=(7.5, 4.2))
    feasible = [(t["number"], t["nll_beyond"]) for t in trials if t.get("feasible") and "nll_beyond" in t]
    measured_infeasible = [
        (t["number"], t["nll_beyond"]) for t in trials if not t.get("feasible") and "nll_beyond" in t
    ]
    rejected = [t["number"] for t in trials if "nll_beyond" not in t]
    if feasible:
        ax.plot(*zip(*feasible), "o", color="tab:blue", ms=4, label="feasible")
        best, xs, ys = math.inf, [], []
        for n, v in sorted(feasible):
            best = min(best, v)
            xs.append(n)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:blue", lw=1.5, label="best feasible so far")
    if measured_infeasible:
        ax.plot(*zip(*measured_infeasible), "x", color="tab:orange", ms=5, label="over the retention tolerance")
    values = [v for _, v in feasible + measured_infeasible]
    top = max(values) if values else 1.0
    bottom = min(values) if values else 0.0
    if rejected:
        band = top + 0.08 * max(top - bottom, 0.05)
        ax.plot(rejected, [band] * len(rejected), "|", color="tab:red", ms=10, label="rejected at the retention check")
    for t in trials:
        if "seed" in t and "nll_beyond" in t:
            ax.annotate(
                t["seed"], (t["number"], t["nll_beyond"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    yarn = next((r for r in screen if r["label"] == "yarn" and r.get("nll_beyond") is not None), None)
    if yarn is not None:
        ax.axhline(yarn["nll_beyond"], color="grey", ls="--", lw=1, label="yarn (screened)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("NLL beyond the trained length (nats, tuning documents)")
    ax.set_title("objective by trial" if trials else "objective by trial (no search trials yet)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_factors(tuned: Plan, plans: dict[str, Plan], seeds: list[dict[str, Any]], path: Path) -> Path:
    """Per-pair factors (log scale) of the winner, its seeds and YaRN."""
    fig, ax = new_figure(figsize=(7.5, 4.2))
    pairs = np.arange(len(tuned.factors))
    shown = ["yarn", *[s["label"] for s in seeds]]
    for label in dict.fromkeys(shown):
        if label in plans:
            p = plans[label]
            ax.plot(pairs, p.factors, marker=".", lw=1, alpha=0.7, label=f"{label} (a = {p.attention_factor:.3f})")
    ax.plot(pairs, tuned.factors, marker="o", lw=2.2, color="black", label=f"tuned (a = {tuned.attention_factor:.3f})")
    crit = [i for i, w in enumerate(tuned.spec.wavelengths().tolist()) if w > tuned.spec.context_length]
    if crit:
        ax.axvline(crit[0] - 0.5, color="grey", ls=":", lw=1, label="first pair without a full turn in L")
    ax.set_yscale("log", base=2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("pair i (0 = highest frequency)")
    ax.set_ylabel("factor f_i (θ'_i = θ_i / f_i)")
    ax.set_title("per-pair factors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_nll_by_position(
    rows: list[dict[str, Any]], measured: dict[str, dict[str, Any]], ctx: Context, path: Path
) -> Path:
    """Held-out NLL by position (buckets merged to ≤ MAX_POINTS points), best plans first in the legend."""
    fig, ax = new_figure(figsize=(7.5, 4.2))
    for row in rows:
        starts, values = position_curve(measured[row["label"]])
        style = {"color": "black", "lw": 2.2} if row["label"] == "tuned" else {"lw": 1, "alpha": 0.8}
        ax.plot(starts, values, label=f"{row['label']} ({row['ppl']:.2f})", **style)
    ax.axvline(ctx.spec.context_length, color="grey", ls=":", lw=1.2, label="trained length")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("NLL (nats, held-out)")
    ax.set_title("NLL by position (perplexity over the window in brackets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def position_curve(result: dict[str, Any]) -> tuple[list[int], list[float]]:
    """(bucket start, token-weighted mean NLL over documents) with buckets merged to ≤ MAX_POINTS."""
    bucket = result["bucket"]
    sums = np.zeros(len(result["per_document"][0]["bucket_nll"]))
    counts = np.zeros_like(sums)
    for doc in result["per_document"]:
        n = np.asarray(doc["bucket_tokens"], dtype=float)
        sums += np.asarray([v or 0.0 for v in doc["bucket_nll"]]) * n
        counts += n
    merge = max(1, math.ceil(len(sums) / MAX_POINTS))
    starts, values = [], []
    for i in range(0, len(sums), merge):
        c = counts[i : i + merge].sum()
        if c > 0:
            starts.append(i * bucket)
            values.append(float(sums[i : i + merge].sum() / c))
    return starts, values
