"""PoSE, positional skip-wise training (Zhu et al. 2023, §3.2; dwzhu-pku/PoSE `src/train_pose.py`).

Train on windows of L_c tokens while exposing position ids up to L'. The window is N chunks:
  * chunk 0 starts at position 0; its length l_0 ~ U{1 … ⌊(L_c + 1)/2⌋} (the official code's
    first-chunk draw); with N > 2 the remaining L_c − l_0 tokens are cut into N − 1 non-empty
    chunks at uniformly chosen distinct cut points (ropekit's convention: the official code has
    two chunks);
  * position skips, drawn one after another: u_0 = 0, u_i ~ U{u_{i−1} … L' − L_c}; chunk i's
    positions are its offsets in the window + u_i, so the largest position id is < L';
  * optional text skips (the official code's second-chunk text draw): the window is cut from a
    source span of L_x = L_c + `text_skip` tokens; v_0 = 0, v_i ~ U{v_{i−1} … L_x − L_c}, and
    chunk i reads the source from its window offset + v_i. Without text skips (L_x = L_c) the
    tokens are the window itself.
U{a … b} is uniform over the integers a to b inclusive. Only `position_ids` (and, with text
skips, which tokens are read) change, so PoSE composes with every scaling method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ropekit.errors import RopekitError


@dataclass(frozen=True)
class PoseSample:
    token_index: np.ndarray  # (L_c,) int64 indices into the source span of L_c + text_skip tokens
    position_ids: torch.Tensor  # (L_c,) int64, strictly increasing, < L'
    chunk_lengths: tuple[int, ...]
    position_skips: tuple[int, ...]  # u_0 = 0, u_1, …
    text_skips: tuple[int, ...]  # v_0 = 0, v_1, …


def max_chunks(train_length: int) -> int:
    """The most chunks a window can hold: l_0 may be ⌊(L_c+1)/2⌋, and every later chunk needs a token."""
    return train_length - (train_length + 1) // 2 + 1


def chunk_lengths(train_length: int, chunks: int, rng: np.random.Generator) -> list[int]:
    first = int(rng.integers(1, (train_length + 1) // 2 + 1))
    if chunks == 1:
        return [train_length]
    rest = train_length - first
    cuts = np.sort(rng.choice(np.arange(1, rest), size=chunks - 2, replace=False)) if chunks > 2 else np.array([], int)
    edges = [0, *cuts.tolist(), rest]
    return [first] + [b - a for a, b in zip(edges, edges[1:])]


def sequential_skips(count: int, high: int, rng: np.random.Generator) -> list[int]:
    """0, then `count` draws s_i ~ U{s_{i−1} … high}."""
    skips = [0]
    for _ in range(count):
        skips.append(int(rng.integers(skips[-1], high + 1)))
    return skips


def pose_sample(
    train_length: int, target_length: int, rng: np.random.Generator, *, chunks: int = 2, text_skip: int = 0
) -> PoseSample:
    """One PoSE window: which source tokens to read and their position ids."""
    if train_length > target_length:
        raise RopekitError(f"PoSE training length {train_length} exceeds the target length {target_length}")
    if not 1 <= chunks <= max_chunks(train_length):
        raise RopekitError(
            f"PoSE chunks must be in [1, {max_chunks(train_length)}] for windows of {train_length}, got {chunks}"
        )
    if text_skip < 0:
        raise RopekitError(f"PoSE text skip must be ≥ 0 tokens, got {text_skip}")
    lengths = chunk_lengths(train_length, chunks, rng)
    u = sequential_skips(chunks - 1, target_length - train_length, rng)
    v = sequential_skips(chunks - 1, text_skip, rng) if text_skip else [0] * chunks
    offsets = np.repeat(np.asarray(u, dtype=np.int64), lengths)
    text_offsets = np.repeat(np.asarray(v, dtype=np.int64), lengths)
    window = np.arange(train_length, dtype=np.int64)
    return PoseSample(window + text_offsets, torch.from_numpy(window + offsets), tuple(lengths), tuple(u), tuple(v))


def pose_position_ids(
    train_length: int, target_length: int, rng: np.random.Generator, *, chunks: int = 2
) -> torch.Tensor:
    """Position ids, shape (train_length,), int64, strictly increasing, max < target_length."""
    return pose_sample(train_length, target_length, rng, chunks=chunks).position_ids


def pose_rng(seed: int, window: int, step: int) -> np.random.Generator:
    """A generator that depends only on (seed, window, step): resume- and rank-independent."""
    return np.random.default_rng([seed, window, step, 0x905E])
