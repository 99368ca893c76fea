"""Disturbance of the rotary-angle distribution (Wu et al. 2024).

D_i = Σ_k P_ik · ln(P_ik / Q_ik): KL(P‖Q), pre-training distribution first, natural log,
summed over the K bins, where P uses θ at N = L and Q uses θ' at N = L'. A whole method
is scored as 1000 × mean_i D_i (the paper's units).

Note: the authors' script computes `F.kl_div(Q.log(), P, reduction="mean")`, i.e. the same
sum divided by K; it does not change which candidate wins at threshold 0. ropekit follows
the shared reference (the sum).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ropekit.plan.analysis.angles import DEFAULT_BINS, angle_counts, angle_distribution
from ropekit.plan.geometry import RopeSpec

_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_CACHE_SIZE = 64
_CACHE_BYTES = 1 << 29  # memoised distributions kept below 512 MiB (large head_dim × bins)


def distribution(inv_freq: torch.Tensor, length: int, bins: int = DEFAULT_BINS) -> torch.Tensor:
    """P (or Q) of shape (d/2, K), float64; memoised on the exact float32 frequencies."""
    inv_freq = inv_freq.to(torch.float32).contiguous()
    key = (inv_freq.numpy().tobytes(), length, bins)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    result = angle_distribution(angle_counts(inv_freq, length, bins), length)
    _CACHE[key] = result
    while len(_CACHE) > 1 and (
        len(_CACHE) > _CACHE_SIZE or sum(t.numel() * t.element_size() for t in _CACHE.values()) > _CACHE_BYTES
    ):
        _CACHE.popitem(last=False)
    return result


def clear_cache() -> None:
    """Forget memoised distributions (for honest timings)."""
    _CACHE.clear()


def kl_per_pair(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Σ_k P ln(P/Q) per row, float64."""
    return (p * (p.log() - q.log())).sum(dim=-1)


def pre_training_distribution(spec: RopeSpec, bins: int = DEFAULT_BINS) -> torch.Tensor:
    """P: the original θ over the pre-training positions 0 … L−1."""
    return distribution(spec.inv_freq(), spec.context_length, bins)


def pair_disturbance(
    spec: RopeSpec, inv_freq: torch.Tensor, target_length: int, *, bins: int = DEFAULT_BINS
) -> torch.Tensor:
    """D_i for frequencies `inv_freq` used over 0 … L'−1, shape (d/2,), float64 nats."""
    q = distribution(inv_freq, target_length, bins)
    return kl_per_pair(pre_training_distribution(spec, bins), q)


def disturbance_score(pair_values: torch.Tensor) -> float:
    """1000 × mean over pairs (the paper's table units)."""
    return 1000.0 * float(pair_values.mean())
