"""p-RoPE (Barbero et al. 2024, "Round and Round We Go! What makes Rotary Positional Encodings useful?").

The paper finds that trained models use the highest RoPE frequencies for positional attention and the
lowest ones as semantic channels that are not robust over long contexts, and proposes p-RoPE: rotate
only the fraction p of the frequencies that are highest, and leave the lowest ones unrotated (p = 1 is
RoPE, p → 0 approaches NoPE; the paper's best 2B model keeps p = 0.75, Gemma 4 ships p = 0.25 as
transformers' `proportional` rope type with `partial_rotary_factor` = p).

With n rotating pairs (every pair, or the pairs a model already rotates), the k = ⌊p·n⌋ pairs of
lowest index keep rotating (pair i has frequency b^(−2i/d), so low index = high frequency) and the
n − k others are removed: θ'_i = 0, f_i = `ROTATION_REMOVED`. p·n within 1e-9 of a whole number
counts as that number (0.29 × 100 is 29 pairs, not 28). For a plain model over the full head
dimension this is exactly transformers' `proportional` with `partial_rotary_factor = k/(d/2)`.

The kept pairs get the frequencies of the method it wraps (`inner`, default `none`: unchanged), so
`p-rope --inner yarn` is YaRN on the rotating pairs and no rotation on the others.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ropekit.domains import Domain
from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods.catalog import compute_scaling
from ropekit.plan.methods.record import Method, Param
from ropekit.plan.methods.resonance import known_method
from ropekit.plan.scaling import ROTATION_REMOVED, Scaling

FRACTION = Domain(0, 1, low_open=True, why="the fraction of rotating pairs that keep rotating")
PAPER_P = 0.75  # the paper's best p on its 2B model (lowest perplexity, Wiki and FlanV2)


def kept_pairs(spec: RopeSpec, p: float) -> tuple[int, ...]:
    """The pairs p-RoPE keeps rotating: the ⌊p·n⌋ lowest-index (highest-frequency) of the n rotating pairs.

    >>> kept_pairs(RopeSpec(head_dim=16, base=10000.0, context_length=512), 0.75)
    (0, 1, 2, 3, 4, 5)
    """
    rotating = spec.rotating_pairs
    count = math.floor(p * len(rotating) + 1e-9)
    if count < 1:
        raise RopekitError(
            f"p-rope: p = {p:g} of {len(rotating)} rotating pairs keeps none; give p ≥ {1 / len(rotating):.4g}"
        )
    return rotating[:count]


def p_rope(
    spec: RopeSpec, target_length: int, *, p: float = PAPER_P, inner: str = "none", **inner_params: Any
) -> Scaling:
    """Keep the fraction p of the highest frequencies rotating (planned by `inner`), remove the rest."""
    FRACTION.check("p-rope: p (--p)", p)
    kept = set(kept_pairs(spec, float(p)))
    wrapped = compute_scaling(inner, spec, target_length, **inner_params)
    keep = torch.tensor([i in kept for i in range(spec.num_pairs)])
    return Scaling(
        inv_freq=torch.where(keep, wrapped.inv_freq, torch.zeros(())),
        factors=tuple(f if i in kept else ROTATION_REMOVED for i, f in enumerate(wrapped.factors)),
        attention_factor=wrapped.attention_factor,
        details={
            **wrapped.details,
            "p": float(p),
            "kept_pairs": len(kept),
            "inner": inner,
            **{f"inner_{k}": v for k, v in inner_params.items()},
        },
    )


METHOD = Method(
    "p-rope",
    p_rope,
    "rotate only the fraction p of highest frequencies; the lowest stop rotating",
    "Barbero et al. 2024",
    params=(
        Param(
            "p",
            float,
            "fraction of the rotating pairs that keep rotating (highest frequencies)",
            default=PAPER_P,
            domain=FRACTION,
        ),
        Param("inner", str, "the method planning the kept pairs", default="none", read=known_method),
    ),
    aliases=("prope", "partial-rope"),
    wraps="inner",
    in_default_comparison=False,  # a training-time choice (the paper trains with it): plan it by name
)
