"""A model card: what ropekit sees in a model's RoPE, and what it can do with it."""

from __future__ import annotations

from typing import Any

from ropekit.apply.extend import read_record
from ropekit.apply.patch import SUPPORTED_FAMILIES
from ropekit.plan.analysis.bounds import critical_dimension, extrapolation_bound
from ropekit.plan.geometry import RopeSpec, load_config_dict, spec_from_config_dict


def model_card(path_or_id: str) -> dict[str, Any]:
    """Geometry, current scaling block, critical dimension, trained context, and next steps."""
    if str(path_or_id).lower().endswith(".gguf"):
        from ropekit.apply.gguf import gguf_card

        return gguf_card(path_or_id)
    cfg = load_config_dict(path_or_id)
    spec: RopeSpec = spec_from_config_dict(cfg, name=str(path_or_id))
    family = cfg.get("model_type", "unknown")
    crit = critical_dimension(spec)
    record = read_record(path_or_id)
    card: dict[str, Any] = {
        "model_type": family,
        "head_dim": spec.head_dim,
        "rotary_dim": spec.rotary_dim,
        "rope_theta": spec.base,
        "trained_context": spec.original_length,
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "current_scaling": spec.current_scaling or "none",
        "critical_dimension": crit,
        "pairs_without_full_turn": f"{spec.num_pairs - crit // 2} of {spec.num_pairs} (pairs ≥ {crit // 2})",
        "extrapolation_bound": round(extrapolation_bound(spec)),
        "ropekit_plan": (record or {}).get("plan", {}).get("method", "none"),
    }
    target = 4 * spec.original_length
    if family in SUPPORTED_FAMILIES:
        card["next"] = (f"ropekit plan --model {path_or_id} --target-length {target} --compare; "
                        f"ropekit extend {path_or_id} --method dprope --target-length {target} --out DIR")
    else:
        card["next"] = (f"ropekit plan --model {path_or_id} --target-length {target} (planning and export work; "
                        f"applying to a loaded '{family}' model is not tested)")
    return card
