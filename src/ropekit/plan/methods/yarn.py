"""YaRN (Peng et al. 2023): blend θ_i/s and θ_i by a linear ramp over pairs; a = 0.1·ln s + 1.

corr(r) = d·ln(L/(2π·r)) / (2·ln b); low = max(floor(corr(β_fast)), 0);
high = min(ceil(corr(β_slow)), d−1); ramp_i = clip((i − low)/(high − low), 0, 1);
mask_i = 1 − ramp_i; θ'_i = (θ_i/s)·(1 − mask_i) + θ_i·mask_i.

Same arithmetic as the authors' repo (jquesnelle/yarn) and transformers' `rope_type="yarn"`
with `truncate=True`: interpolated frequencies are 1/(s·b^(2i/d)) in float32.
"""

from __future__ import annotations

import math

import torch

from ropekit.domains import POSITIVE
from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods._common import ATTENTION_FACTOR, SCALE, require_finite_positive
from ropekit.plan.methods.record import Method, NativeForm, Param, renamed_keywords
from ropekit.plan.scaling import Plan, Scaling


def yarn_attention_factor(scale: float) -> float:
    """a = 0.1·ln s + 1, or 1 when s ≤ 1."""
    return 1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0


def yarn_ramp_bounds(
    spec: RopeSpec, beta_fast: float, beta_slow: float, *, truncate: bool = True
) -> tuple[float, float]:
    """(low, high) pair indices of the ramp, truncated to integers as the authors do.

    `truncate=False` keeps the fractional bounds (transformers' `truncate: false`, used by GPT-OSS).
    """
    d, b, L = spec.rotary_dim, spec.base, spec.context_length

    def corr(rotations: float) -> float:
        return (d * math.log(L / (rotations * 2 * math.pi))) / (2 * math.log(b))

    low, high = corr(beta_fast), corr(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, d - 1)


@renamed_keywords(factor="scale")
def yarn(
    spec: RopeSpec,
    target_length: int,
    *,
    scale: float | None = None,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    truncate: bool = True,
) -> Scaling:
    """YaRN frequencies and attention factor for the scale s (`scale`, default L'/L)."""
    s = target_length / spec.context_length if scale is None else scale
    require_finite_positive("scale", s)
    if not (beta_fast > 0 and beta_slow > 0):  # corr(β) divides by β
        raise RopekitError(f"beta_fast and beta_slow must be > 0 rotations, got {beta_fast} and {beta_slow}")
    if beta_fast < beta_slow:
        raise RopekitError(f"beta_fast ({beta_fast}) must be ≥ beta_slow ({beta_slow})")
    low, high = yarn_ramp_bounds(spec, beta_fast, beta_slow, truncate=truncate)
    if low == high:
        high += 0.001  # the authors' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(spec.num_pairs, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_mask = 1 - ramp  # 1: keep θ_i, 0: interpolate to θ_i/s

    pos_freqs = spec.base ** (torch.arange(0, spec.rotary_dim, 2).float() / spec.rotary_dim)
    inv_extra, inv_inter = 1.0 / pos_freqs, 1.0 / (s * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_mask) + inv_extra * extrapolation_mask

    mask64 = extrapolation_mask.double()
    factors = 1.0 / ((1 - mask64) / s + mask64)
    a = yarn_attention_factor(s) if attention_factor is None else attention_factor
    require_finite_positive("attention_factor", a)
    return Scaling(
        inv_freq=inv_freq,
        factors=tuple(factors.tolist()),
        attention_factor=float(a),
        details={"ramp_low": low, "ramp_high": high, "truncate": truncate},
    )


def native_block(plan: Plan) -> dict:
    """transformers' `yarn` block with the plan's explicit attention factor."""
    p = plan.params
    return {
        "rope_type": "yarn",
        "factor": p.get("scale") or plan.scale,
        "original_max_position_embeddings": plan.spec.context_length,
        "beta_fast": float(p.get("beta_fast", 32.0)),
        "beta_slow": float(p.get("beta_slow", 1.0)),
        "attention_factor": plan.attention_factor,
        **({} if p.get("truncate", True) else {"truncate": False}),
    }


METHOD = Method(
    "yarn",
    yarn,
    "ramp between interpolation and extrapolation + attention factor",
    "Peng et al. 2023",
    params=(
        Param("scale", float, "the scale s: interpolation divisor", default="L'/L", flag=None, domain=SCALE),
        Param("beta_fast", float, "β_fast, rotations where the ramp starts; ≥ β_slow", default=32, domain=POSITIVE),
        Param("beta_slow", float, "β_slow, rotations where the ramp ends", default=1, domain=POSITIVE),
        Param("attention_factor", float, "override the attention factor a", domain=ATTENTION_FACTOR),
        Param("truncate", bool, "round the ramp bounds to whole pairs", default=True, flag=None),
    ),
    native=NativeForm("yarn", native_block),
)
