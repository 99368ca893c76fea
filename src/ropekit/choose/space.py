"""Search spaces of `ropekit tune`: which plans a trial may propose, as optuna parameters.

A candidate is per-pair factors f_i ∈ [1, s] (θ'_i = θ_i / f_i, pair i = 0 … d/2 − 1, fastest
first) and an attention factor a (multiplies cos and sin). Three families:

  * ``ramp`` (3 parameters: ``ramp_start``, ``ramp_width``, ``attention_factor``): pairs below the
    ramp keep f = 1, pairs past it get f = s, and in between 1/f blends 1 and 1/s linearly in the
    pair index, in YaRN's float32 arithmetic (`ropekit.plan.methods.yarn`). YaRN itself is the
    member (low, high − low, 0.1·ln s + 1), bit for bit, and so is every step plan (dprope-n).
  * ``monotone`` (d/2 + 1 parameters): one factor per pair, made non-decreasing in the pair index
    (with wavelength) by a running maximum: LongRoPE's constraint. Seeds that already satisfy it
    are members unchanged; others are repaired the same way.
  * ``per-pair`` (d/2 + 1 parameters): one factor per pair, unconstrained.

Factors are searched on a log scale (a factor of 2 is as far from 1 as 4 from 2). `project`
maps a seed plan into a family's parameters, exactly where the seed is a member, so enqueued
seeds reuse their screened measurement (same factors, same plan fingerprint).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ropekit.errors import RopekitError

if TYPE_CHECKING:
    import optuna

FAMILIES = ("ramp", "monotone", "per-pair")
ZERO_WIDTH = 0.001  # YaRN's guard against a zero-width ramp (transformers and the authors' repo)


@dataclass(frozen=True)
class Candidate:
    """One proposed plan: per-pair factors (float64 values) and the attention factor."""

    factors: tuple[float, ...]
    attention_factor: float


@dataclass(frozen=True)
class SearchSpace:
    """A family of plans over `num_pairs` pairs for scale s, attention factor in `attention_range`."""

    family: str
    num_pairs: int
    scale: float  # s = L'/L: factors lie in [1, s]
    attention_range: tuple[float, float]

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise RopekitError(f"search family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if not self.scale > 1:
            raise RopekitError(f"the search needs a scale s > 1, got {self.scale}")
        lo, hi = self.attention_range
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise RopekitError(f"attention factor range must be 0 < LO ≤ HI, got {lo}:{hi}")

    # ---- parameters ------------------------------------------------------------------------------

    def bounds(self) -> dict[str, tuple[float, float, bool]]:
        """Parameter name → (low, high, log scale)."""
        out: dict[str, tuple[float, float, bool]]
        if self.family == "ramp":
            P = float(self.num_pairs)
            out = {"ramp_start": (-1.0, P, False), "ramp_width": (0.0, P + 1, False)}
        else:
            out = {factor_name(i): (1.0, self.scale, True) for i in range(self.num_pairs)}
        lo, hi = self.attention_range
        if hi > lo:
            out["attention_factor"] = (lo, hi, False)
        return out

    @property
    def dimensions(self) -> int:
        return len(self.bounds())

    def suggest(self, trial: optuna.Trial) -> Candidate:
        """Ask the trial for every parameter of the family; the candidate they make."""
        params = {name: trial.suggest_float(name, lo, hi, log=log) for name, (lo, hi, log) in self.bounds().items()}
        return self.candidate(params)

    def candidate(self, params: Mapping[str, float]) -> Candidate:
        """The plan a set of parameters makes (also for trials read back from the study)."""
        a = float(params.get("attention_factor", self.attention_range[0]))
        if self.family == "ramp":
            factors = ramp_factors(self.num_pairs, params["ramp_start"], params["ramp_width"], self.scale)
        else:
            factors = tuple(float(params[factor_name(i)]) for i in range(self.num_pairs))
            if self.family == "monotone":
                factors = running_max(factors)
        return Candidate(factors, a)

    def project(self, factors: Sequence[float], attention_factor: float) -> dict[str, float]:
        """Parameters of the family member nearest a seed plan (exact for members, see the module docstring)."""
        f = [min(max(float(x), 1.0), self.scale) for x in factors]
        if len(f) != self.num_pairs:
            raise RopekitError(f"seed has {len(f)} factors; this geometry has {self.num_pairs} pairs")
        lo, hi = self.attention_range
        params: dict[str, float] = {}
        if self.family == "ramp":
            params.update(ramp_of(f, self.scale))
        else:
            params.update({factor_name(i): x for i, x in enumerate(f)})
        if hi > lo:
            params["attention_factor"] = min(max(float(attention_factor), lo), hi)
        return params


def factor_name(pair: int) -> str:
    return f"f{pair:03d}"


def running_max(factors: Sequence[float]) -> tuple[float, ...]:
    """f'_i = max(f_0 … f_i): the smallest non-decreasing sequence at or above f."""
    out, top = [], -math.inf
    for f in factors:
        top = max(top, f)
        out.append(top)
    return tuple(out)


def ramp_factors(num_pairs: int, start: float, width: float, scale: float) -> tuple[float, ...]:
    """f_i for a ramp from pair `start` over `width` pairs, in YaRN's arithmetic.

    ramp_i = clip((i − low)/(high − low), 0, 1) in float32 with low = start, high = start + width
    (+ 0.001 when width is 0); mask = 1 − ramp; f_i = 1/((1 − mask_i)/s + mask_i) in float64.
    """
    low, high = float(start), float(start) + float(width)
    if high == low:
        high += ZERO_WIDTH
    ramp = torch.clamp((torch.arange(num_pairs, dtype=torch.float32) - low) / (high - low), 0, 1)
    mask = (1 - ramp).double()  # 1: keep θ_i, 0: θ_i / s
    return tuple((1.0 / ((1 - mask) / scale + mask)).tolist())


def ramp_of(factors: Sequence[float], scale: float) -> dict[str, float]:
    """(ramp_start, ramp_width) of a factor list: start at the last pair still at 1 before the first
    that grows (−1 when pair 0 grows), end at the first pair at s. Exact for YaRN's ramps and for steps."""
    num_pairs, tol = len(factors), 1e-9
    grown = [i for i, f in enumerate(factors) if f > 1 + tol]
    if not grown:
        return {"ramp_start": float(num_pairs), "ramp_width": 0.0}
    start = grown[0] - 1
    end = next((i for i in range(grown[0], num_pairs) if factors[i] >= scale * (1 - tol)), num_pairs)
    return {"ramp_start": float(start), "ramp_width": float(end - start)}
