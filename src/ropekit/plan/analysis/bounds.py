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
from ropekit.plan.geometry import TARGET_LENGTH, RopeSpec, require_spec


def critical_dimension(spec: RopeSpec) -> int:
    """d_extra = 2·⌈(d/2)·log_b(L/2π)⌉, clipped to [0, d].

    >>> critical_dimension(RopeSpec(head_dim=128, base=10000.0, context_length=4096))
    92
    """
    require_spec(spec)
    d, L = spec.rotary_dim, spec.context_length
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
    if (
        isinstance(bound, bool)
        or not isinstance(bound, (int, float))
        or not math.isfinite(bound)
        or bound <= 2 * math.pi
    ):
        raise RopekitError(f"bound must be a number of tokens above 2π ≈ 6.28, got {bound!r}")
    d_extra = critical_dimension(spec)
    if d_extra == 0:
        raise RopekitError("critical dimension is 0 (no pair has completed a rotation); no base change can help")
    return (bound / (2 * math.pi)) ** (spec.rotary_dim / d_extra)


def full_rotation_seen(spec: RopeSpec) -> torch.Tensor:
    """Boolean per pair: λ_i ≤ L (the pair saw every angle in pre-training)."""
    return spec.wavelengths() <= spec.context_length


def long_term_decay_min(rotary_dim: int, base: float, length: int) -> float:
    """min over 0 ≤ m < length of B(m) = Σ_i cos(m·θ_i), float64 (Men et al. 2024, eq. for B_{m,θ});
    stops at the first negative chunk (the value returned is then negative, not the exact minimum)."""
    return float(decay_passes(rotary_dim, torch.tensor([float(base)], dtype=torch.float64), length)[1][0])


def decay_passes(
    rotary_dim: int, bases: torch.Tensor, length: int, *, inner: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each base: (B(m) ≥ 0 for every 0 ≤ m < length, the smallest B(m) seen), float64.

    m is written m₀ + j with j < `inner`, so B(m₀ + j) = Σ_i cos(jθ_i)cos(m₀θ_i) − sin(jθ_i)sin(m₀θ_i),
    a matrix product per base. Blocks of m₀ start small and double (most failing bases fail
    early); a base is dropped at its first negative block, so a failing base's minimum is only
    some negative value.
    """
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim  # (P,)
    inv_freq = bases.to(torch.float64)[:, None] ** -exponent[None, :]  # (B, P)
    j = torch.arange(min(inner, length), dtype=torch.float64)
    cos_j = torch.cos(j[None, :, None] * inv_freq[:, None, :])  # (B, J, P)
    sin_j = torch.sin(j[None, :, None] * inv_freq[:, None, :])
    low = torch.full((len(bases),), math.inf, dtype=torch.float64)
    alive = torch.ones(len(bases), dtype=torch.bool)
    start, blocks = 0, 1
    while start < length and bool(alive.any()):
        idx = alive.nonzero().flatten()
        m0 = torch.arange(start, min(start + blocks * len(j), length), len(j), dtype=torch.float64)  # (K,)
        angle = inv_freq[idx][:, :, None] * m0[None, None, :]  # (A, P, K)
        total = cos_j[idx] @ torch.cos(angle) - sin_j[idx] @ torch.sin(angle)  # (A, J, K): B(m₀ + j)
        valid = (m0[None, :] + j[:, None]) < length  # (J, K)
        block_min = total.masked_fill(~valid, math.inf).amin(dim=(1, 2))
        low[idx] = torch.minimum(low[idx], block_min)
        alive[idx] = low[idx] >= 0
        start += len(m0) * len(j)
        blocks *= 2
    return low >= 0, low


MEN_RULES = ("smallest", "all-above")
GRID_START = 2.0  # the base grid starts here: b_k = 2·(1 + resolution)^k


def grid_base(k: int, resolution: float) -> float:
    return GRID_START * (1.0 + resolution) ** k


def _sufficient_index(rotary_dim: int, length: int, resolution: float) -> int:
    """The first grid index from which every base (grid or not) provably passes, by a bound monotone in b.

    For m < L, pairs with (L−1)·θ_i ≤ π/2 contribute ≥ cos((L−1)·θ_i) (cos falls on [0, π/2]);
    every other pair contributes ≥ −1. When that lower bound on B(m) is ≥ 0 the base passes,
    and the bound only grows with b (θ_0 = 1 is fixed, every other θ_i falls).
    """
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim

    def provably_passes(k: int) -> bool:
        angle = (length - 1) * grid_base(k, resolution) ** -exponent
        small = angle <= math.pi / 2
        return float(torch.cos(angle[small]).sum()) - float((~small).sum()) >= 0

    hi = 1
    while not provably_passes(hi):
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:  # bisection is valid here: the bound is monotone in k
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if provably_passes(mid) else (mid, hi)
    return hi


def _passing(rotary_dim: int, length: int, resolution: float, ks: range) -> torch.Tensor:
    bases = torch.tensor([grid_base(k, resolution) for k in ks], dtype=torch.float64)
    return decay_passes(rotary_dim, bases, length)[0]


def min_base_for_length(
    spec: RopeSpec, length: int, *, rule: str = "smallest", resolution: float = 1e-3, batch: int = 256
) -> float:
    """Men et al. (2024)'s lower bound on the base for a context of `length` tokens, on a grid.

    The grid is b_k = 2·(1 + resolution)^k (relative spacing `resolution`, default 0.1%).
    B(m) = Σ_i cos(m·θ_i) ≥ 0 for all 0 ≤ m < length is *not* monotone in b, so no bisection:
      * "smallest":  the smallest grid base that passes (Men et al.'s definition);
      * "all-above": the smallest grid base above which every grid base passes, i.e. the grid
                     point after the largest failing one (bases from a provable bound up all pass).
    Cost: O(length · d/2) cosines per passing candidate; failing ones stop at their first negative chunk.
    """
    require_spec(spec)
    TARGET_LENGTH.check("length (tokens)", length)
    if rule not in MEN_RULES:
        raise RopekitError(f"base-bound rule must be one of {', '.join(MEN_RULES)}, got {rule!r}")
    if not 0 < resolution <= 1:
        raise RopekitError(f"grid resolution must be in (0, 1], got {resolution}")
    d = spec.rotary_dim
    ceiling = _sufficient_index(d, length, resolution)
    if rule == "smallest":
        for first in range(0, ceiling, batch):
            ks = range(first, min(first + batch, ceiling))
            passing = _passing(d, length, resolution, ks).nonzero().flatten()
            if passing.numel():
                return grid_base(ks[int(passing[0])], resolution)
        return grid_base(ceiling, resolution)
    for last in range(ceiling, 0, -batch):  # downwards from the provable ceiling to the first failure
        ks = range(max(last - batch, 0), last)
        failing = (~_passing(d, length, resolution, ks)).nonzero().flatten()
        if failing.numel():
            return grid_base(ks[int(failing[-1])] + 1, resolution)
    return grid_base(0, resolution)
