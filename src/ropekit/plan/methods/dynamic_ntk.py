"""Dynamic NTK (emozilla): NTK base change recomputed for the current length ℓ; a = 1.

b' = b·((s·ℓ/L) − (s−1))^(d/(d−2)) with ℓ = max(length, L). Matches transformers'
`_compute_dynamic_ntk_parameters` with `max_position_embeddings = L` and `factor = s`
(note: transformers reads L from `max_position_embeddings`, so a native `dynamic` export
keeps `max_position_embeddings` at L).
"""

from __future__ import annotations

from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods._common import LENGTH, SCALE, base_change_factors, require_finite_positive
from ropekit.plan.methods.record import Method, NativeForm, Param, renamed_keywords
from ropekit.plan.scaling import Plan, Scaling


def dynamic_ntk_base(spec: RopeSpec, factor: float, length: int) -> float:
    d, L = spec.rotary_dim, spec.context_length
    seq_len = max(length, L)
    return spec.base * ((factor * seq_len / L) - (factor - 1)) ** (d / (d - 2))


@renamed_keywords(factor="scale")
def dynamic_ntk(
    spec: RopeSpec, target_length: int, *, scale: float | None = None, at_length: int | None = None
) -> Scaling:
    """Frequencies dynamic NTK uses when the sequence is `at_length` tokens long (default L').

    `scale` is s, default L'/L. At ℓ ≤ L the frequencies are the original ones.
    """
    s = target_length / spec.context_length if scale is None else scale
    require_finite_positive("scale", s)
    length = target_length if at_length is None else at_length
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise RopekitError(f"at_length must be a positive integer, got {length!r}")
    if spec.rotary_dim == 2:
        raise RopekitError("dynamic NTK needs a rotary dimension > 2 (its exponent is d/(d−2))")
    new_base = dynamic_ntk_base(spec, s, length)
    return Scaling(
        inv_freq=spec.inv_freq(new_base),
        factors=base_change_factors(spec, new_base),
        details={"new_base": new_base, "at_length": length, "scale": s},
    )


def native_block(plan: Plan) -> dict:
    """transformers' `dynamic` block (it reads L from max_position_embeddings, see the export)."""
    return {"rope_type": "dynamic", "factor": plan.params.get("scale") or plan.scale}


METHOD = Method(
    "dynamic-ntk",
    dynamic_ntk,
    "NTK base recomputed for the current length",
    "emozilla 2023",
    params=(
        Param("scale", float, "the scale s: s of the base formula", default="L'/L", flag=None, domain=SCALE),
        Param(
            "at_length",
            int,
            "sequence length to evaluate at; at or below L the frequencies are the original ones (no scaling), "
            "as transformers' dynamic rope_type does",
            default="L'",
            unit="tokens",
            domain=LENGTH,
        ),
    ),
    aliases=("dynamic",),
    native=NativeForm("dynamic", native_block),
)
