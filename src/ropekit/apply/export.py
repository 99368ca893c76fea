"""Export a plan as config blocks that stock runtimes load with no ropekit code.

Every plan exports as transformers' `longrope` (per-pair factors f, explicit attention
factor a, short = long so generation that crosses L has no cache switch). Methods that a
runtime implements natively also export in that native form (`Method.native` of their record).

    transformers v5: config["rope_parameters"] (rope_theta inside)
    transformers v4: config["rope_scaling"] + top-level rope_theta
    vLLM:            --hf-overrides JSON, magnitude from short_mscale / long_mscale (= a)
    llama.cpp:       GGUF tensor `rope_freqs.weight` (= f, float32), one entry per pair, scaling type
                     none, attention factor in `<arch>.rope.scaling.attn_factor` (ropekit.apply.gguf);
                     architectures without it take native rope.scaling keys (ropekit.apply.gguf_native)
    removed pairs:   a plan in which some pairs do not rotate (θ'_i = 0: p-RoPE, Gemma 4) exports as
                     transformers' v5 `proportional` block where that block expresses it (the tail of the
                     pairs removed, one factor for the others, attention factor 1; vLLM: factor 1 only),
                     and to llama.cpp with divisor LLAMA_CPP_REMOVED (1e30) for the removed pairs, as
                     llama.cpp's own Gemma 4 conversion writes; every other form refuses it in one line
    served length:   every form sets the target L' as the context the runtime allows: config
                     max_position_embeddings (vLLM derives max_model_len from it), GGUF context_length
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ropekit.errors import RopekitError
from ropekit.plan.registry import METHODS
from ropekit.plan.scaling import ROTATION_REMOVED, Plan

# llama.cpp's divisor for a pair that does not rotate (conversion/gemma.py, Gemma 4: rope_freqs 1e30):
# θ_i / 1e30 turns by less than 1e-23 rad over a million tokens. A value read back at or above it is removed.
LLAMA_CPP_REMOVED = 1e30


def require_rotation(plan: Plan, form: str, *, why: str = "its per-pair factor would be infinite") -> None:
    """Refuse, in one line, to write `form` for a plan that removes some pairs' rotation (θ'_i = 0).

    `why` says what the form lacks (default: a per-pair factor would be infinite, which JSON cannot hold
    and no runtime reads). The message names what does work: llama.cpp's rope_freqs (1e30) and, in
    memory, `ropekit.apply_plan(model, plan, route="inv_freq")`.
    """
    removed = plan.removed_pairs
    if removed:
        raise RopekitError(
            f"the {plan.method} plan leaves {len(removed)} pairs without rotation ({_shown(removed)}: θ' = 0); "
            f"{form} cannot express that ({why}); what can: a GGUF whose llama.cpp graph reads rope_freqs "
            "(ropekit extend MODEL.gguf), or in memory ropekit.apply_plan(model, plan, route='inv_freq')"
        )


def _shown(pairs: list[int]) -> str:
    return ", ".join(str(i) for i in pairs[:8]) + (", …" if len(pairs) > 8 else "")


def proportional_block(plan: Plan, *, runtime: str = "transformers") -> dict[str, Any]:
    """transformers' v5 `proportional` block that reproduces a plan with removed pairs, or one clear refusal.

    transformers (`_compute_proportional_rope_parameters`) rotates pairs i < k = int(prf·head_dim // 2) at
    b^(−2i/head_dim) / factor and no others, with attention factor 1. So the plan must rotate over the
    whole head dimension, remove exactly the pairs k … d/2 − 1, give every other pair one factor F and
    keep a = 1. `partial_rotary_factor` is k/(d/2) (nudged when float rounding would give another k);
    `factor` is written only when F ≠ 1, as transformers' key check knows no `factor` for this type (it
    warns, and uses it). With runtime="vllm", F must be 1: vLLM's proportional RoPE reads no factor.
    """
    spec, removed = plan.spec, plan.removed_pairs
    form = f"{'vLLM' if runtime == 'vllm' else 'transformers'} proportional block"
    if spec.partial_rotary_factor != 1.0:
        channels = f"{spec.rotary_dim} of {spec.head_dim} channels"
        require_rotation(plan, form, why=f"its frequencies run over the whole head_dim; this model rotates {channels}")
    kept = spec.num_pairs - len(removed)
    if removed != list(range(kept, spec.num_pairs)):
        require_rotation(plan, form, why="it removes only the lowest-frequency tail of the pairs")
    factors = plan.runtime_factors[:kept]
    if any(not math.isclose(f, factors[0], rel_tol=1e-12) for f in factors):
        require_rotation(plan, form, why="it divides every rotating pair by one factor; this plan's differ per pair")
    if not math.isclose(plan.attention_factor, 1.0, rel_tol=1e-12):
        require_rotation(plan, form, why=f"its attention factor is 1; this plan's is {plan.attention_factor:.4g}")
    if runtime == "vllm" and factors[0] != 1.0:
        require_rotation(
            plan, form, why=f"vLLM's Gemma4RotaryEmbedding ignores `factor`; this plan divides by {factors[0]:g}"
        )
    block: dict[str, Any] = {
        "rope_type": "proportional",
        "partial_rotary_factor": rotating_fraction(kept, spec.head_dim),
    }
    if factors[0] != 1.0:
        block["factor"] = factors[0]
    return block


def rotating_fraction(kept: int, head_dim: int) -> float:
    """A partial_rotary_factor p from which transformers (int(p·H // 2)), vLLM (int(H·p) // 2) and llama.cpp's
    converter (int(H·p / 2)) all count `kept` rotating pairs: 2k/H, or (2k + ½)/H where rounding needs it."""
    for p in (2 * kept / head_dim, (2 * kept + 0.5) / head_dim):
        if int(p * head_dim // 2) == int(head_dim * p) // 2 == int(head_dim * p / 2) == kept:
            return p
    raise RopekitError(
        f"no partial_rotary_factor gives {kept} of {head_dim // 2} pairs (a ropekit bug: please report it)"
    )


def longrope_block(plan: Plan) -> dict[str, Any]:
    """The `longrope` parameters that reproduce `plan` exactly (without rope_theta).

    For an already-extended model the factors are the combined ones relative to the original
    base and `original_max_position_embeddings` is the pre-scaling length (transformers gives a
    Phi-3 top-level value priority, so it must stay that); short = long, so transformers'
    length switch at that length changes nothing, and the explicit attention factor is used as is.
    """
    require_rotation(plan, "a longrope block")
    original = plan.spec.pretrained_length
    block: dict[str, Any] = {
        "rope_type": "longrope",
        "short_factor": list(plan.runtime_factors),
        "long_factor": list(plan.runtime_factors),
        "factor": plan.target_length / original,
        "original_max_position_embeddings": original,
        "attention_factor": plan.attention_factor,
    }
    return block


def native_block(plan: Plan) -> dict[str, Any] | None:
    """The runtime-native form of the plan's method (its record's `native`), or None if there is none
    (or the model is already extended)."""
    method = METHODS.get(plan.method)
    if plan.spec.is_extended or method is None or method.native is None or plan.removed_pairs:
        return None  # with removed pairs the runtime form is already transformers' own (proportional)
    return method.native.block(plan)


def runtime_block(plan: Plan) -> dict[str, Any]:
    """The block every transformers export writes: `longrope`, or `proportional` for a plan with removed pairs."""
    return proportional_block(plan) if plan.removed_pairs else longrope_block(plan)


def _with_geometry(plan: Plan, block: dict[str, Any]) -> dict[str, Any]:
    full = {**block}
    full.setdefault("rope_theta", plan.spec.base)
    if plan.spec.partial_rotary_factor < 1.0:
        full["partial_rotary_factor"] = plan.spec.partial_rotary_factor
    return full


def max_positions_for(plan: Plan, block: dict[str, Any]) -> int:
    """`max_position_embeddings` to write. transformers' `dynamic` reads L from it, so it stays L there."""
    return plan.spec.context_length if block.get("rope_type") == "dynamic" else plan.target_length


def transformers_config(plan: Plan, *, native: bool = False, version: int = 5) -> dict[str, Any]:
    """The config.json keys to set: `rope_parameters` (v5) or `rope_scaling` + `rope_theta` (v4).

    A per-layer-type plan (Gemma 3) nests its block under its layer type in v5 (the other layer
    types keep theirs); in v4 only the full-attention layers have a block (`rope_scaling`).
    """
    if version < 5 and plan.removed_pairs:
        require_rotation(plan, "a transformers v4 config", why="v4 has no proportional rope type; use the v5 form")
    block = native_block(plan) if native else runtime_block(plan)
    if block is None:
        raise RopekitError(f"method {plan.method!r} has no native transformers form; use the longrope export")
    block = _with_geometry(plan, block)
    out: dict[str, Any] = {"max_position_embeddings": max_positions_for(plan, block)}
    layer_type = plan.spec.layer_type
    if version >= 5:
        out["rope_parameters"] = block if layer_type is None else {layer_type: block}
        return out
    if layer_type not in (None, "full_attention"):
        raise RopekitError(f"transformers v4 configs have no RoPE block for {layer_type} layers; use the v5 form")
    theta = block.pop("rope_theta")
    out["rope_theta"] = theta
    if block.get("rope_type") != "default":
        out["rope_scaling"] = {"type": block["rope_type"], **block}
    if "partial_rotary_factor" in block:
        out["partial_rotary_factor"] = block.pop("partial_rotary_factor")
    return out


def rope_block_of(config_keys: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The plan's own RoPE block inside `transformers_config(plan)` (v5) output."""
    block = config_keys["rope_parameters"]
    return block if plan.spec.layer_type is None else block[plan.spec.layer_type]


def vllm_hf_overrides(plan: Plan, *, version: int = 5) -> dict[str, Any]:
    """`vllm serve MODEL --hf-overrides '<json>'`: longrope with short/long_mscale = a (or, for a plan with
    removed pairs, the proportional block when vLLM runs it: `proportional_block(plan, runtime="vllm")`)."""
    if plan.removed_pairs:
        proportional_block(plan, runtime="vllm")
    cfg = transformers_config(plan, version=version)
    if plan.removed_pairs:
        return cfg
    block = rope_block_of(cfg, plan) if version >= 5 else cfg["rope_scaling"]
    block["short_mscale"] = plan.attention_factor
    block["long_mscale"] = plan.attention_factor
    return cfg


def llama_cpp_rope_freqs(plan: Plan) -> dict[str, Any]:
    """llama.cpp's per-pair frequency divisors: GGUF tensor `rope_freqs.weight` (F32, d/2 values).

    `ropekit extend MODEL.gguf ... --out OUT.gguf` writes exactly this (see `ropekit.apply.gguf`); a removed
    pair's divisor is LLAMA_CPP_REMOVED (1e30), as llama.cpp's own Gemma 4 conversion writes.
    """
    out = {
        "tensor": "rope_freqs.weight",
        "ggml_type": "F32",
        "shape": [plan.spec.num_pairs],
        "values": llama_cpp_divisors(plan),
        "rope_freq_base": plan.spec.base,
        "attention_factor": plan.attention_factor,
        "context_length": plan.target_length,
        "how_to_use": (
            "ropekit extend MODEL.gguf --method M --target-length N --out OUT.gguf writes these into a GGUF whose "
            "llama.cpp graph applies rope_freqs (ropekit.apply.gguf_archs; others take linear/yarn as "
            "rope.scaling keys, and no per-pair plan). By hand: "
            "add `values` as the float32 tensor `rope_freqs.weight` (llama.cpp divides each pair's frequency by it), "
            "set '<arch>.rope.scaling.type' to 'none' and remove any other rope.scaling keys and rope_factors_* "
            "tensors, set '<arch>.context_length' to context_length and '<arch>.rope.scaling.attn_factor' to "
            "attention_factor. llama.cpp's convert_hf_to_gguf.py does not carry a longrope plan over for "
            "Llama-family models."
        ),
    }
    if plan.spec.layer_type is not None:
        out["note"] = (
            f"this plan is for the {plan.spec.layer_type} layers only; llama.cpp's rope_freqs tensor reaches "
            "every layer, so these values are no exact llama.cpp form; `ropekit extend MODEL.gguf` writes a "
            "linear or yarn plan of a gemma3/olmo2 GGUF natively, for its full-attention layers only"
        )
    return out


def llama_cpp_divisors(plan: Plan) -> list[float]:
    """F_i for llama.cpp's rope_freqs: the runtime factors with LLAMA_CPP_REMOVED for a removed pair."""
    return [LLAMA_CPP_REMOVED if f == ROTATION_REMOVED else f for f in plan.runtime_factors]


def export_forms(plan: Plan) -> tuple[dict[str, Any], dict[str, str]]:
    """({kind: data} of every form that expresses `plan`, {kind: why not} of the forms that cannot).

    Only a plan with removed pairs can be refused by a form (see the module docstring)."""
    builders: dict[str, Any] = {
        "transformers_v5": lambda: transformers_config(plan, version=5),
        "vllm_hf_overrides": lambda: vllm_hf_overrides(plan, version=5),
        "llama_cpp_rope_freqs": lambda: llama_cpp_rope_freqs(plan),
    }
    if plan.spec.layer_type in (None, "full_attention"):
        builders["transformers_v4"] = lambda: transformers_config(plan, version=4)
        builders["vllm_hf_overrides_v4"] = lambda: vllm_hf_overrides(plan, version=4)
    if native_block(plan) is not None:
        builders["transformers_v5_native"] = lambda: transformers_config(plan, native=True, version=5)
    forms, refused = {}, {}
    for kind, build in builders.items():
        try:
            forms[kind] = build()
        except RopekitError as exc:
            if not plan.removed_pairs:
                raise
            refused[kind] = str(exc)
    return forms, refused


def write_exports(plan: Plan, out_dir: str | Path) -> dict[str, Path]:
    """Write every export of `plan` into `out_dir`; returns {kind: path}. The forms that cannot express a plan
    with removed pairs are listed, each with its reason, in `exports_refused.json` instead."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, refused = export_forms(plan)
    if refused:
        files["exports_refused"] = refused
    written = {}
    for kind, data in files.items():
        path = out / f"{kind}.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        written[kind] = path
    return written
