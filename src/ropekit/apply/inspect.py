"""A model card: what ropekit sees in a model's RoPE, and what it can do with it."""

from __future__ import annotations

import math
from typing import Any

from ropekit.apply.extend import read_record
from ropekit.apply.readers import (
    SUPPORTED_MODEL_TYPES,
    layer_rope_blocks,
    load_config_dict,
    spec_from_config_dict,
    text_config_of,
)
from ropekit.plan.analysis.bounds import critical_dimension, extrapolation_bound
from ropekit.plan.geometry import RopeSpec


def model_card(path_or_id: str) -> dict[str, Any]:
    """Geometry, current scaling block, critical dimension, trained context, and next steps.

    For an already-extended model the trained context is the one it runs at with its current
    scaling, and the suggested target is never below it. Per-layer-type models (Gemma 3) get one
    entry per layer type under `layer_types`; the top-level numbers are the full-attention layers'.
    A `.gguf` file gets the GGUF card (`ropekit.apply.gguf.gguf_card`).
    """
    if str(path_or_id).lower().endswith(".gguf"):
        from ropekit.apply.gguf import gguf_card

        return gguf_card(path_or_id)
    cfg = load_config_dict(path_or_id)
    spec: RopeSpec = spec_from_config_dict(cfg, name=str(path_or_id))
    family = cfg.get("model_type", "unknown")
    record = read_record(path_or_id)
    card: dict[str, Any] = {
        "model_type": family,
        **_geometry(spec),
        "max_position_embeddings": text_config_of(cfg, str(path_or_id)).get("max_position_embeddings"),
        "ropekit_plan": (record or {}).get("plan", {}).get("method", "none"),
    }
    blocks = layer_rope_blocks(text_config_of(cfg, str(path_or_id)))
    if blocks is not None:
        card["layer_types"] = {
            lt: _geometry(spec_from_config_dict(cfg, name=str(path_or_id), layer_type=lt))
            | {"extended_by_default": lt == spec.layer_type}
            for lt, block in blocks.items()
            if block is not None
        }
    if record is not None and "training" not in record and spec.is_extended:
        card["note"] = (
            f"extended by ropekit without fine-tuning: it was never trained at {spec.context_length} "
            f"tokens; pass --from-scratch to plan from its RoPE before that extension "
            f"({spec.pretrained_length} tokens)"
        )
    card["next"] = _next_steps(path_or_id, spec, family)
    return card


def _geometry(spec: RopeSpec) -> dict[str, Any]:
    crit = critical_dimension(spec)
    bound = extrapolation_bound(spec)
    out = {
        "layer_type": spec.layer_type,
        "head_dim": spec.head_dim,
        "rotary_dim": spec.rotary_dim,
        "rope_theta": spec.base,
        "current_scaling": spec.current_scaling or "none",
        "trained_context": spec.context_length,
        "trained_context_source": _length_reason(spec),
        "critical_dimension": crit,
        "pairs_without_full_turn": f"{spec.num_pairs - crit // 2} of {spec.num_pairs}",
        "extrapolation_bound": round(bound) if math.isfinite(bound) else "unbounded (every pair completed a turn)",
    }
    if spec.layer_type is None:
        del out["layer_type"]
    if spec.is_extended:
        out["planning_from"] = (
            f"its current {(spec.current_scaling or {}).get('rope_type')} frequencies over "
            f"{spec.context_length} tokens (attention factor {spec.prior_attention_factor:.4f}); "
            f"--from-scratch plans from plain RoPE at {spec.pretrained_length} instead, "
            "replacing the existing scaling"
        )
    return out


def _length_reason(spec: RopeSpec) -> str:
    if spec.length_source in (None, "max_position_embeddings"):
        return "max_position_embeddings (no scaling block)"
    return spec.length_source


def _next_steps(path_or_id: str, spec: RopeSpec, family: str) -> str:
    """Commands to try, with a target beyond what the model already handles (2× if extended, else 4×)."""
    target = (2 if spec.is_extended else 4) * spec.context_length
    if family in SUPPORTED_MODEL_TYPES:
        return (
            f"ropekit plan --model {path_or_id} --target-length {target}; "
            f"ropekit extend {path_or_id} --method dprope --target-length {target} --out DIR"
        )
    return (
        f"ropekit plan --model {path_or_id} --target-length {target} (planning and export work; "
        f"applying to a loaded '{family}' model is not tested)"
    )
