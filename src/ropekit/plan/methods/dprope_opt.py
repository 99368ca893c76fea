"""`dprope-opt`: the distributional method with a free per-pair factor f_i ∈ [1, s]; a = 1.

The paper (Wu et al. 2024) lets each pair choose between extrapolation (f = 1) and
interpolation (f = s). Nothing in its criterion requires that: this method picks, per pair,
the factor in [1, s] that minimises the same disturbance D_i(f) = KL(P_i‖Q_i(θ_i/f, L')).

The 1-D search, per pair (all pairs at once, vectorised):
  1. Grid: `steps` factors spaced evenly in log f from 1 to s, both ends included; the two
     ends are scored exactly as `dprope` scores its candidates (θ and θ/s in float32), so
     D_i(chosen) ≤ min(D_i(1), D_i(s)) holds for every pair: the method's disturbance is
     never higher than `dprope`'s, whatever dprope's t or n.
  2. Refinement, `refine_rounds` times: about `steps` factors spaced evenly in log f across
     the two grid cells around the current best (the best itself in the middle); a refined
     factor is kept only if it lowers D_i.
D_i(f) is a step function of f (histogram counts) and, for high-frequency pairs, a rough one
(θ·m mod 2π aliases against the bins, so narrow dips appear at particular f): this is a grid
search with local zoom, not a proof of the global minimum, and a denser grid can find lower
D_i for such pairs without any meaningful change in the rotation. Ties go to the smaller factor (dprope's
extrapolate-on-tie rule). Candidate frequencies are θ/f in float32 (the authors' arithmetic,
as in `dprope`); the runtime inv_freq is 1/(f_i·b^(2i/d)), transformers' `longrope`.
"""

from __future__ import annotations

import torch

from ropekit.domains import Domain
from ropekit.errors import RopekitError
from ropekit.plan.analysis.angles import BINS, DEFAULT_BINS, angle_counts, angle_distribution
from ropekit.plan.analysis.disturbance import kl_per_pair, pre_training_distribution
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods._common import require_scale
from ropekit.plan.methods.dprope import candidate_disturbances
from ropekit.plan.methods.longrope import per_pair_inv_freq
from ropekit.plan.methods.record import Method, Param
from ropekit.plan.scaling import Scaling

_ELEMENTS_PER_CHUNK = 1 << 24  # angle values held at once while counting (64 MiB of float32)


def candidate_grid_disturbance(
    p: torch.Tensor, base_inv_freq: torch.Tensor, factors: torch.Tensor, target_length: int, bins: int
) -> torch.Tensor:
    """D_ij = KL(P_i ‖ Q(θ_i / f_ij, L')) for a (pairs, G) float32 factor matrix; float64, shape (pairs, G)."""
    pairs, g = factors.shape
    inv_freq = (base_inv_freq[:, None] / factors).reshape(-1)  # float32, (pairs·G,)
    chunk = max(1024, _ELEMENTS_PER_CHUNK // inv_freq.numel())
    q = angle_distribution(angle_counts(inv_freq, target_length, bins, chunk=chunk), target_length)
    return kl_per_pair(p.repeat_interleave(g, dim=0), q).reshape(pairs, g)


def log_spaced(low: torch.Tensor, high: torch.Tensor, steps: int) -> torch.Tensor:
    """(pairs, steps) float32 factors from low_i to high_i, evenly spaced in log f (ends exact)."""
    fractions = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    grid = torch.exp(low.log()[:, None] + (high.log() - low.log())[:, None] * fractions[None, :])
    grid[:, 0], grid[:, -1] = low, high
    return grid.to(torch.float32)


def zoom_grid(low: torch.Tensor, best: torch.Tensor, high: torch.Tensor, steps: int) -> torch.Tensor:
    """(pairs, 2·(steps//2)+1) float32 factors log-spaced low → best → high, with `best` exactly in the middle."""
    half = steps // 2
    return torch.cat([log_spaced(low, best, half + 1), log_spaced(best, high, half + 1)[:, 1:]], dim=1)


def dprope_opt(
    spec: RopeSpec,
    target_length: int,
    *,
    bins: int = DEFAULT_BINS,
    steps: int = 33,
    refine_rounds: int = 2,
) -> Scaling:
    """Per-pair factor in [1, s] of least angle-distribution disturbance (module docstring: the search).

    `details` carries the per-pair D at f = 1 and f = s (dprope's candidates) and at the chosen f.
    """
    if not isinstance(bins, int) or bins < 2:
        raise RopekitError(f"bins K must be an integer ≥ 2, got {bins!r}")
    if not isinstance(steps, int) or steps < 3:
        raise RopekitError(f"steps (grid points per pair) must be an integer ≥ 3, got {steps!r}")
    if not isinstance(refine_rounds, int) or refine_rounds < 0:
        raise RopekitError(f"refine_rounds must be an integer ≥ 0, got {refine_rounds!r}")
    scale = target_length / spec.context_length
    require_scale(scale)
    base_inv_freq = spec.inv_freq()
    p = pre_training_distribution(spec, bins)
    d_extra, d_interp = candidate_disturbances(spec, target_length, scale=scale, bins=bins)

    ones = torch.ones(spec.num_pairs, dtype=torch.float64)
    grid = log_spaced(ones, ones * scale, steps)
    d = torch.empty(spec.num_pairs, steps, dtype=torch.float64)
    d[:, 0], d[:, -1] = d_extra, d_interp  # the ends exactly as dprope scores them
    d[:, 1:-1] = candidate_grid_disturbance(p, base_inv_freq, grid[:, 1:-1], target_length, bins)
    best_index = d.argmin(dim=1)  # first minimum: the smallest factor on ties
    rows = torch.arange(spec.num_pairs)
    best_factor, best_d = grid[rows, best_index].clone(), d[rows, best_index].clone()

    for _ in range(refine_rounds):
        low = grid[rows, (best_index - 1).clamp(min=0)].double()
        high = grid[rows, (best_index + 1).clamp(max=grid.shape[1] - 1)].double()
        grid = zoom_grid(low, best_factor.double(), high, steps)
        d = candidate_grid_disturbance(p, base_inv_freq, grid, target_length, bins)
        best_index = d.argmin(dim=1)
        improved = d[rows, best_index] < best_d
        best_index = torch.where(improved, best_index, torch.full_like(best_index, steps // 2))
        best_factor = grid[rows, best_index]
        best_d = torch.where(improved, d[rows, best_index], best_d)

    factors = tuple(float(f) for f in best_factor.tolist())
    return Scaling(
        inv_freq=per_pair_inv_freq(spec, factors),
        factors=factors,
        details={
            "d_extrapolation": d_extra.tolist(),
            "d_interpolation": d_interp.tolist(),
            "pair_disturbance": best_d.tolist(),
            "search": {"steps": steps, "refine_rounds": refine_rounds, "spacing": "log f"},
        },
    )


METHOD = Method(
    "dprope-opt",
    dprope_opt,
    "per-pair factor in [1, s] of least angle-distribution disturbance (1-D search)",
    "ropekit; criterion of Wu et al. 2024",
    params=(
        Param("bins", int, "histogram bins K over [0, 2π)", default=DEFAULT_BINS, flag=None, domain=BINS),
        Param("steps", int, "grid factors per pair", default=33, flag=None, domain=Domain(3, 1000, integer=True)),
        Param(
            "refine_rounds",
            int,
            "zoom rounds around the best grid factor",
            default=2,
            flag=None,
            domain=Domain(0, 20, integer=True),
        ),
    ),
    in_default_comparison=False,
)
