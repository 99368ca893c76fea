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
    served length:   every form sets the target L' as the context the runtime allows: config
                     max_position_embeddings (vLLM derives max_model_len from it), GGUF context_length
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ropekit.errors import RopekitError
from ropekit.plan.registry import METHODS
from ropekit.plan.scaling import Plan


def require_rotation(plan: Plan, form: str) -> None:
    """Refuse, in one line, to write `form` for a plan that removes some pairs' rotation (θ'_i = 0).

    Per-pair divisors (longrope factors, llama.cpp's rope_freqs) would need f_i = ∞, which JSON cannot
    hold and no runtime reads; `ropekit.apply_plan(model, plan, route="inv_freq")` applies such a plan.
    """
    removed = plan.removed_pairs
    if removed:
        shown = ", ".join(str(i) for i in removed[:8]) + (", …" if len(removed) > 8 else "")
        raise RopekitError(
            f"the {plan.method} plan removes the rotation of {len(removed)} pairs ({shown}: θ' = 0); {form} "
            "cannot express that (its per-pair factor would be infinite); ropekit.apply_plan(model, plan, "
            "route='inv_freq') applies it in memory"
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
    if plan.spec.is_extended or method is None or method.native is None:
        return None
    require_rotation(plan, f"transformers' {method.native.rope_type} block")
    return method.native.block(plan)


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
    block = native_block(plan) if native else longrope_block(plan)
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


def has_v4_form(plan: Plan) -> bool:
    return plan.spec.layer_type in (None, "full_attention")


def rope_block_of(config_keys: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The plan's own RoPE block inside `transformers_config(plan)` (v5) output."""
    block = config_keys["rope_parameters"]
    return block if plan.spec.layer_type is None else block[plan.spec.layer_type]


def vllm_hf_overrides(plan: Plan, *, version: int = 5) -> dict[str, Any]:
    """`vllm serve MODEL --hf-overrides '<json>'`: longrope with short/long_mscale = a."""
    cfg = transformers_config(plan, version=version)
    block = rope_block_of(cfg, plan) if version >= 5 else cfg["rope_scaling"]
    block["short_mscale"] = plan.attention_factor
    block["long_mscale"] = plan.attention_factor
    return cfg


def llama_cpp_rope_freqs(plan: Plan) -> dict[str, Any]:
    """llama.cpp's per-pair frequency divisors: GGUF tensor `rope_freqs.weight` (F32, d/2 values).

    `ropekit extend MODEL.gguf ... --out OUT.gguf` writes exactly this (see `ropekit.apply.gguf`).
    """
    require_rotation(plan, "llama.cpp's rope_freqs tensor")
    out = {
        "tensor": "rope_freqs.weight",
        "ggml_type": "F32",
        "shape": [plan.spec.num_pairs],
        "values": list(plan.runtime_factors),
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


def write_exports(plan: Plan, out_dir: str | Path) -> dict[str, Path]:
    """Write every export of `plan` into `out_dir`; returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {
        "transformers_v5": transformers_config(plan, version=5),
        "vllm_hf_overrides": vllm_hf_overrides(plan, version=5),
        "llama_cpp_rope_freqs": llama_cpp_rope_freqs(plan),
    }
    if has_v4_form(plan):
        files["transformers_v4"] = transformers_config(plan, version=4)
        files["vllm_hf_overrides_v4"] = vllm_hf_overrides(plan, version=4)
    if native_block(plan) is not None:
        files["transformers_v5_native"] = transformers_config(plan, native=True, version=5)
    written = {}
    for kind, data in files.items():
        path = out / f"{kind}.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        written[kind] = path
    return written
