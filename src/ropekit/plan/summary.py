"""A plan as plain data: the JSON `ropekit plan --json` prints, and rows for the per-pair CSV."""

from __future__ import annotations

from typing import Any

from ropekit._version import __version__
from ropekit.plan.analysis.bounds import critical_dimension, extrapolation_bound, full_rotation_seen
from ropekit.plan.scaling import ROTATION_REMOVED, Plan


def finite_or_null(factors: tuple[float, ...]) -> list[float | None]:
    """Factors for JSON: a pair whose rotation is removed (f = ∞) is null, never `Infinity` (listed in removed_pairs)."""
    return [None if f == ROTATION_REMOVED else f for f in factors]


def plan_summary(plan: Plan, *, disturbance_by_method: dict[str, float] | None = None) -> dict[str, Any]:
    """Every number of the plan, JSON-ready. Units: lengths in tokens, inv_freq in rad/token,
    disturbance in the paper's units (1000 × mean_i KL), pair disturbance in nats."""
    spec = plan.spec
    interpolated = plan.interpolated_pairs
    out: dict[str, Any] = {
        "ropekit_version": __version__,
        "method": plan.method,
        "params": {k: v for k, v in plan.params.items()},
        "source": spec.name,
        "head_dim": spec.head_dim,
        "partial_rotary_factor": spec.partial_rotary_factor,
        "rotary_dim": spec.rotary_dim,
        "rope_theta": spec.base,
        "context_length": spec.context_length,
        "pretrained_length": spec.pretrained_length,
        "original_length": spec.context_length,  # the earlier name of context_length, kept for readers of old files
        "target_length": plan.target_length,
        "scale": plan.scale,
        "factors": finite_or_null(plan.factors),
        "inv_freq": [float(x) for x in plan.inv_freq.tolist()],
        "attention_factor": plan.attention_factor,
        "disturbance": plan.disturbance,
        "pair_disturbance": plan.pair_disturbance.tolist(),
        "bins": plan.bins,
        "interpolated_pairs": interpolated,
        "num_interpolated_pairs": len(interpolated),
        "interpolated_dims": 2 * len(interpolated),
        "removed_pairs": plan.removed_pairs,
        "critical_dimension": critical_dimension(spec),
        "extrapolation_bound": extrapolation_bound(spec),
        "details": {k: v for k, v in plan.scaling.details.items() if k != "pair_disturbance"},
        "layer_type": spec.layer_type,
        "original_length_source": spec.length_source,
    }
    if spec.is_extended:
        out["existing_scaling"] = {
            "rope_type": (spec.current_scaling or {}).get("rope_type"),
            "pretrained_length": spec.pretrained_length,
            "factors": list(spec.prior_factors or ()),
            "attention_factor": spec.prior_attention_factor,
        }
        out["runtime_factors"] = finite_or_null(plan.runtime_factors)
    if disturbance_by_method is not None:
        out["disturbance_by_method"] = disturbance_by_method
    return out


def per_pair_rows(plans: dict[str, Plan]) -> list[dict[str, Any]]:
    """One row per pair: geometry, then factor_<method> and disturbance_<method> columns."""
    first = next(iter(plans.values()))
    spec = first.spec
    base_inv = spec.inv_freq().tolist()
    wavelengths = spec.wavelengths().tolist()
    seen = full_rotation_seen(spec).tolist()
    rows = []
    for i in range(spec.num_pairs):
        row: dict[str, Any] = {
            "pair": i,
            "inv_freq": base_inv[i],
            "wavelength": wavelengths[i],
            "full_rotation_seen": seen[i],
        }
        for name, p in plans.items():
            row[f"factor_{name}"] = p.factors[i] if i not in p.removed_pairs else None
            row[f"disturbance_{name}"] = float(p.pair_disturbance[i])
        rows.append(row)
    return rows
