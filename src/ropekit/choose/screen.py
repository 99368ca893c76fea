"""The plans `ropekit tune` screens: every registered method that runs from the geometry alone, with its
paper/default settings, and the attention-factor variants that matter.

Labels:
  * each method of `ropekit.plan.registry.comparable_methods` under its own name (none, pi, ntk,
    dynamic-ntk, yarn, llama3, base, resonance, dprope);
  * ``dprope-n``: dprope at the paper's setting, interpolating the n = d − d_extra dimensions past
    the critical dimension;
  * ``yarn-a1``: YaRN without its attention factor (a = 1);
  * ``M+a`` for pi, ntk, llama3, dprope and dprope-n: the method's factors with YaRN's attention
    factor a = 0.1·ln s + 1 (the real-model study found the missing factor costs dprope most of
    its gap to YaRN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ropekit.errors import RopekitError, did_you_mean
from ropekit.plan.analysis.bounds import critical_dimension
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods.yarn import yarn_attention_factor
from ropekit.plan.registry import comparable_methods
from ropekit.plan.registry import plan as make_plan
from ropekit.plan.scaling import Plan

WITH_YARN_ATTENTION = ("pi", "ntk", "llama3", "dprope", "dprope-n")  # methods whose a = 1, given YaRN's a
NAMED = ("none", "pi", "ntk", "yarn", "llama3", "dprope", "dprope-n", "base")  # the README's comparison


@dataclass(frozen=True)
class Screened:
    """One screened plan: its label, how it was made, and the plan."""

    label: str
    method: str
    params: dict[str, Any]
    attention_override: float | None
    plan: Plan


def screen_labels(spec: RopeSpec) -> list[str]:
    """Every label `screen_plans` can build for this geometry, in the order they are screened."""
    methods = comparable_methods(spec)
    labels = [*methods, "dprope-n", "yarn-a1"]
    labels += [f"{m}+a" for m in WITH_YARN_ATTENTION if m in labels]
    return labels


def screen_plans(spec: RopeSpec, target_length: int, labels: list[str] | None = None) -> list[Screened]:
    """The plans of `labels` (default: every screen label) for `spec` at `target_length`."""
    known = screen_labels(spec)
    chosen = labels if labels else known
    for label in chosen:
        if label not in known:
            raise did_you_mean("screened plan", label, known)
    chosen = ["none", *(label for label in chosen if label != "none")]  # first: the retention reference
    return [screened(spec, target_length, label) for label in chosen]


def screened(spec: RopeSpec, target_length: int, label: str) -> Screened:
    """One screen label as a plan (see the module docstring)."""
    base_label, plus_a = (label[:-2], True) if label.endswith("+a") else (label, False)
    method, params = _method_of(spec, base_label)
    override = None
    if plus_a:
        override = yarn_attention_factor(target_length / spec.context_length)
    elif base_label == "yarn-a1":
        override = 1.0
    plan = make_plan(spec, target_length, method, **params)
    if override is not None:
        plan = make_plan(spec, target_length, "tuned", factors=plan.factors, attention_factor=override)
    return Screened(label, method, params, override, plan)


def _method_of(spec: RopeSpec, label: str) -> tuple[str, dict[str, Any]]:
    if label == "dprope-n":
        n = spec.rotary_dim - critical_dimension(spec)
        if n <= 0:
            raise RopekitError("dprope-n needs pairs past the critical dimension; this geometry has none")
        return "dprope", {"interpolated_dims": n}
    if label == "yarn-a1":
        return "yarn", {}
    return label, {}
