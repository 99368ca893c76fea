"""Already-extended models: the frequencies a model runs with now, over the context it runs at.

Most current models ship a scaling block (Llama 3.1 `llama3` 8k → 128k, Qwen2.5 `yarn`,
Phi-3.5 `longrope`, Gemma 3 `linear`). The angles such a model saw are its *current*
frequencies θ_i / g_i over its *trained* context, so ropekit plans from those by default:

    current frequencies  θ^cur_i = θ_i / g_i, computed with the same arithmetic as transformers'
                         ROPE_INIT_FUNCTIONS for the block's rope_type (ropekit's own method
                         functions, which equal it bit for bit), attention factor a_cur
    trained context L_t  linear: max_position_embeddings (a linear block records no original length);
                         llama3 / yarn / longrope: max_position_embeddings when it exceeds the
                         block's original length (the config says the model runs there), else
                         original × factor (the length the block was made for)
    dynamic              frequencies up to max_position_embeddings are plain θ, so L_t =
                         max_position_embeddings, g = 1, and a plan replaces the dynamic update

A new plan (factors f_i, attention factor a) composes: runtime θ'_i = θ^cur_i / f_i, i.e.
combined factors F_i = g_i·f_i relative to the original base, and attention factor a_cur·a.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.scaling import Scaling

SUPPORTED_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")


def extended_spec(plain: RopeSpec, block: dict[str, Any], *, max_positions: int | None) -> RopeSpec:
    """The spec to plan from for a model whose config carries `block` (plain: its RoPE at L_0)."""
    rope_type = block.get("rope_type", block.get("type"))
    if rope_type not in SUPPORTED_TYPES:
        raise RopekitError(
            f"{plain.name}: existing rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_TYPES)}); plan with --from-scratch to replace it"
        )
    max_positions = max_positions or plain.context_length
    if rope_type == "dynamic":
        return replace(
            plain,
            context_length=max_positions,
            pretrained_length=max_positions,
            length_source="max_position_embeddings (dynamic NTK keeps plain frequencies up to it; "
            "a plan replaces the dynamic update)",
        )
    scaling, length, reason = _current_scaling(plain, block, rope_type, max_positions)
    return replace(
        plain,
        context_length=length,
        prior_factors=tuple(scaling.factors),
        current_inv_freq=tuple(scaling.inv_freq.tolist()),
        prior_attention_factor=float(scaling.attention_factor),
        pretrained_length=plain.context_length,
        length_source=reason,
    )


def _current_scaling(
    plain: RopeSpec, block: dict[str, Any], rope_type: str, max_positions: int
) -> tuple[Scaling, int, str]:
    """(Scaling the block gives at the trained context, trained context, reason)."""
    from ropekit.plan.methods.linear import linear
    from ropekit.plan.methods.llama3 import llama3
    from ropekit.plan.methods.longrope import longrope
    from ropekit.plan.methods.yarn import yarn

    L0 = plain.context_length
    factor = block.get("factor")
    if rope_type == "linear":
        return (
            linear(plain, max_positions, scale=float(_required(block, "factor", plain))),
            max_positions,
            f"max_position_embeddings {max_positions} (a linear block records no original length)",
        )
    if factor is None and rope_type in ("yarn", "llama3"):  # transformers requires it too (its key validation)
        _required(block, "factor", plain)
    if factor is None:
        factor = max_positions / L0  # transformers' fallback for longrope
    length, reason = trained_length(L0, float(factor), max_positions, rope_type)
    if rope_type == "llama3":
        scaling = llama3(
            plain,
            length,
            scale=float(factor),
            low_freq_factor=float(_required(block, "low_freq_factor", plain)),
            high_freq_factor=float(_required(block, "high_freq_factor", plain)),
        )
    elif rope_type == "yarn":
        scaling = yarn(
            plain,
            length,
            scale=float(factor),
            beta_fast=float(block.get("beta_fast") or 32),
            beta_slow=float(block.get("beta_slow") or 1),
            truncate=bool(block.get("truncate", True)),
            attention_factor=yarn_block_attention(block, float(factor)),
        )
    else:  # longrope: over the trained context transformers uses the long factors
        attention = block.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(L0))
        scaling = longrope(plain, length, factors=_required(block, "long_factor", plain), attention_factor=attention)
    return scaling, length, reason


def trained_length(original: int, factor: float, max_positions: int, rope_type: str) -> tuple[int, str]:
    """L_t for a llama3 / yarn / longrope block and the reason, as one sentence."""
    if max_positions > original:
        return max_positions, (
            f"max_position_embeddings {max_positions}: the config runs its {rope_type} "
            f"scaling (from original {original}) there"
        )
    length = round(original * factor)
    return length, (
        f"original {original} × factor {factor:g} = {length}: max_position_embeddings "
        f"{max_positions} does not exceed the original, so the block's own design length is used"
    )


def yarn_block_attention(block: dict[str, Any], factor: float) -> float:
    """A yarn block's attention factor as transformers computes it (explicit, mscale ratio, or 0.1 ln s + 1)."""
    if block.get("attention_factor") is not None:
        return float(block["attention_factor"])

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = block.get("mscale"), block.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
    return get_mscale(factor)


def _required(block: dict[str, Any], key: str, plain: RopeSpec) -> Any:
    if block.get(key) is None:
        raise RopekitError(
            f"{plain.name}: its {block.get('rope_type')} block has no {key!r} (transformers needs it too)"
        )
    return block[key]
