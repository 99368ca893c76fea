"""A plan as llama.cpp's native `<arch>.rope.scaling.*` keys, for architectures whose graph applies no factor tensor.

What those keys compute (llama.cpp 0c1e570, `ropekit.apply.gguf_archs`): every pair rotates at

    θ'_i = θ_i · (freq_scale · (1 − r_i) + r_i),   θ_i = b^(−2i/d),  freq_scale = 1 / rope.scaling.factor

with r_i = 0 for `linear` and, for `yarn`, YaRN's ramp r_i = 1 − clip((i − low)/max(0.001, high − low), 0, 1),
low = ⌊corr(β_fast)⌋, high = ⌈corr(β_slow)⌉, corr(β) = d·ln(L/(2πβ)) / (2 ln b), L =
`rope.scaling.original_context_length` (ggml/src/ggml.c:4478-4490, ggml/src/ggml-cpu/ops.cpp:6180-6201).
cos and sin are multiplied by `rope.scaling.attn_factor`, and for yarn also by 1 + 0.1 ln s (the kernel's
term; src/llama-context.cpp:177-214 cancels llama.cpp's own mscale, which equals it). So a plan runs natively
iff its factors are one number for every pair (`linear`; `none` when it is 1) or it is a YaRN plan from
plain RoPE; `llama_cpp_inv_freq` recomputes the keys' frequencies and must give the plan's.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from ropekit.apply.gguf_archs import YARN_DEFAULT_BETAS, ArchRope, native_methods
from ropekit.errors import RopekitError
from ropekit.plan.registry import METHODS
from ropekit.plan.scaling import Plan


class GgufRope(Protocol):
    """The fields of `ropekit.apply.gguf.GgufRope` this module reads (a protocol, so gguf.py may import us)."""

    @property
    def path(self) -> str: ...
    @property
    def architecture(self) -> str: ...
    @property
    def rotary_dim(self) -> int: ...
    @property
    def base(self) -> float: ...
    @property
    def context_length(self) -> int: ...
    @property
    def scaling(self) -> dict[str, Any]: ...


def native_scaling(rope: GgufRope, arch: ArchRope, plan: Plan) -> dict[str, Any]:
    """The `rope.scaling.*` keys (without the prefix) that make llama.cpp run `plan`, or one clear refusal."""
    factors, a = plan.runtime_factors, float(plan.attention_factor)
    if all(math.isclose(f, factors[0], rel_tol=1e-12) for f in factors):  # one divisor for every pair
        keys: dict[str, Any] = {"type": "none" if factors[0] == 1.0 else "linear", "attn_factor": a}
        if factors[0] != 1.0:
            keys["factor"] = float(factors[0])
    elif _native_type(plan) == "yarn" and not plan.spec.is_extended:
        keys = _yarn_keys(rope, arch, plan)
    else:
        raise RopekitError(_refusal(rope, arch, plan))
    if arch.layers == "full_attention" and not math.isclose(keys["attn_factor"], 1.0, rel_tol=1e-6):
        raise RopekitError(
            f"{rope.path}: llama.cpp's {rope.architecture!r} graph multiplies the sliding-window layers' cos and sin "
            f"by rope.scaling.attn_factor too, so it must stay 1 (this plan needs {keys['attn_factor']:.4f}: its "
            "attention factor, divided by 1 + 0.1 ln s for yarn); plan with the method's own attention factor"
        )
    _check_frequencies(rope, keys, plan)
    return keys


def _native_type(plan: Plan) -> str | None:
    method = METHODS.get(plan.method)
    return method.transformers_type if method else None


def _yarn_keys(rope: GgufRope, arch: ArchRope, plan: Plan) -> dict[str, Any]:
    block = METHODS[plan.method].native.block(plan)  # type: ignore[union-attr]  # _native_type said it has one
    if block.get("truncate") is False:
        raise RopekitError(
            f"{rope.path}: llama.cpp's {rope.architecture!r} graph rounds YaRN's ramp bounds to whole pairs; a "
            "yarn plan with truncate=False cannot run there"
        )
    betas = (float(block["beta_fast"]), float(block["beta_slow"]))
    if betas != YARN_DEFAULT_BETAS and not arch.yarn_betas:
        raise RopekitError(
            f"{rope.path}: llama.cpp's {rope.architecture!r} graph reads no yarn_beta_fast/slow keys, so it runs "
            f"β = {YARN_DEFAULT_BETAS[0]:g}, {YARN_DEFAULT_BETAS[1]:g}; plan yarn with those (got {betas[0]:g}, {betas[1]:g})"
        )
    s = float(block["factor"])
    keys: dict[str, Any] = {
        "type": "yarn",
        "factor": s,
        "original_context_length": int(block["original_max_position_embeddings"]),
        "attn_factor": float(plan.attention_factor) / (1.0 + 0.1 * math.log(s)),  # the kernel multiplies this back
    }
    if arch.yarn_betas:
        keys["yarn_beta_fast"], keys["yarn_beta_slow"] = betas
    return keys


def _refusal(rope: GgufRope, arch: ArchRope, plan: Plan) -> str:
    works = ", ".join(native_methods())
    if plan.spec.is_extended:
        kind = (plan.spec.current_scaling or {}).get("rope_type", "existing")
        return (
            f"{rope.path}: the file's {kind} scaling times a {plan.method} plan is not one of the forms llama.cpp's "
            f"{rope.architecture!r} graph runs (it reads only rope.scaling.*: {works} from plain RoPE, or one factor "
            "for every pair); --from-scratch re-plans from the RoPE before that scaling and replaces it"
        )
    return (
        f"{rope.path}: llama.cpp's {rope.architecture!r} graph applies no per-pair factors, so a {plan.method} plan "
        f"cannot run there; methods that run: {works}"
    )


def _magnitude(keys: dict[str, Any]) -> float:
    """The factor llama.cpp multiplies cos and sin by."""
    s = float(keys.get("factor", 1.0))
    return float(keys["attn_factor"]) * ((1.0 + 0.1 * math.log(s)) if keys["type"] == "yarn" else 1.0)


def llama_cpp_inv_freq(keys: dict[str, Any], *, base: float, rotary_dim: int, original_length: int) -> np.ndarray:
    """θ'_i that llama.cpp computes from native `rope.scaling.*` keys (see the module docstring), float64."""
    d = rotary_dim
    i = np.arange(d // 2, dtype=np.float64)
    theta = base ** (-2.0 * i / d)
    if keys["type"] == "none":
        return theta
    freq_scale = 1.0 / float(keys["factor"])
    if keys["type"] == "linear":
        return theta * freq_scale
    length = int(keys.get("original_context_length", original_length))
    beta_fast = float(keys.get("yarn_beta_fast", YARN_DEFAULT_BETAS[0]))
    beta_slow = float(keys.get("yarn_beta_slow", YARN_DEFAULT_BETAS[1]))

    def corr(beta: float) -> float:
        return d * math.log(length / (beta * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(0.0, math.floor(corr(beta_fast))), min(d - 1.0, math.ceil(corr(beta_slow)))
    ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
    return theta * (freq_scale * (1.0 - ramp) + ramp)


def _check_frequencies(rope: GgufRope, keys: dict[str, Any], plan: Plan) -> None:
    """The keys must compute the plan's frequencies and magnitude (float32 rounding apart)."""
    got = llama_cpp_inv_freq(keys, base=rope.base, rotary_dim=rope.rotary_dim, original_length=rope.context_length)
    want = plan.inv_freq.double().numpy()
    if not np.allclose(got, want, rtol=1e-5, atol=0.0) or not math.isclose(
        _magnitude(keys), plan.attention_factor, rel_tol=1e-6
    ):
        raise RopekitError(
            f"{rope.path}: llama.cpp's native keys {keys} would not compute the {plan.method} plan "
            "(a ropekit bug: please report it)"
        )
