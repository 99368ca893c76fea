"""Closed-form bounds on how far a RoPE geometry extrapolates.

Scaling Laws of RoPE-based Extrapolation (Liu et al. 2023):
    a pair has seen a full rotation in pre-training iff λ_i ≤ L;
    critical dimension d_extra = 2·⌈(d/2)·log_b(L/2π)⌉;
    extrapolation bound with base b': T_extra = 2π·b'^(d_extra/d), inverted for the base.

Base of RoPE Bounds Context Length (Men et al. 2024):
    the smallest base b with B(m) = Σ_i cos(m·θ_i) ≥ 0 for all 0 ≤ m < L'.
"""

from __future__ import annotations

import math

import torch

from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec, require_spec


def critical_dimension(spec: RopeSpec) -> int:
    """d_extra = 2·⌈(d/2)·log_b(L/2π)⌉, clipped to [0, d].

    >>> critical_dimension(RopeSpec(head_dim=128, base=10000.0, original_length=4096))
    92
    """
    require_spec(spec)
    d, L = spec.rotary_dim, spec.original_length
    if spec.is_extended:  # current frequencies are not b^(-2i/d): count the pairs that completed a turn
        return 2 * int(full_rotation_seen(spec).sum())
    value = 2 * math.ceil((d / 2) * math.log(L / (2 * math.pi)) / math.log(spec.base))
    return min(max(value, 0), d)


def extrapolation_bound(spec: RopeSpec, base: float | None = None) -> float:
    """T_extra = 2π·b'^(d_extra/d) in tokens, with d_extra from the pre-training geometry.

    For an already-extended spec (and no `base`): the shortest current wavelength that did not
    complete a turn in L (the same quantity for plain RoPE), or inf when every pair did.
    """
    require_spec(spec)
    if base is not None and not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1):
        raise RopekitError(f"base must be a finite number > 1, got {base!r}")
    if spec.is_extended and base is None:
        unseen = spec.wavelengths()[~full_rotation_seen(spec)]
        return float(unseen.min()) if unseen.numel() else math.inf
    b = spec.base if base is None else base
    return 2 * math.pi * b ** (critical_dimension(spec) / spec.rotary_dim)


def base_for_bound(spec: RopeSpec, bound: float) -> float:
    """The base b' whose extrapolation bound T_extra equals `bound` tokens: (T/2π)^(d/d_extra).

    `bound` must exceed 2π tokens (a shorter bound would need a base ≤ 1).
    """
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 2 * math.pi:
        raise RopekitError(f"bound must be a number of tokens above 2π ≈ 6.28, got {bound!r}")
    d_extra = critical_dimension(spec)
    if d_extra == 0:
        raise RopekitError("critical dimension is 0 (no pair has completed a rotation); no base change can help")
    return (bound / (2 * math.pi)) ** (spec.rotary_dim / d_extra)


def full_rotation_seen(spec: RopeSpec) -> torch.Tensor:
    """Boolean per pair: λ_i ≤ L (the pair saw every angle in pre-training)."""
    return spec.wavelengths() <= spec.original_length


def long_term_decay_min(rotary_dim: int, base: float, length: int, chunk: int = 1 << 16) -> float:
    """min over 0 ≤ m < length of B(m) = Σ_i cos(m·θ_i), float64 (Men et al. 2024, eq. for B_{m,θ})."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    inv_freq = base**-exponent  # (d/2,)
    low = math.inf
    for start in range(0, length, chunk):
        m = torch.arange(start, min(start + chunk, length), dtype=torch.float64)
        total = torch.cos(m[:, None] * inv_freq[None, :]).sum(dim=1)  # (chunk,)
        low = min(low, float(total.min()))
        if low < 0:
            return low  # already fails; the exact minimum is not needed
    return low


def min_base_for_length(spec: RopeSpec, length: int, *, rel_tol: float = 1e-4) -> float:
    """Smallest base b with B(m) ≥ 0 for all 0 ≤ m < `length` (Men et al. 2024).

    Scans b on a ×1.25 geometric grid from 2, then bisects (in log space) between the last
    failing and the first passing grid point to a relative tolerance `rel_tol`.
    Cost: O(length · d/2) cosines per candidate.
    """
    require_spec(spec)
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise RopekitError(f"length must be an integer number of tokens ≥ 2, got {length!r}")
    d = spec.rotary_dim

    def ok(b: float) -> bool:
        return long_term_decay_min(d, b, length) >= 0

    lo, hi = 1.0, 2.0
    while not ok(hi):
        lo, hi = hi, hi * 1.25
        if hi > 1e15:
            raise RopekitError(f"no base up to 1e15 keeps B(m) ≥ 0 for {length} tokens")
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi
