"""Rich tables for the terminal (stdout stays clean JSON under --json)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ropekit.plan.analysis.bounds import critical_dimension, extrapolation_bound, full_rotation_seen
from ropekit.plan.report import PlanReport
from ropekit.plan.scaling import Plan


def geometry_header(console: Console, plan: Plan) -> None:
    spec = plan.spec
    console.print(f"[bold]{spec.name or 'model'}[/]: {spec.describe()}")
    if spec.is_extended:
        console.print(
            f"planning from its current frequencies over {spec.context_length} tokens "
            f"({spec.length_source}); --from-scratch plans from plain RoPE at {spec.pretrained_length}"
        )
    if spec.layer_type:
        console.print(
            f"this plan changes the {spec.layer_type} layers only; other layer types keep their RoPE "
            "(plan them with --layer-type)"
        )
    console.print(
        f"target {plan.target_length} tokens (scale s = {plan.scale:g}); critical dimension "
        f"{critical_dimension(spec)} of {spec.rotary_dim} (pairs ≥ {critical_dimension(spec) // 2} never completed a "
        f"rotation in pre-training); extrapolation bound {extrapolation_bound(spec):,.0f} tokens"
    )


def pair_table(plan: Plan) -> Table:
    """Per-pair plan: wavelength, whether a full rotation was seen, factor, and disturbance."""
    details = plan.scaling.details
    has_candidates = "d_extrapolation" in details
    t = Table(title=f"{plan.method}: per-pair plan (D in nats; θ'_i = θ_i / f_i)")
    for col in ("pair", "wavelength", "turn in L"):
        t.add_column(col, justify="right")
    if has_candidates:
        t.add_column("D extra", justify="right")
        t.add_column("D interp", justify="right")
    t.add_column("factor f", justify="right")
    t.add_column("D chosen" if has_candidates else "D", justify="right")
    wavelengths = plan.spec.wavelengths().tolist()
    seen = full_rotation_seen(plan.spec).tolist()
    for i, f in enumerate(plan.factors):
        row = [str(i), f"{wavelengths[i]:,.1f}", "yes" if seen[i] else "no"]
        if has_candidates:
            row += [f"{details['d_extrapolation'][i]:.4f}", f"{details['d_interpolation'][i]:.4f}"]
        removed = i in plan.removed_pairs
        style = "bold" if i in plan.interpolated_pairs else None
        row += ["removed" if removed else f"{f:.4g}", f"{float(plan.pair_disturbance[i]):.4f}"]
        t.add_row(*row, style=style)
    return t


DISTURBANCE_CAVEAT = (
    "The disturbance measures how far a plan moves each pair's angle distribution, not how well the model "
    "works: on SmolLM2-135M, lower disturbance went with worse perplexity (Spearman ρ = −0.83 at s = 2). "
    "`ropekit tune` measures which plan works on your model."
)


def comparison_table(scores: dict[str, float], chosen: str, skipped: dict[str, str] | None = None) -> Table:
    """Every method's disturbance, lowest first; methods that do not apply to the geometry last, with why."""
    t = Table(
        title="disturbance by method (1000 × mean KL; lower = angle statistics closer to pre-training)",
        caption=DISTURBANCE_CAVEAT,
    )
    t.add_column("method")
    t.add_column("disturbance", justify="right")
    t.add_column("vs pi", justify="right")
    pi = scores.get("pi")
    for name, value in sorted(scores.items(), key=lambda kv: kv[1]):
        rel = f"{100 * (value / pi - 1):+.0f}%" if pi else ""
        t.add_row(f"[bold]{name}[/] ←" if name == chosen else name, f"{value:.3f}", rel)
    for name, reason in (skipped or {}).items():
        t.add_row(name, "skipped", reason)
    return t


def print_plan(console: Console, report: PlanReport) -> None:
    """`ropekit plan`'s tables: the geometry, the per-pair plan, the comparison, and a one-line verdict."""
    plan = report.plan
    geometry_header(console, plan)
    console.print(pair_table(plan))
    if report.disturbance_by_method is not None:
        console.print(comparison_table(report.disturbance_by_method, report.label, report.skipped))
    removed = f", {len(plan.removed_pairs)} no longer rotate" if plan.removed_pairs else ""
    console.print(
        f"[bold]{plan.method}[/]: disturbance {plan.disturbance:.3f}, attention factor "
        f"{plan.attention_factor:.4f}, {len(plan.interpolated_pairs)} of {plan.spec.num_pairs} pairs interpolated"
        + removed
    )
