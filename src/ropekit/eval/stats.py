"""Rank statistics for comparing plans: does the disturbance order plans as the measurements do?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as scipy.stats.rankdata).

    >>> average_ranks([10.0, 30.0, 20.0, 20.0]).tolist()
    [1.0, 4.0, 2.5, 2.5]
    """
    v = np.asarray(values, dtype=float)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        ranks[v == value] = ranks[v == value].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ with tied ranks; None for fewer than 3 points or a constant variable.

    >>> round(spearman([1, 2, 3, 4], [10, 20, 15, 40]), 6)
    0.8
    """
    if len(x) < 3 or len(set(x)) == 1 or len(set(y)) == 1:
        return None
    return float(np.corrcoef(average_ranks(x), average_ranks(y))[0, 1])
