"""The last stage of `ropekit tune`: choose the winner, measure the report set on held-out text, write.

Everything reported is measured on the held-out documents (one pass per document over the report
window); tuning numbers appear only as the search's own trace (objective by trial). Noise:

  * spread across held-out documents: each document's perplexity ratio to YaRN;
  * a paired block bootstrap over position buckets: the (document, bucket) blocks of the NLL
    difference to YaRN are resampled with replacement (2,000 draws, seeded), giving a 95%
    interval of the perplexity ratio exp(mean ΔNLL), token-weighted.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ropekit.choose.screen import screened
from ropekit.choose.study import (
    Context,
    best_feasible,
    completed,
    progress_bar,
    redact,
    storage_url,
    sync_manifest,
    write_json_atomically,
    write_marker,
)
from ropekit.eval.store import plan_fingerprint

if TYPE_CHECKING:
    import optuna

    from ropekit.plan.scaling import Plan

BOOTSTRAP_DRAWS = 2000
REFERENCE = "yarn"  # the plan every other is compared with


def finish(ctx: Context, study: optuna.Study) -> dict[str, Any]:
    """Winner, held-out report, plan.json with every export, report.md, results.json and plots."""
    from ropekit.choose.report import markdown_report, plot_factors, plot_nll_by_position, plot_objective

    trials = trial_rows(study)
    winner = choose_winner(trials, ctx.screen)
    tuned_plan = ctx.plan_of(winner["factors"], winner["attention_factor"])
    plans = report_plans(ctx, tuned_plan, study)
    measured = measure_held_out(ctx, plans)
    rows = ranked_rows(ctx, plans, measured)
    block = tuned_block(ctx, study, winner, tuned_plan, rows)
    out = Path(ctx.cfg.out)
    exports = write_plan(out, tuned_plan, block)
    figures = [
        plot_objective(trials, ctx.screen, out / "objective_by_trial.png"),
        plot_factors(tuned_plan, plans, study.user_attrs.get("seeds") or [], out / "factors.png"),
        plot_nll_by_position(rows, measured, ctx, out / "nll_by_position.png"),
    ]
    results = {
        "status": "finished",
        "identity": ctx.identity,
        "provenance": ctx.provenance,
        "settings": settings_of(ctx),
        "reference_retention": ctx.reference_retention,
        "screen": ctx.screen,
        "trials": trials,
        "winner": winner,
        "tuned": block,
        "held_out": rows,
        "exports": {k: str(v) for k, v in exports.items()},
        "figures": [p.name for p in figures],
        "process": {
            "wall_seconds": time.monotonic() - ctx.started,
            "forward_pass_seconds": ctx.measurer.seconds,
            "forward_passes": ctx.measurer.passes,
            "cells_in_store": len(ctx.measurer.store),
        },
    }
    (out / "report.md").write_text(markdown_report(results, ctx))
    write_marker(out, results)
    sync_manifest(out, ["report.md", *(p.name for p in exports.values()), *(p.name for p in figures)])
    return results


# ---- trials and the winner --------------------------------------------------------------------------


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Every complete trial as plain data (number, value, parameters and the measured attributes), in trial order."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [{"number": t.number, "value": t.value, "params": dict(t.params), **t.user_attrs} for t in done]


def choose_winner(trials: list[dict[str, Any]], screen: list[dict[str, Any]]) -> dict[str, Any]:
    """The best feasible plan among trials and screened plans (the least infeasible if none is feasible).

    Its factors are read back from the plan the trial measured (`factors` of the trial's user attrs).
    """
    candidates = [dict(r, source=f"trial {r['number']}") for r in trials if "factors" in r]
    candidates += [dict(r, source=f"screened {r['label']}") for r in screen]
    if not candidates:
        raise RuntimeError("no measured plan to choose from")
    return min(candidates, key=lambda r: (not r.get("feasible", False), float(r["value"])))


def report_plans(ctx: Context, tuned_plan: Plan, study: optuna.Study) -> dict[str, Plan]:
    """label → plan for the held-out report: tuned, its seeds, none, YaRN and the report methods."""
    labels = [s["label"] for s in study.user_attrs.get("seeds") or []] if ctx.cfg.report_seeds else []
    labels += ["none", REFERENCE, *ctx.cfg.report_methods]
    plans: dict[str, Plan] = {"tuned": tuned_plan}
    for label in labels:
        if label not in plans:
            plans[label] = screened(ctx.spec, ctx.cfg.target_length, label).plan
    return plans


def measure_held_out(ctx: Context, plans: dict[str, Plan]) -> dict[str, dict[str, Any]]:
    """label → `PositionNLL.as_dict()` on the held-out documents over the report window."""
    P = ctx.retention_length
    bar = progress_bar(ctx, total=len(plans), desc="held-out report", unit="plan")
    out = {}
    for label, plan in plans.items():
        bar.set_postfix_str(label)
        out[label] = ctx.measurer.window(plan, ctx.held_out, ctx.report_window, prefixes=(P,))
        bar.update(1)
    bar.close()
    return out


def ranked_rows(ctx: Context, plans: dict[str, Plan], measured: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per report plan, best held-out perplexity first, with noise against YaRN."""
    P = str(ctx.retention_length)
    none_retention = measured["none"]["prefix_ppl"][P]
    reference = measured[REFERENCE]
    tuning = {r["label"]: r for r in ctx.screen}
    rows = []
    for label, r in measured.items():
        plan = plans[label]
        ratio, lo, hi = paired_bootstrap(r, reference, seed=ctx.cfg.seed)
        per_doc = [math.exp(d["nll"]) for d in r["per_document"]]
        ref_doc = [math.exp(d["nll"]) for d in reference["per_document"]]
        rows.append(
            {
                "label": label,
                "ppl": math.exp(r["nll"]),
                "retention_ppl": r["prefix_ppl"][P],
                "retention_vs_none": r["prefix_ppl"][P] / none_retention - 1,
                "nll_beyond": r["nll_beyond"],
                "nll_within": r["nll_within"],
                "disturbance": plan.disturbance,
                "attention_factor": plan.attention_factor,
                "factors": list(plan.factors),
                "plan": plan_fingerprint(plan),
                "vs_yarn": ratio - 1,
                "vs_yarn_ci95": [lo - 1, hi - 1],
                "per_document_ppl": dict(zip(ctx.held_out.names, per_doc)),
                "per_document_vs_yarn": [a / b - 1 for a, b in zip(per_doc, ref_doc)],
                "tuning_nll_beyond": tuning.get(label, {}).get("nll_beyond"),
            }
        )
    rows.sort(key=lambda row: row["ppl"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def paired_bootstrap(a: dict[str, Any], b: dict[str, Any], *, seed: int) -> tuple[float, float, float]:
    """(ratio, 2.5%, 97.5%) of exp(mean NLL_a − mean NLL_b) over resampled (document, bucket) blocks."""
    diffs, weights = [], []
    for da, db in zip(a["per_document"], b["per_document"]):
        for x, y, n in zip(da["bucket_nll"], db["bucket_nll"], da["bucket_tokens"]):
            if x is not None and y is not None and n:
                diffs.append(x - y)
                weights.append(n)
    d, w = np.asarray(diffs), np.asarray(weights, dtype=float)
    point = math.exp(float((d * w).sum() / w.sum()))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(d), size=(BOOTSTRAP_DRAWS, len(d)))  # (draws, blocks)
    means = (d[draws] * w[draws]).sum(axis=1) / w[draws].sum(axis=1)
    lo, hi = np.exp(np.percentile(means, [2.5, 97.5]))
    return point, float(lo), float(hi)


# ---- the tuned plan and its files -------------------------------------------------------------------


def tuned_block(
    ctx: Context,
    study: optuna.Study,
    winner: dict[str, Any],
    plan: Plan,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """What `ropekit extend --method tuned --from-study DIR` reads: the plan and the study's provenance."""
    spec = ctx.spec
    held_out = next(r for r in rows if r["label"] == "tuned")
    return {
        "factors": list(plan.factors),
        "attention_factor": plan.attention_factor,
        "target_length": ctx.cfg.target_length,
        "geometry": {
            "head_dim": spec.head_dim,
            "rotary_dim": spec.rotary_dim,
            "rope_theta": spec.base,
            "context_length": spec.context_length,
        },
        "family": ctx.space.family,
        "chosen_from": winner["source"],
        "feasible": bool(winner.get("feasible")),
        "tuning": {
            "objective": ctx.cfg.objective,
            "value": winner["value"],
            "nll_beyond": winner.get("nll_beyond"),
            "retention_ratio": winner.get("retention_ratio"),
        },
        "held_out": {k: held_out[k] for k in ("ppl", "retention_ppl", "retention_vs_none", "vs_yarn", "vs_yarn_ci95")},
        "study": {
            "name": study.study_name,
            "storage": redact(storage_url(ctx)),
            "complete_trials": completed(study),
            "trials_requested": ctx.cfg.trials,
            "budget_minutes": ctx.cfg.budget_minutes,
            "sampler": ctx.cfg.sampler,
            "seed": ctx.cfg.seed,
            "best_feasible_trial": getattr(best_feasible(study), "number", None),
        },
        "provenance": ctx.provenance,
        "settings": settings_of(ctx),
    }


def settings_of(ctx: Context) -> dict[str, Any]:
    return {
        "target_length": ctx.cfg.target_length,
        "trained_length": ctx.spec.context_length,
        "window": ctx.window,
        "report_window": ctx.report_window,
        "retention_length": ctx.retention_length,
        "retention_tolerance": ctx.cfg.retention_tolerance,
        "family": ctx.space.family,
        "search_dimensions": ctx.space.dimensions,
        "attention_range": list(ctx.space.attention_range),
        "objective": ctx.cfg.objective,
        "sampler": ctx.cfg.sampler,
        "trials": ctx.cfg.trials,
        "budget_minutes": ctx.cfg.budget_minutes,
        "seeds": ctx.cfg.seeds,
        "bucket": ctx.cfg.bucket,
        "penalty": "1000 + log(retention ratio) − log(1 + tolerance) nats for a plan over the tolerance",
    }


def write_plan(out: Path, plan: Plan, block: dict[str, Any]) -> dict[str, Path]:
    """plan.json (the `tuned` method's record) and every export, each file replaced atomically."""
    from ropekit.apply.export import write_exports
    from ropekit.plan.summary import plan_summary

    staging = Path(tempfile.mkdtemp(prefix=".exports-", dir=out))
    try:
        written = write_exports(plan, staging)
        summary = plan_summary(plan)
        summary["params"] = {"study": "(this directory)"}
        record = {"written_by": "ropekit", **summary, "tuned": block}
        record["exports"] = {k: p.name for k, p in written.items()}
        write_json_atomically(staging / "plan.json", record)
        final = {}
        for path in [*written.values(), staging / "plan.json"]:
            os.replace(path, out / path.name)
            final[path.stem] = out / path.name
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)
