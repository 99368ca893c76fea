"""Rotary-angle histograms per pair (Wu et al. 2024, the distributional method).

For frequencies θ (float32) and length N the angles of pair i are (θ_i·m) mod 2π for the
absolute positions m = 0 … N−1, in float32. [0, 2π) is split into K equal bins and an
angle goes to bin floor(K/(2π)·angle). This reproduces the authors' float32 operations
(positions cast to float32, `remainder` by 2π, the bin scale K/2π rounded to float32) so
counts are identical to their double loop, but vectorised: O(d/2 · N) work in chunks,
O(d/2 · K) memory for the result.
"""

from __future__ import annotations

import math

import torch

from ropekit.domains import Domain

EPSILON = 6.103515625e-05  # smallest normal float16: every bin starts here
DEFAULT_BINS = 360
BINS = Domain(2, 36_000, integer=True, why="memory: d/2 × K counts per histogram; 36,000 bins are 0.01° wide")
CHUNK_ELEMENTS = 1 << 22  # angles computed per chunk (pairs × positions): bounded memory at any head_dim


def angle_counts(
    inv_freq: torch.Tensor, length: int, bins: int = DEFAULT_BINS, *, chunk: int | None = None
) -> torch.Tensor:
    """Integer angle counts, shape (d/2, K), int64; each row sums to `length`.

    >>> counts = angle_counts(torch.tensor([1.0, 0.001]), 1000)
    >>> counts.shape, counts.sum(dim=1).tolist()
    (torch.Size([2, 360]), [1000, 1000])
    >>> int((counts[1] > 0).sum())  # 0.001 rad/token sweeps 1 rad ≈ 57° in 1000 tokens
    58
    """
    inv_freq = inv_freq.to(torch.float32).reshape(-1)
    num_pairs = inv_freq.numel()
    chunk = chunk or max(1, CHUNK_ELEMENTS // max(num_pairs, 1))  # positions per chunk
    two_pi = math.pi * 2
    bin_scale = bins / two_pi
    row_offset = (torch.arange(num_pairs, dtype=torch.int64) * bins)[:, None]  # (P, 1)
    counts = torch.zeros(num_pairs * bins, dtype=torch.int64)
    for start in range(0, length, chunk):
        positions = torch.arange(start, min(start + chunk, length), dtype=torch.int64).to(torch.float32)  # (C,)
        angles = torch.remainder(inv_freq[:, None] * positions[None, :], two_pi)  # (P, C) float32
        index = torch.floor(bin_scale * angles).to(torch.int64).clamp_(0, bins - 1)  # guard bin K from rounding
        counts += torch.bincount((index + row_offset).reshape(-1), minlength=num_pairs * bins)
    return counts.reshape(num_pairs, bins)


def angle_counts_literal(inv_freq: torch.Tensor, length: int, bins: int = DEFAULT_BINS) -> torch.Tensor:
    """The authors' reference algorithm, a Python double loop over pairs × positions.

    Slow on purpose (seconds at 16k, hours at 1M): kept as the independent reference for
    tests and for `bench/plan_speed.py`. Returns integer counts like `angle_counts`.
    """
    inv_freq = inv_freq.to(torch.float32).reshape(-1)
    num_pairs = inv_freq.numel()
    all_freqs = inv_freq.repeat(length, 1).transpose(0, 1)  # (P, N)
    all_positions = torch.arange(0, length).repeat(num_pairs, 1)  # (P, N) int64
    all_angles = (all_freqs * all_positions) % (torch.pi * 2)
    counts = torch.zeros((num_pairs, bins), dtype=torch.int64)
    for i in range(all_angles.shape[0]):
        for m in range(all_angles.shape[1]):
            b = int(torch.floor((bins / (torch.pi * 2)) * all_angles[i][m]))
            counts[i][b] += 1
    return counts


def angle_distribution(counts: torch.Tensor, length: int) -> torch.Tensor:
    """P_ik = (ε + count_ik) / N, float64, no renormalisation (shared reference, step 1)."""
    return (counts.to(torch.float64) + EPSILON) / length
