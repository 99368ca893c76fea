"""GGUF in, GGUF out: read a GGUF's RoPE geometry, and write an extended GGUF that llama.cpp runs.

What llama.cpp reads (source: ggml-org/llama.cpp as vendored by llama-cpp-python 0.3.36):

- `<arch>.rope.dimension_count` n_rot (rotated channels per head), `<arch>.rope.freq_base` b,
  `<arch>.context_length`, `<arch>.rope.scaling.{type,factor,original_context_length,attn_factor}`
  (src/llama-model.cpp, `load_hparams`). A missing scaling type means "linear".
- The tensor `rope_freqs.weight` (F32, n_rot/2 values f_i): pair i rotates at θ_i / f_i, with
  θ_i = b^(−2i/n_rot) (ggml's rope, `freq_factors`). Architectures load it only when their scaling
  type is not `longrope` (src/models/llama.cpp, `load_arch_tensors`); with `longrope` they read
  `rope_factors_long/short.weight` instead, and `llama_model::get_rope_factors` (src/llama-model.cpp)
  prefers `rope_freqs` when both exist. A tensor in the file that the graph does not load makes
  llama.cpp refuse the file ("wrong number of tensors").
- The attention factor: llama.cpp multiplies cos and sin by `cparams.yarn_attn_factor`, which is
  `rope.scaling.attn_factor` times, for YaRN-type scaling only, get_mscale(s)/(1 + 0.1 ln s); ggml's
  YaRN kernel then multiplies by its own 1 + 0.1 ln s (src/llama-context.cpp, constructor). With
  scaling type `none` neither term appears, so `attn_factor` is the plan's a exactly. That is why
  an extended GGUF of an architecture that applies a factor tensor carries type `none`, the plan's
  factors in that tensor (YaRN's ramp is per-pair divisors too), and a in `attn_factor`; the other
  architectures get llama.cpp's native keys (`ropekit.apply.gguf_native`). Which architecture applies
  what is recorded in `ropekit.apply.gguf_archs`.
- Existing scaling composes with a new plan (`GgufRope.spec`), as in a transformers config.

Pair convention: pair i has frequency b^(−2i/n_rot) in llama.cpp and in transformers alike (the
interleaved vs rotate-half layout differs, the frequency order does not), so ropekit's factors
f_i go into `rope_freqs.weight` in order.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ropekit.apply import gguf_record
from ropekit.apply.export import LLAMA_CPP_REMOVED, llama_cpp_divisors, proportional_block
from ropekit.apply.gguf_archs import (
    LONGROPE_TENSORS,
    ROPE_FREQS,
    ArchRope,
    arch_rope,
    support_line,
)
from ropekit.errors import RopekitError
from ropekit.output import resolve_output_path
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.scaling import ROTATION_REMOVED, Plan

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderField, ReaderTensor

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufRope:
    """The RoPE of a GGUF file, as llama.cpp reads it. Lengths in tokens."""

    path: str
    architecture: str  # general.architecture, e.g. "llama"
    head_dim: int  # attention.key_length, else embedding_length / head_count
    rotary_dim: int  # rope.dimension_count (n_rot)
    base: float  # rope.freq_base (llama.cpp's default 10000 when absent)
    context_length: int  # <arch>.context_length
    original_length: int | None  # trained context before any scaling; None when the file does not say
    scaling_type: str  # none, linear, yarn, longrope, or rope_freqs (a per-pair tensor, e.g. Llama 3.1)
    scaling: dict[str, Any] = field(default_factory=dict)  # factor, attn_factor, original_context_length, …
    rope_freqs: tuple[float, ...] | None = None  # values of rope_freqs.weight, if present
    long_factors: tuple[float, ...] | None = None  # rope_factors_long.weight (longrope), if present
    ropekit_method: str | None = None  # set when ropekit wrote the file
    sliding_window: int = 0  # <arch>.attention.sliding_window (0: no sliding-window layers)

    @property
    def removed_pairs(self) -> tuple[int, ...]:
        """Pairs llama.cpp does not rotate: rope_freqs divisors ≥ 1e30 (Gemma 4's proportional RoPE)."""
        return tuple(i for i, f in enumerate(self.rope_freqs or ()) if f == ROTATION_REMOVED)

    @property
    def arch(self) -> ArchRope | None:
        """llama.cpp's record for this architecture (None: ropekit has not read its graph)."""
        return arch_rope(self.architecture)

    @property
    def layer_type(self) -> str | None:
        """ "full_attention" when llama.cpp scales only those layers of this file (Gemma 3), else None."""
        arch = self.arch
        return "full_attention" if arch and arch.layers == "full_attention" and self.sliding_window > 0 else None

    def spec(self, *, original_length: int | None = None, from_scratch: bool = False) -> RopeSpec:
        """The geometry to plan from, as for a transformers config (`ropekit.plan.trained`).

        Plain RoPE: θ over `context_length` (or `rope.scaling.original_context_length`). A file that
        carries scaling (rope_freqs, rope.scaling.*, longrope factors) is planned from its current
        frequencies over its trained context, and a plan composes with them; `from_scratch` plans from
        plain RoPE at the pre-scaling length instead, replacing the scaling. `original_length`
        overrides the length planned from (the trained context; with `from_scratch`, the pre-scaling one).
        """
        from dataclasses import replace

        from ropekit.plan.trained import extended_spec

        block = self._planning_block()
        if block is None or from_scratch:
            length = original_length or self.original_length
            if length is None:
                raise RopekitError(
                    f"{self.path}: carries {self.scaling_type} RoPE scaling but not the context it was trained at "
                    f"before it (no {self.architecture}.rope.scaling.original_context_length); pass "
                    "--original-length L with --from-scratch (the new plan then replaces the existing scaling)"
                )
            return self._plain_spec(int(length))
        prior = int(
            block.get("original_max_position_embeddings") or self.original_length or self.context_length
        )  # yarn's ramp needs it
        spec = extended_spec(self._plain_spec(prior, block), block, max_positions=self.context_length)
        context_key = f"{self.architecture}.context_length"
        spec = replace(spec, length_source=(spec.length_source or "").replace("max_position_embeddings", context_key))
        if original_length:
            spec = replace(spec.with_context_length(int(original_length)), length_source="--original-length")
        return spec

    def _plain_spec(self, length: int, block: dict[str, Any] | None = None) -> RopeSpec:
        spec = RopeSpec(
            head_dim=self.head_dim,
            base=self.base,
            context_length=int(length),
            partial_rotary_factor=self.rotary_dim / self.head_dim,
            name=self.path,
            current_scaling=block or self.current_scaling(),
            layer_type=self.layer_type,
            length_source=f"{self.architecture}.context_length",
            removed_pairs=self.removed_pairs,
        )
        if spec.rotary_dim != self.rotary_dim:
            raise RopekitError(
                f"{self.path}: rope.dimension_count {self.rotary_dim} is not representable "
                f"as a fraction of head_dim {self.head_dim}"
            )
        return spec

    def carried_by(self) -> str:
        """Where the file's scaling lives, in a few words (for messages)."""
        if self.rope_freqs is not None:
            return f"{ROPE_FREQS} ({len(self.rope_freqs)} factors)"
        if self.long_factors is not None:
            return "rope_factors_long/short.weight"
        return f"{self.architecture}.rope.scaling.type {self.scaling_type}"

    def current_scaling(self) -> dict[str, Any] | None:
        """The file's existing scaling as a plain dict (None for plain RoPE)."""
        if self.scaling_type == "none":
            return None
        block: dict[str, Any] = {"rope_type": self.scaling_type, **self.scaling}
        if self.rope_freqs is not None:
            block["factors"] = list(self.rope_freqs)
        return block

    def _planning_block(self) -> dict[str, Any] | None:
        """The file's scaling as a transformers block over every pair, to plan from (None: plain RoPE).

        A removed pair (rope_freqs ≥ 1e30) counts with its nominal divisor 1 here: the spec carries it in
        `removed_pairs`, and a file whose other divisors are all 1 (Gemma 4 as converted) is plain RoPE.
        """
        if not self.removed_pairs:
            return self.transformers_block()
        factors = [1.0 if f == ROTATION_REMOVED else f for f in self.rope_freqs or ()]
        if all(f == 1.0 for f in factors) and float(self.scaling.get("attn_factor", 1.0)) == 1.0:
            return None
        return self._longrope_block(factors)

    def _longrope_block(self, factors: list[float]) -> dict[str, Any]:
        original = self.original_length or self.context_length
        return {
            "rope_type": "longrope",
            "short_factor": list(factors),
            "long_factor": list(factors),
            "factor": self.context_length / original,
            "original_max_position_embeddings": original,
            "attention_factor": float(self.scaling.get("attn_factor", 1.0)),
        }

    def transformers_block(self) -> dict[str, Any] | None:
        """transformers' `rope_parameters` (without rope_theta) that compute what llama.cpp runs for this file.

        - rope_freqs.weight (written by `ropekit extend X.gguf`, or Llama 3.1): `longrope` with short = long =
          the factors and the explicit attention factor `attn_factor` (llama.cpp applies both at every length,
          so original_max_position_embeddings only sets the ratio);
        - rope_factors_long/short.weight (phi3): `longrope` with the long factors, which llama.cpp uses past
          `original_context_length`;
        - rope_freqs with removed pairs (≥ 1e30, Gemma 4): transformers' `proportional` where it expresses the
          file (the tail removed, one divisor for the rest, attn_factor 1), else one clear refusal;
        - linear: transformers' `linear` with the same factor;
        - yarn: transformers' `yarn`; llama.cpp's magnitude is attn_factor × (1 + 0.1 ln s)
          (src/llama-context.cpp:211-214 with ggml's kernel), given to transformers explicitly.
        """
        scaling, kind = self.scaling, self.scaling_type
        attention = float(scaling.get("attn_factor", 1.0))
        if kind == "none":
            return None
        if self.removed_pairs:
            return self._proportional_block()
        if kind in ("rope_freqs", "longrope"):
            return self._longrope_block(list((self.rope_freqs if kind == "rope_freqs" else self.long_factors) or ()))
        factor = float(scaling.get("factor") or 1.0)
        if kind == "linear":
            return {"rope_type": "linear", "factor": factor}
        original = self.original_length or self.context_length  # llama.cpp's n_ctx_orig_yarn default
        block = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original,
            "attention_factor": attention * (1.0 + 0.1 * math.log(factor)),
        }
        for name in ("beta_fast", "beta_slow"):
            if f"yarn_{name}" in scaling:
                block[name] = float(scaling[f"yarn_{name}"])
        return block

    def _proportional_block(self) -> dict[str, Any]:
        """transformers' proportional block for a file with removed pairs, or one clear refusal: the file's own
        frequencies as a plan (method `none` on its spec keeps every pair as the file has it) through
        `ropekit.apply.export.proportional_block`, which holds the rules."""
        from ropekit.plan.registry import plan as make_plan

        spec = self.spec()
        return proportional_block(make_plan(spec, spec.context_length + 1, "none"))


