"""The distributional method (Wu et al. 2024, "Extending Context Window of Large Language
Models from a Distributional Perspective"); a = 1.

Per pair i, two candidates: extrapolation (f_i = 1) and interpolation (f_i = s). With P_i
the pre-training angle distribution (θ, N = L) and Q_i a candidate's (θ', N = L'), the
disturbance is D_i = KL(P_i‖Q_i). Interpolate pair i iff D_i(extra) − D_i(interp) > t
(authors' default t = 0, ties extrapolate), or, with `interpolated_dims=n`, interpolate
the n/2 pairs with the largest margin. The paper's LLaMA-2 experiments interpolate n = 80
dimensions at 8k and n = 64 at 16k (`PAPER_INTERPOLATED_DIMS`), fewer than the argmin at t = 0
(94 and 84): `paper_interpolated_dims` gives the paper's n for a geometry and target. Candidate frequencies use the authors' arithmetic
(θ and θ/s in float32); the runtime inv_freq is 1/(f_i·b^(2i/d)), as transformers'
`longrope` computes it, so an exported config reloads to exactly this plan.
"""

from __future__ import annotations

import math

import torch

from ropekit.domains import Domain
from ropekit.errors import RopekitError
from ropekit.plan.analysis.angles import BINS, DEFAULT_BINS
from ropekit.plan.analysis.disturbance import distribution, kl_per_pair, pre_training_distribution
from ropekit.plan.geometry import HEAD_DIM, RopeSpec
from ropekit.plan.methods.longrope import per_pair_inv_freq
from ropekit.plan.methods.record import Method, Param
from ropekit.plan.scaling import Scaling

# Wu et al. 2024, experiments on LLaMA-2 (head_dim 128, base 10000, pre-trained at 4096): target → n
PAPER_INTERPOLATED_DIMS = {8192: 80, 16384: 64}


def paper_interpolated_dims(spec: RopeSpec, target_length: int) -> int | None:
    """The paper's n for LLaMA-2's geometry at 8k or 16k; None for any other geometry or target."""
    llama2 = (spec.rotary_dim, spec.base, spec.context_length) == (128, 10000.0, 4096)
    return PAPER_INTERPOLATED_DIMS.get(target_length) if llama2 else None


def candidate_disturbances(
    spec: RopeSpec, target_length: int, *, scale: float, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_extra, D_interp) per pair, float64, shape (d/2,) each."""
    base_inv_freq = spec.inv_freq()
    p = pre_training_distribution(spec, bins)
    d_extra = kl_per_pair(p, distribution(base_inv_freq, target_length, bins))
    d_interp = kl_per_pair(p, distribution(base_inv_freq / scale, target_length, bins))
    return d_extra, d_interp


def choose_interpolated(
    margin: torch.Tensor, *, threshold: float | None, interpolated_dims: int | None
) -> torch.Tensor:
    """Boolean per pair: interpolate? By threshold (margin > t) or by count (top n/2 margins)."""
    if interpolated_dims is None:
        return margin > (0.0 if threshold is None else threshold)
    num_pairs = margin.numel()
    if interpolated_dims % 2 or not 0 <= interpolated_dims <= 2 * num_pairs:
        raise RopekitError(f"interpolated_dims n must be even and in [0, {2 * num_pairs}], got {interpolated_dims}")
    order = sorted(range(num_pairs), key=lambda i: (-float(margin[i]), i))  # largest margin first, ties by pair
    chosen = torch.zeros(num_pairs, dtype=torch.bool)
    chosen[order[: interpolated_dims // 2]] = True
    return chosen


def dprope(
    spec: RopeSpec,
    target_length: int,
    *,
    bins: int = DEFAULT_BINS,
    threshold: float | None = None,
    interpolated_dims: int | None = None,
) -> Scaling:
    """Per-pair choice of interpolation or extrapolation by least angle-distribution disturbance.

    Give at most one of `threshold` (t, default 0) and `interpolated_dims` (n, even).
    `details` carries the per-pair D_extra, D_interp, margin and the chosen D.
    """
    if threshold is not None and interpolated_dims is not None:
        raise RopekitError("give either threshold t or interpolated_dims n, not both")
    if threshold is not None and not math.isfinite(threshold):
        raise RopekitError(f"threshold must be a finite number, got {threshold}")
    if not isinstance(bins, int) or bins < 2:
        raise RopekitError(f"bins K must be an integer ≥ 2, got {bins!r}")
    scale = target_length / spec.context_length
    d_extra, d_interp = candidate_disturbances(spec, target_length, scale=scale, bins=bins)
    margin = d_extra - d_interp
    interpolate = choose_interpolated(margin, threshold=threshold, interpolated_dims=interpolated_dims)
    factors = tuple(float(scale) if flag else 1.0 for flag in interpolate.tolist())
    chosen = torch.where(interpolate, d_interp, d_extra)
    return Scaling(
        inv_freq=per_pair_inv_freq(spec, factors),
        factors=factors,
        details={
            "d_extrapolation": d_extra.tolist(),
            "d_interpolation": d_interp.tolist(),
            "margin": margin.tolist(),
            "pair_disturbance": chosen.tolist(),
        },
    )


def paper_setting(spec: RopeSpec, target_length: int) -> tuple[str, dict]:
    """The paper's n for this geometry and target as (label, parameters), or one clear error."""
    n = paper_interpolated_dims(spec, target_length)
    if n is None:
        targets = ", ".join(str(t) for t in PAPER_INTERPOLATED_DIMS)
        raise RopekitError(
            f"the paper's setting exists for LLaMA-2's geometry (head_dim 128, base 10000, 4096) at {targets}"
        )
    return f"n={n}", {"interpolated_dims": n}


METHOD = Method(
    "dprope",
    dprope,
    "per-pair interpolate/extrapolate by least angle-distribution disturbance",
    "Wu et al. 2024",
    params=(
        Param("bins", int, "histogram bins K over [0, 2π)", default=DEFAULT_BINS, flag=None, domain=BINS),
        Param("threshold", float, "interpolate a pair iff D(extra) − D(interp) > t", default=0, domain=Domain()),
        Param(
            "interpolated_dims",
            int,
            "interpolate exactly n dims (n/2 pairs with largest margin), n even",
            domain=Domain(0, HEAD_DIM.high, integer=True),
        ),
    ),
    aliases=("distributional",),
    exact_inv_freq=True,
    paper_setting=paper_setting,
)
