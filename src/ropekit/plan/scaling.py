"""What every method returns: per-pair factors, the runtime inv_freq, and an attention factor.

Convention (shared reference): θ'_i = θ_i / f_i, and the attention factor `a` multiplies
both cos and sin, so attention logits scale by a².
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from ropekit.plan.geometry import RopeSpec


@dataclass(frozen=True, eq=False)
class Scaling:
    """The output of one method function.

    `inv_freq` is float32 and computed with the same arithmetic as the runtime that
    implements the method (transformers where it has one), so it can be compared bit for
    bit. `factors` are float64 from the method's closed form.
    """

    inv_freq: torch.Tensor  # θ'_i in rad/token, float32, shape (d/2,)
    factors: tuple[float, ...]  # f_i = θ_i / θ'_i, one per pair
    attention_factor: float = 1.0  # multiplies cos and sin
    details: dict[str, Any] = field(default_factory=dict)  # method-specific diagnostics

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
        return self.target_length / self.spec.original_length

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
        """`original_max_position_embeddings` of the exported block: the pre-scaling length for an extended spec."""
        return self.spec.pretrained_length or self.spec.original_length

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.scaling.inv_freq

    @property
    def attention_factor(self) -> float:
        return self.scaling.attention_factor

    @property
    def interpolated_pairs(self) -> list[int]:
        """Pairs whose frequency the method lowers (f_i > 1)."""
        return [i for i, f in enumerate(self.factors) if f > 1.0 + 1e-12]

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
