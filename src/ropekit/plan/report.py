"""A plan together with the comparison `ropekit plan` prints: every method's disturbance, and the
published setting of a method that has one (dprope's n for LLaMA-2). No files: see
`ropekit.apply.plan_dir.write_plan_directory` for the exports and plan.json.

>>> report = plan_report(RopeSpec.from_preset("llama2-7b"), 16384, "pi")
>>> report.label, round(report.disturbance_by_method["pi"], 2)
('pi', 33.68)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ropekit.errors import RopekitError
from ropekit.plan.analysis.angles import DEFAULT_BINS
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.registry import DEFAULT_METHOD, METHODS, comparison, get_method, plan
from ropekit.plan.scaling import Plan
from ropekit.plan.summary import plan_summary


@dataclass(frozen=True)
class PlanReport:
    """One plan, its row label in the comparison, and (when compared) every method's disturbance."""

    plan: Plan
    label: str  # the plan's row in the comparison: its method, or e.g. "dprope (paper, n=64)"
    disturbance_by_method: dict[str, float] | None  # 1000 × mean KL per method; None when not compared
    exports: dict[str, Path] = field(default_factory=dict)  # {kind: path} once written (write_plan_directory)
    skipped: dict[str, str] = field(default_factory=dict)  # methods left out of the comparison, with the reason

    def summary(self) -> dict[str, Any]:
        """plan.json / `ropekit plan --json`: `plan_summary`, the comparison when made, the exports when written."""
        out = plan_summary(self.plan, disturbance_by_method=self.disturbance_by_method)
        if self.skipped:
            out["skipped_methods"] = dict(self.skipped)
        if self.exports:
            out["exports"] = {kind: str(path) for kind, path in self.exports.items()}
        return out


def plan_report(
    spec: RopeSpec,
    target_length: int,
    method: str = DEFAULT_METHOD,
    *,
    bins: int = DEFAULT_BINS,
    compare_methods: bool = True,
    paper_setting: bool = False,
    **params: Any,
) -> PlanReport:
    """Plan `method` (with `params`, or its paper's setting) and, with `compare_methods`, score every method.

    The comparison holds each comparable method with default parameters, the published setting of
    each method that has one for this geometry and target, and this plan with the user's own
    parameters (they win over the defaults under the method's name).
    """
    label = get_method(method).name
    if paper_setting:
        label, setting = published_setting(method, spec, target_length, params)
        params = {**params, **setting}
    chosen = plan(spec, target_length, method, bins=bins, **params)
    scores: dict[str, float] | None = None
    skipped: dict[str, str] = {}
    if compare_methods:
        plans, skipped = comparison(spec, target_length, bins=bins)
        scores = {name: p.disturbance for name, p in plans.items()}
        scores.update(published_setting_scores(spec, target_length, bins))
        scores[label] = chosen.disturbance
        skipped.pop(label, None)
    return PlanReport(chosen, label, scores, skipped=skipped)


def published_setting(
    method: str, spec: RopeSpec, target_length: int, params: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """(label, parameters) of the method's published setting for this geometry and target (`paper_setting`),
    or one clear error (no such setting, or one of its parameters also given)."""
    m = get_method(method)
    if m.paper_setting is None:
        having = [n for n, r in METHODS.items() if r.paper_setting is not None]
        raise RopekitError(f"--paper-setting applies to --method {' or '.join(having)}")
    label, setting = m.paper_setting(spec, target_length)
    both = [k for k in setting if k in params]
    if both:
        raise RopekitError(f"give --paper-setting or {both[0]} (--{both[0].replace('_', '-')}), not both")
    return f"{m.name} (paper, {label})", setting


def published_setting_scores(spec: RopeSpec, target_length: int, bins: int) -> dict[str, float]:
    """{'dprope (paper, n=N)': disturbance} for each method with a published setting for this geometry and target."""
    scores = {}
    for name, m in METHODS.items():
        if m.paper_setting is None or not m.in_default_comparison:
            continue
        try:
            label, setting = m.paper_setting(spec, target_length)
        except RopekitError:  # no setting for this geometry or target
            continue
        scores[f"{name} (paper, {label})"] = plan(spec, target_length, name, bins=bins, **setting).disturbance
    return scores
