"""Llama 3.1 frequency scaling; a = 1.

λ_i < L/hf: θ_i;  λ_i > L/lf: θ_i/s;  between: (1−g)·θ_i/s + g·θ_i with
g = (L/λ_i − lf)/(hf − lf). Defaults lf = 1, hf = 4. Same float32 arithmetic as
transformers' `_compute_llama3_parameters`.
"""

from __future__ import annotations

import math

import torch

from ropekit.domains import POSITIVE
from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods._common import SCALE, require_finite_positive
from ropekit.plan.methods.record import Method, NativeForm, Param, renamed_keywords
from ropekit.plan.scaling import Plan, Scaling


@renamed_keywords(factor="scale")
def llama3(
    spec: RopeSpec,
    target_length: int,
    *,
    scale: float | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> Scaling:
    """Llama 3.1 scaling for the scale s (`scale`, default L'/L)."""
    s = target_length / spec.context_length if scale is None else scale
    require_finite_positive("scale", s)
    if not 0 < low_freq_factor < high_freq_factor:
        raise RopekitError(f"need 0 < low_freq_factor < high_freq_factor, got {low_freq_factor}, {high_freq_factor}")
    L = spec.context_length
    inv_freq = spec.inv_freq()
    low_freq_wavelen, high_freq_wavelen = L / low_freq_factor, L / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s, inv_freq)
    smooth = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / s + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    inv_freq = torch.where(is_medium, smoothed, scaled)

    lam = spec.wavelengths()
    g = ((L / lam - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    factors = 1.0 / ((1 - g) / s + g)
    return Scaling(inv_freq=inv_freq, factors=tuple(factors.tolist()))


def native_block(plan: Plan) -> dict:
    """transformers' `llama3` block."""
    p = plan.params
    return {
        "rope_type": "llama3",
        "factor": p.get("scale") or plan.scale,
        "low_freq_factor": float(p.get("low_freq_factor", 1.0)),
        "high_freq_factor": float(p.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": plan.spec.context_length,
    }


METHOD = Method(
    "llama3",
    llama3,
    "Llama 3.1 wavelength-banded interpolation",
    "Meta 2024",
    params=(
        Param("scale", float, "the scale s: interpolation divisor", default="L'/L", flag=None, domain=SCALE),
        Param("low_freq_factor", float, "lf (< hf)", default=1, domain=POSITIVE),
        Param("high_freq_factor", float, "hf", default=4, domain=POSITIVE),
    ),
    native=NativeForm("llama3", native_block),
)
