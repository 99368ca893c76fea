"""PoSE, positional skip-wise training (Zhu et al. 2023).

Train on windows of L_c tokens while exposing position ids up to L': the window is split
into `chunks` contiguous chunks (random split points); the first chunk keeps positions
0 …; each later chunk's positions are shifted by a random, non-decreasing skip, with the
total skip ≤ L' − L_c so the largest position id is < L'. Tokens stay in their original
order; only `position_ids` change, so PoSE composes with every scaling method.
"""

from __future__ import annotations

import numpy as np
import torch

from ropekit.errors import RopekitError


def pose_position_ids(train_length: int, target_length: int, rng: np.random.Generator, *, chunks: int = 2) -> torch.Tensor:
    """Position ids, shape (train_length,), int64, strictly increasing, max < target_length."""
    if not 1 <= chunks <= train_length:
        raise RopekitError(f"PoSE chunks must be in [1, {train_length}], got {chunks}")
    if train_length > target_length:
        raise RopekitError(f"PoSE training length {train_length} exceeds the target length {target_length}")
    cuts = np.sort(rng.choice(np.arange(1, train_length), size=chunks - 1, replace=False)) if chunks > 1 else []
    room = target_length - train_length
    skips = np.sort(rng.integers(0, room + 1, size=chunks - 1)) if chunks > 1 else []
    offsets = np.zeros(train_length, dtype=np.int64)
    for cut, skip in zip(cuts, skips):
        offsets[cut:] = skip  # later chunks get a larger (or equal) skip
    return torch.from_numpy(np.arange(train_length, dtype=np.int64) + offsets)


def pose_rng(seed: int, window: int, step: int) -> np.random.Generator:
    """A generator that depends only on (seed, window, step): resume- and rank-independent."""
    return np.random.default_rng([seed, window, step, 0x905E])