# ---- reading ------------------------------------------------------------------------------------


def is_gguf_path(path_or_id: str | os.PathLike) -> bool:
    """True for a path ending in `.gguf` (the one way ropekit tells a GGUF from a model directory)."""
    return str(path_or_id).lower().endswith(".gguf")


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A `gguf.GGUFReader`, or one clear error for a missing, foreign, truncated or corrupt file."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise RopekitError(f"{path}: no such GGUF file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise RopekitError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - the reader raises ValueError, IndexError, struct/numpy errors
        raise RopekitError(f"{path}: truncated or corrupt GGUF file ({first_line(exc)})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise RopekitError(
                f"{path}: truncated GGUF file (tensor {tensor.name} ends at byte {end:,}, the file has {size:,} bytes)"
            )
    return reader


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as Python data (str, int, float, bool or list), or `default` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise RopekitError(f"{reader.data.filename}: metadata key {key} is unreadable ({first_line(exc)})") from None


def read_rope(path: str | os.PathLike, reader: GGUFReader | None = None) -> GgufRope:
    """The RoPE geometry and existing scaling of a GGUF (see the module docstring for the keys)."""
    reader = reader or open_gguf(path)
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str):
        raise RopekitError(f"{path}: GGUF has no general.architecture")
    key = lambda suffix: f"{arch}.{suffix}"  # noqa: E731
    heads = _scalar(field_value(reader, key("attention.head_count")), path, key("attention.head_count"))
    embd = field_value(reader, key("embedding_length"))
    head_dim = field_value(reader, key("attention.key_length")) or (embd // heads if embd and heads else None)
    context = field_value(reader, key("context_length"))
    if not head_dim or not context:
        raise RopekitError(
            f"{path}: GGUF architecture {arch!r} has no attention heads or context length; "
            "ropekit needs a RoPE transformer"
        )
    rotary_dim = field_value(reader, key("rope.dimension_count")) or head_dim
    scaling, scaling_type = _existing_scaling(reader, arch, path)
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = _rope_freqs(tensors.get(ROPE_FREQS), rotary_dim, path)
    long_factors = _rope_freqs(tensors.get(LONGROPE_TENSORS[0]), rotary_dim, path)
    _check_no_conflict(scaling_type, rope_freqs, [n for n in LONGROPE_TENSORS if n in tensors], path, arch)
    original = scaling.get("original_context_length")
    only_removal = rope_freqs is not None and set(rope_freqs) <= {1.0, ROTATION_REMOVED}  # Gemma 4 as converted
    if scaling_type == "none" and (rope_freqs is None or only_removal) and long_factors is None:
        original = original or context  # no scaling: the file's context is the trained one
    if rope_freqs is not None:
        scaling_type = "rope_freqs"
    elif long_factors is not None:
        scaling_type = "longrope"  # phi3 loads the factor tensors whatever the type says
    return GgufRope(
        path=str(path),
        architecture=arch,
        head_dim=int(head_dim),
        rotary_dim=int(rotary_dim),
        base=float(field_value(reader, key("rope.freq_base"), 10000.0)),
        context_length=int(context),
        original_length=int(original) if original else None,
        scaling_type=scaling_type,
        scaling=scaling,
        rope_freqs=rope_freqs,
        long_factors=long_factors,
        ropekit_method=field_value(reader, "ropekit.method"),
        sliding_window=int(
            _scalar(field_value(reader, key("attention.sliding_window"), 0), path, "sliding_window") or 0
        ),
    )


def _existing_scaling(reader: GGUFReader, arch: str, path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The `<arch>.rope.scaling.*` keys (and the old `rope.scale_linear`) and the effective type."""
    prefix = f"{arch}.rope.scaling."
    scaling = {name[len(prefix) :]: field_value(reader, name) for name in reader.fields if name.startswith(prefix)}
    if f"{arch}.rope.scale_linear" in reader.fields:
        scaling.setdefault("factor", field_value(reader, f"{arch}.rope.scale_linear"))
    kind = scaling.pop("type", None)
    factor = scaling.get("factor") or 0.0
    if kind is None:  # llama.cpp's default type is linear; without a factor it is plain RoPE
        kind = "linear" if factor not in (0.0, 1.0) else "none"
    if kind == "linear" and factor in (0.0, 1.0):
        kind = "none"
    if kind not in ("none", "linear", "yarn", "longrope"):
        raise RopekitError(
            f"{path}: unknown {arch}.rope.scaling.type {kind!r} (llama.cpp knows none, linear, yarn, longrope)"
        )
    return scaling, kind


def _rope_freqs(tensor: ReaderTensor | None, rotary_dim: int, path: str | os.PathLike) -> tuple[float, ...] | None:
    if tensor is None:
        return None
    from gguf import dequantize

    values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)
    if values.size != rotary_dim // 2:
        raise RopekitError(
            f"{path}: {tensor.name} has {values.size} values, but rope.dimension_count "
            f"{rotary_dim} needs {rotary_dim // 2} (one per pair)"
        )
    # llama.cpp's divisor 1e30 (Gemma 4's conversion) stops a pair rotating: read back as ROTATION_REMOVED
    return tuple(ROTATION_REMOVED if v >= LLAMA_CPP_REMOVED else float(v) for v in values)


def _check_no_conflict(
    scaling_type: str,
    rope_freqs: tuple[float, ...] | None,
    longrope_tensors: list[str],
    path: str | os.PathLike,
    arch: str,
) -> None:
    """Refuse combinations llama.cpp would reject or silently run unextended."""
    if rope_freqs is not None and (scaling_type == "longrope" or longrope_tensors):
        raise RopekitError(
            f"{path}: conflicting RoPE scaling: both {ROPE_FREQS} and longrope "
            f"({arch}.rope.scaling.type / rope_factors_long/short); llama.cpp cannot load this file"
        )
    if scaling_type == "longrope" and len(longrope_tensors) < 2:
        raise RopekitError(
            f"{path}: conflicting RoPE scaling: {arch}.rope.scaling.type is longrope but the file "
            "lacks rope_factors_long/short.weight, so llama.cpp runs it unextended (llama.cpp's "
            "converter drops longrope factors); start from the unextended model's GGUF"
        )


def _scalar(value: Any, path: str | os.PathLike, key: str) -> int | None:
    """A per-model count that some GGUFs store per layer: refuse if the layers differ."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise RopekitError(f"{path}: {key} differs between layers ({sorted(set(value))}); not supported")
        return value[0]
    return value


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def spec_from_gguf(
    path: str | os.PathLike, *, original_length: int | None = None, from_scratch: bool = False
) -> RopeSpec:
    """`RopeSpec` of a GGUF file (see `GgufRope.spec`)."""
    return read_rope(path).spec(original_length=original_length, from_scratch=from_scratch)


# ---- writing ------------------------------------------------------------------------------------


def check_architecture(rope: GgufRope) -> ArchRope:
    """llama.cpp's record for the file's architecture, or one clear line when no plan can run there."""
    arch = rope.arch
    if arch is None or arch.refused:
        raise RopekitError(
            f"{rope.path}: llama.cpp architecture {rope.architecture!r}: {support_line(arch, rope.architecture)}"
        )
    return arch


def extended_metadata(rope: GgufRope, plan: Plan) -> tuple[dict[str, Any], set[str], dict[str, np.ndarray]]:
    """What an extended GGUF sets ({key: (value, GGUFValueType)}), the keys it drops, and its factor tensors.

    Every existing `<arch>.rope.scaling.*` key (and `rope.scale_linear`) is dropped so nothing stacks on the
    plan. Per-pair architectures get scaling type `none`, the plan's factors (relative to the base: an
    existing scaling's g_i × the plan's f_i; 1e30 for a pair whose rotation is removed, as llama.cpp's own
    Gemma 4 conversion writes) in their factor tensor(s), and a in `attn_factor`; the others
    get llama.cpp's native keys for the plan (`ropekit.apply.gguf_native`), or a refusal.
    """
    from gguf import GGUFValueType as T

    from ropekit._version import __version__
    from ropekit.apply.gguf_native import native_scaling

    arch, prefix = check_architecture(rope), f"{rope.architecture}.rope.scaling."
    drop = {prefix + k for k in (*rope.scaling, "type")} | {f"{rope.architecture}.rope.scale_linear"}
    tensors: dict[str, np.ndarray] = {}
    if arch.per_pair:
        check_attention_reach(rope, arch, plan.attention_factor)
        scaling: dict[str, Any] = {"type": "none", "attn_factor": float(plan.attention_factor)}
        factors = np.asarray(llama_cpp_divisors(plan), dtype=np.float32)  # llama.cpp divides θ_i by them
        tensors = {name: factors for name in arch.tensors}
    else:
        scaling = native_scaling(rope, arch, plan)
    scaling.setdefault("original_context_length", plan.spec.pretrained_length)
    types = {"type": T.STRING, "original_context_length": T.UINT32}
    sets = {prefix + k: (v, types.get(k, T.FLOAT32)) for k, v in scaling.items()}
    sets[f"{rope.architecture}.context_length"] = (plan.target_length, T.UINT32)  # the context llama.cpp serves
    sets["ropekit.method"] = (plan.method, T.STRING)
    sets["ropekit.version"] = (__version__, T.STRING)
    return sets, drop - set(sets), tensors


def check_attention_reach(rope: GgufRope, arch: ArchRope, attention_factor: float) -> None:
    """Refuse an attention factor ≠ 1 where llama.cpp's graph scales only the full-attention layers' frequencies:
    `rope.scaling.attn_factor` multiplies the sliding-window layers' cos and sin too."""
    if arch.layers == "full_attention" and rope.layer_type and not math.isclose(attention_factor, 1.0, rel_tol=1e-6):
        raise RopekitError(
            f"{rope.path}: llama.cpp's {rope.architecture!r} graph multiplies the sliding-window layers' cos and sin "
            f"by rope.scaling.attn_factor too, so it must stay 1 (this plan needs {attention_factor:.4f}); plan with "
            "attention factor 1 (e.g. yarn --attention-factor 1)"
        )


def check_plan_matches(rope: GgufRope, plan: Plan) -> None:
    """The plan must be made for this file's geometry (head_dim, rotary dim, base)."""
    s = plan.spec
    if (s.head_dim, s.rotary_dim) != (rope.head_dim, rope.rotary_dim) or not np.isclose(s.base, rope.base, rtol=1e-6):
        raise RopekitError(
            f"plan geometry ({s.describe()}) does not match {rope.path} (head_dim={rope.head_dim}, "
            f"rotary_dim={rope.rotary_dim}, rope_theta={rope.base:g})"
        )


def check_extension(rope: GgufRope, plan: Plan) -> tuple[dict[str, Any], set[str], dict[str, np.ndarray]]:
    """`extended_metadata` of `plan` for the file, after one clear line where llama.cpp cannot run the plan
    there (another geometry, the architecture's refusal; removed pairs are refused by architectures without
    rope_freqs and written as 1e30 where it is read). Reads no tensor."""
    check_plan_matches(rope, plan)
    return extended_metadata(rope, plan)


def write_extended_gguf(
    source: str | os.PathLike, plan: Plan, out: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Copy `source` to `out` with the plan: every tensor byte for byte (no requantisation), every key
    unchanged except the RoPE keys of `extended_metadata`, plus the architecture's factor tensor(s) (F32,
    one divisor per pair) where llama.cpp applies one.

    Existing `rope_freqs.weight` and `rope_factors_long/short.weight` are replaced. The file is written
    beside `out` and renamed into place, so a failure leaves nothing at `out`.
    """
    reader = open_gguf(source)
    rope = read_rope(source, reader)
    sets, drop, new_tensors = check_extension(rope, plan)
    out = check_output_file(out, source=source, overwrite=overwrite)
    sets.update(gguf_record.record_keys())  # the file's own manifest: kind, command, hash (ropekit.apply.gguf_record)
    skip_tensors = {ROPE_FREQS, *LONGROPE_TENSORS}

    def write(tmp: Path) -> None:
        _write_gguf(
            reader,
            rope.architecture,
            tmp,
            sets=sets,
            drop=drop,
            new_tensors=new_tensors,
            skip_tensors=skip_tensors,
        )
        gguf_record.seal(tmp)

    _atomic_write(out, write, overwrite=overwrite)
    return out


def check_output_file(out: str | os.PathLike, *, source: str | os.PathLike, overwrite: bool) -> Path:
    """An output GGUF path (a symbolic link resolved): ends in .gguf, is not the source, writable, and does not
    exist, unless `overwrite` and the existing file is an extended GGUF ropekit wrote, unchanged since
    (`ropekit.apply.gguf_record`)."""
    if not isinstance(overwrite, bool):
        raise RopekitError(f"overwrite must be True or False, got {overwrite!r}")
    shown, out = out, resolve_output_path(out)
    if not is_gguf_path(out):
        raise RopekitError(
            f"--out {out}: a GGUF input is written to a GGUF file; give a path ending in .gguf "
            "(for a transformers directory: ropekit convert gguf MODEL.gguf --out DIR)"
        )
    if out.exists() and out.resolve() == Path(source).resolve():
        raise RopekitError(f"--out {out} is the input file; ropekit never writes over its inputs, choose another path")
    if out.is_dir():
        raise RopekitError(f"--out {out} is a directory; give a new .gguf file path")
    if out.exists():
        if not overwrite:
            raise RopekitError(
                f"{shown} already exists; choose another path (or --overwrite to replace an extended GGUF ropekit "
                "wrote there, unchanged)"
            )
        gguf_record.check_replaceable(out, shown)
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir():
        raise RopekitError(f"{parent} is a file, so it cannot hold the output file {shown}")
    if not os.access(parent, os.W_OK):
        raise RopekitError(f"{parent}: directory is not writable")
    return out


def _atomic_write(target: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> None:
    """Write a file beside `target` and move it into place; on error remove the partial file.

    Without `overwrite` the move is a hard link, which fails if `target` appeared meanwhile (a
    concurrent run), so nothing is ever silently replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions a plain open() would
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise RopekitError(
                    f"{target} appeared while ropekit was writing it (another run?); nothing was replaced"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_gguf(
    reader: GGUFReader,
    arch: str,
    path: Path,
    *,
    sets: dict[str, Any],
    drop: set[str],
    new_tensors: dict[str, np.ndarray],
    skip_tensors: set[str],
) -> None:
    """1) copy the keys in order (edited, dropped, appended), 2) new tensors, 3) the rest byte for byte."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch)  # adds general.architecture itself
    alignment = field_value(reader, "general.alignment")
    if alignment:
        writer.data_alignment = int(alignment)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        if name in sets:
            value, vtype = sets[name]
            writer.add_key_value(name, value, vtype)
        else:
            writer.add_key_value(name, *_raw_value(f, path=reader.data.filename or "GGUF"))
    for name, (value, vtype) in sets.items():
        if name not in reader.fields:
            writer.add_key_value(name, value, vtype)
    for name, array in new_tensors.items():
        writer.add_tensor(name, array)
    for tensor in reader.tensors:
        if tensor.name not in skip_tensors:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _raw_value(f: ReaderField, *, path: str | os.PathLike) -> tuple[Any, Any, Any]:
    """(value, type, sub_type) of a reader field, strings kept as raw bytes so they copy exactly."""
    from gguf import GGUFValueType as T

    main = f.types[0]
    if main == T.ARRAY:
        sub = f.types[-1]
        if len(f.types) > 2:
            raise RopekitError(f"{path}: nested array key {f.name} cannot be copied")
        if not f.data:
            raise RopekitError(f"{path}: empty array key {f.name} cannot be copied with the gguf package")
        if sub == T.STRING:
            return [bytes(f.parts[i]) for i in f.data], main, sub
        return [f.parts[i][0] for i in f.data], main, sub
    if main == T.STRING:
        return bytes(f.parts[f.data[0]]), main, None
    return f.parts[f.data[0]][0], main, None


# ---- model card ---------------------------------------------------------------------------------


def gguf_card(path: str | os.PathLike) -> dict[str, Any]:
    """`ropekit inspect X.gguf`: geometry, existing scaling, quantisation, and what llama.cpp can run of a plan."""
    from collections import Counter

    from ropekit.plan.analysis.bounds import critical_dimension, extrapolation_bound

    reader = open_gguf(path)
    rope = read_rope(path, reader)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    card: dict[str, Any] = {
        "format": "gguf",
        "architecture": rope.architecture,
        "tensor_types": ", ".join(f"{n}×{k}" for k, n in types.most_common()),
        "head_dim": rope.head_dim,
        "rotary_dim": rope.rotary_dim,
        "rope_theta": rope.base,
        "context_length": rope.context_length,
        "trained_context": "unknown (pass --original-length to plan)",
        "current_scaling": _scaling_summary(rope),
        "ropekit_plan": rope.ropekit_method or "none",
    }
    if rope.layer_type:
        card["layer_type"] = f"{rope.layer_type} (llama.cpp scales only these; sliding window {rope.sliding_window})"
    try:
        spec: RopeSpec | None = rope.spec()
    except RopekitError:
        spec = None
    if spec is not None:
        crit = critical_dimension(spec)
        card["trained_context"] = spec.context_length
        card["critical_dimension"] = crit
        card["pairs_without_full_turn"] = f"{spec.num_pairs - crit // 2} of {spec.num_pairs} (pairs ≥ {crit // 2})"
        bound = extrapolation_bound(spec)
        card["extrapolation_bound"] = round(bound) if math.isfinite(bound) else "unbounded"
    arch = rope.arch
    card["llama_cpp_plan"] = support_line(arch, rope.architecture)
    runs = arch is not None and not arch.refused
    method = "dprope" if arch is not None and arch.per_pair else "yarn"
    target = 2 * spec.context_length if spec is not None and spec.is_extended else 4 * rope.context_length
    card["next"] = (
        f"ropekit plan --model {path} --target-length {target}; "
        + (f"ropekit extend {path} --method {method} --target-length {target} --out EXTENDED.gguf; " if runs else "")
        + f"ropekit convert gguf {path} --out DIR"
    )
    return card


def _scaling_summary(rope: GgufRope) -> str:
    if rope.scaling_type == "none":
        return "none"
    keys = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in rope.scaling.items())
    if rope.rope_freqs is not None:
        f = rope.rope_freqs
        keys = f"{ROPE_FREQS}: {len(f)} factors in [{min(f):g}, {max(f):g}]" + (f"; {keys}" if keys else "")
    return f"{rope.scaling_type} ({keys})" if keys else rope.scaling_type


# ---- extend -------------------------------------------------------------------------------------


def extend_gguf(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    target_length: int,
    method: str = "dprope",
    overwrite: bool = False,
    original_length: int | None = None,
    from_scratch: bool = False,
    **params: Any,
) -> Plan:
    """Plan against the GGUF's own geometry and write the extended GGUF (`write_extended_gguf`); returns the plan.

    Scaling the file already carries composes with the plan, as for a transformers directory: the plan
    starts from the file's current frequencies over its trained context (`GgufRope.spec`), and the file
    gets the product. `from_scratch=True` plans from plain RoPE at the pre-scaling length instead
    (`rope.scaling.original_context_length`, or `original_length`), replacing the existing scaling.
    """
    from ropekit.plan.registry import plan as make_plan

    rope = read_rope(source)
    check_architecture(rope)  # before planning: one clear line, nothing written
    out = check_output_file(out, source=source, overwrite=overwrite)
    spec = rope.spec(original_length=original_length, from_scratch=from_scratch)
    plan = make_plan(spec, target_length, method, **params)
    write_extended_gguf(source, plan, out, overwrite=overwrite)
    return plan
