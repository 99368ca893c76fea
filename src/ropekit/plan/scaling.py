"""What every method returns: per-pair factors, the runtime inv_freq, and an attention factor.

Convention (shared reference): θ'_i = θ_i / f_i, and the attention factor `a` multiplies
both cos and sin, so attention logits scale by a².

Two different things are called "scale" and "factors", and ropekit keeps them apart:
  * s, the scalar scale: L'/L by default (`Plan.scale`); methods that take one call the keyword `scale`;
  * f_i, the per-pair factors (`Scaling.factors`): one divisor per rotary pair.
A pair whose rotation is removed (θ'_i = 0, as p-RoPE and transformers' `proportional` do) has
f_i = `ROTATION_REMOVED` (infinity, θ_i / 0): it is neither interpolated nor extrapolated, JSON
writes it as null, and an export that cannot carry θ' = 0 refuses the plan in one line.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec

ROTATION_REMOVED = math.inf  # f_i of a pair that no longer rotates: θ'_i = θ_i / f_i = 0


@dataclass(frozen=True, eq=False)
class Scaling:
    """The output of one method function.

    `inv_freq` is float32 and computed with the same arithmetic as the runtime that
    implements the method (transformers where it has one), so it can be compared bit for
    bit. `factors` are float64 from the method's closed form.

    Invariants, checked on construction (one `RopekitError` naming the first violation): one
    factor per entry of `inv_freq`; every factor finite and > 0, or `ROTATION_REMOVED` exactly
    where inv_freq is 0; inv_freq finite and ≥ 0; the attention factor finite and > 0. The
    number of pairs is checked against the geometry by `ropekit.make_plan`.
    """

    inv_freq: torch.Tensor  # θ'_i in rad/token, float32, shape (d/2,)
    factors: tuple[float, ...]  # f_i = θ_i / θ'_i, one per pair (ROTATION_REMOVED where θ'_i = 0)
    attention_factor: float = 1.0  # multiplies cos and sin
    details: dict[str, Any] = field(default_factory=dict)  # method-specific diagnostics

    def __post_init__(self) -> None:
        if not isinstance(self.inv_freq, torch.Tensor) or self.inv_freq.dim() != 1:
            raise RopekitError(f"Scaling.inv_freq must be a 1-D tensor, one frequency per pair; got {self.inv_freq!r}")
        try:
            factors = tuple(float(f) for f in self.factors)
        except (TypeError, ValueError):
            raise RopekitError(f"Scaling.factors must be numbers, one per pair; got {self.factors!r}") from None
        object.__setattr__(self, "factors", factors)
        _check_scaling(self.inv_freq, factors, self.attention_factor)

    @property
    def num_pairs(self) -> int:
        return len(self.factors)

    @property
    def removed_pairs(self) -> list[int]:
        """Pairs whose rotation the method removes (θ'_i = 0, f_i = ROTATION_REMOVED)."""
        return [i for i, f in enumerate(self.factors) if f == ROTATION_REMOVED]

    def __eq__(self, other: object) -> bool:
        """Equal when the frequencies are equal bit for bit and every other field is equal."""
        if not isinstance(other, Scaling):
            return NotImplemented
        return (
            torch.equal(self.inv_freq, other.inv_freq)
            and self.factors == other.factors
            and self.attention_factor == other.attention_factor
            and _same_details(self.details, other.details)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable details: not hashable


def _check_scaling(inv_freq: torch.Tensor, factors: tuple[float, ...], attention_factor: Any) -> None:
    """Scaling's invariants (see its docstring), one clear line for the first one broken."""
    if len(factors) != inv_freq.numel():
        raise RopekitError(f"Scaling has {len(factors)} factors for {inv_freq.numel()} frequencies; give one per pair")
    values = inv_freq.detach().double().cpu().tolist()
    for i, (f, theta) in enumerate(zip(factors, values)):
        if f == ROTATION_REMOVED and theta != 0.0:
            raise RopekitError(f"pair {i}: factor ∞ (rotation removed) needs inv_freq 0, got {theta}")
        if f != ROTATION_REMOVED and not (math.isfinite(f) and f > 0):
            raise RopekitError(f"pair {i}: factor f_i must be finite and > 0 (or ROTATION_REMOVED), got {f}")
        if not (math.isfinite(theta) and theta >= 0):
            raise RopekitError(f"pair {i}: inv_freq must be finite and ≥ 0, got {theta}")
        if theta == 0.0 and f != ROTATION_REMOVED:
            raise RopekitError(
                f"pair {i}: inv_freq 0 means its rotation is removed; its factor must be ROTATION_REMOVED"
            )
    if isinstance(attention_factor, bool) or not isinstance(attention_factor, (int, float)):
        raise RopekitError(f"attention factor must be a number, got {attention_factor!r}")
    if not (math.isfinite(attention_factor) and attention_factor > 0):
        raise RopekitError(f"attention factor must be finite and > 0, got {attention_factor}")


def _same_details(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Dict equality that compares tensor values with `torch.equal` instead of raising."""
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def combined_factors(spec: RopeSpec, factors: tuple[float, ...]) -> tuple[float, ...]:
    """F_i = g_i·f_i: new factors on top of an already-extended spec's existing g (f itself for plain RoPE)."""
    if spec.prior_factors is None:
        return tuple(factors)
    return tuple(g * f for g, f in zip(spec.prior_factors, factors))


@dataclass(frozen=True)
class Plan:
    """A method applied to a geometry for one target length. Build it with `ropekit.make_plan(...)`."""

    method: str
    spec: RopeSpec
    target_length: int  # L' in tokens
    params: dict[str, Any]  # the method's parameters as used (defaults filled in)
    scaling: Scaling
    bins: int = 360  # K, for the disturbance score

    @property
    def scale(self) -> float:
        """s = L' / L."""
        return self.target_length / self.spec.context_length

    @property
    def factors(self) -> tuple[float, ...]:
        return self.scaling.factors

    @property
    def runtime_factors(self) -> tuple[float, ...]:
        """F_i = θ_i / θ'_i relative to the plain base frequencies: what a runtime config carries.

        Equal to `factors` for plain RoPE; for an already-extended spec, its existing g_i × f_i.
        """
        return combined_factors(self.spec, self.factors)

    @property
    def export_original_length(self) -> int:
        """Deprecated: `spec.pretrained_length` (what exports write as `original_max_position_embeddings`)."""
        warnings.warn(
            "Plan.export_original_length is deprecated: use plan.spec.pretrained_length",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.spec.pretrained_length

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.scaling.inv_freq

    @property
    def attention_factor(self) -> float:
        return self.scaling.attention_factor

    @property
    def interpolated_pairs(self) -> list[int]:
        """Pairs whose frequency the method lowers (1 < f_i < ∞; a pair whose rotation is removed is not one)."""
        return [i for i, f in enumerate(self.factors) if 1.0 + 1e-12 < f < ROTATION_REMOVED]

    @property
    def removed_pairs(self) -> list[int]:
        """Pairs whose rotation the method removes (θ'_i = 0); see `ROTATION_REMOVED`."""
        return self.scaling.removed_pairs

    @cached_property
    def pair_disturbance(self) -> torch.Tensor:
        """D_i = KL(P_i ‖ Q_i) per pair (nats, float64); see `ropekit.plan.analysis.disturbance`."""
        from ropekit.plan.analysis.disturbance import pair_disturbance

        precomputed = self.scaling.details.get("pair_disturbance")
        if precomputed is not None:
            return torch.as_tensor(precomputed, dtype=torch.float64)
        return pair_disturbance(self.spec, self.inv_freq, self.target_length, bins=self.bins)

    @property
    def disturbance(self) -> float:
        """Whole-method disturbance in the paper's units: 1000 × mean over pairs of D_i."""
        return 1000.0 * float(self.pair_disturbance.mean())
