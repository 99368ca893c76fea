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
  an extended GGUF carries type `none`, the plan's factors in `rope_freqs.weight` (YaRN's ramp is
  per-pair divisors too), and a in `attn_factor`.

Pair convention: pair i has frequency b^(−2i/n_rot) in llama.cpp and in transformers alike (the
interleaved vs rotate-half layout differs, the frequency order does not), so ropekit's factors
f_i go into `rope_freqs.weight` in order.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ropekit.apply import gguf_record
from ropekit.apply.export import require_rotation
from ropekit.errors import RopekitError
from ropekit.output import resolve_output_path
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.scaling import Plan

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderField, ReaderTensor

GGUF_MAGIC = b"GGUF"
ROPE_FREQS = "rope_freqs.weight"
LONGROPE_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")

# Architectures whose llama.cpp graph loads `rope_freqs.weight` (unless the type is longrope) and passes
# `model.get_rope_factors(...)` to ggml_rope_ext for Q and K on every layer: src/models/{llama,deci,
# mistral3,arcee,exaone,exaone4,granite,apertus,nanbeige}.cpp. Tested in llama.cpp itself: llama.
ROPE_FREQS_ARCHITECTURES = ("llama", "deci", "mistral3", "arcee", "exaone", "exaone4", "granite", "apertus", "nanbeige")


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
    ropekit_method: str | None = None  # set when ropekit wrote the file

    def spec(self, *, original_length: int | None = None) -> RopeSpec:
        """The geometry to plan from: the trained length before any scaling the file carries."""
        length = original_length or self.original_length
        if length is None:
            raise RopekitError(
                f"{self.path}: carries {self.scaling_type} RoPE scaling but not the context it was trained at "
                f"(no {self.architecture}.rope.scaling.original_context_length); pass --original-length L "
                "(the new plan then replaces the existing scaling)"
            )
        spec = RopeSpec(
            head_dim=self.head_dim,
            base=self.base,
            context_length=int(length),
            partial_rotary_factor=self.rotary_dim / self.head_dim,
            name=self.path,
            current_scaling=self.current_scaling(),
        )
        if spec.rotary_dim != self.rotary_dim:
            raise RopekitError(
                f"{self.path}: rope.dimension_count {self.rotary_dim} is not representable "
                f"as a fraction of head_dim {self.head_dim}"
            )
        return spec

    def current_scaling(self) -> dict[str, Any] | None:
        """The file's existing scaling as a plain dict (None for plain RoPE)."""
        if self.scaling_type == "none":
            return None
        block: dict[str, Any] = {"rope_type": self.scaling_type, **self.scaling}
        if self.rope_freqs is not None:
            block["factors"] = list(self.rope_freqs)
        return block


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
    _check_no_conflict(scaling_type, rope_freqs, [n for n in LONGROPE_TENSORS if n in tensors], path, arch)
    if rope_freqs is not None:
        scaling_type = "rope_freqs"
    original = scaling.get("original_context_length")
    if scaling_type == "none":
        original = original or context
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
        ropekit_method=field_value(reader, "ropekit.method"),
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
            f"{path}: {ROPE_FREQS} has {values.size} values, but rope.dimension_count "
            f"{rotary_dim} needs {rotary_dim // 2} (one per pair)"
        )
    return tuple(float(v) for v in values)


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


def spec_from_gguf(path: str | os.PathLike, *, original_length: int | None = None) -> RopeSpec:
    """`RopeSpec` of a GGUF file (see `GgufRope.spec`)."""
    return read_rope(path).spec(original_length=original_length)


# ---- writing ------------------------------------------------------------------------------------


def check_rope_freqs_support(rope: GgufRope) -> None:
    """Refuse architectures whose llama.cpp graph ignores `rope_freqs.weight`."""
    if rope.architecture not in ROPE_FREQS_ARCHITECTURES:
        raise RopekitError(
            f"{rope.path}: llama.cpp's {rope.architecture!r} graph ignores rope_freqs, so an extended "
            f"GGUF would run unextended; supported architectures: {', '.join(ROPE_FREQS_ARCHITECTURES)}"
        )


def extended_metadata(rope: GgufRope, plan: Plan) -> tuple[dict[str, Any], set[str]]:
    """The keys an extended GGUF sets ({key: (value, GGUFValueType)}) and the keys it drops.

    Every existing `<arch>.rope.scaling.*` key (and `rope.scale_linear`) is dropped so nothing
    stacks on the plan; the plan is then written as type `none` + `rope_freqs.weight` + `attn_factor`.
    """
    from gguf import GGUFValueType as T

    from ropekit._version import __version__

    arch = rope.architecture
    drop = {f"{arch}.rope.scaling.{k}" for k in (*rope.scaling, "type")} | {f"{arch}.rope.scale_linear"}
    sets = {
        f"{arch}.context_length": (plan.target_length, T.UINT32),
        f"{arch}.rope.scaling.type": ("none", T.STRING),
        f"{arch}.rope.scaling.original_context_length": (plan.spec.pretrained_length, T.UINT32),
        f"{arch}.rope.scaling.attn_factor": (float(plan.attention_factor), T.FLOAT32),
        "ropekit.method": (plan.method, T.STRING),
        "ropekit.version": (__version__, T.STRING),
    }
    return sets, drop - set(sets)


def check_plan_matches(rope: GgufRope, plan: Plan) -> None:
    """The plan must be made for this file's geometry (head_dim, rotary dim, base)."""
    s = plan.spec
    if (s.head_dim, s.rotary_dim) != (rope.head_dim, rope.rotary_dim) or not np.isclose(s.base, rope.base, rtol=1e-6):
        raise RopekitError(
            f"plan geometry ({s.describe()}) does not match {rope.path} (head_dim={rope.head_dim}, "
            f"rotary_dim={rope.rotary_dim}, rope_theta={rope.base:g})"
        )


def write_extended_gguf(
    source: str | os.PathLike, plan: Plan, out: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Copy `source` to `out` with the plan: every tensor byte for byte (no requantisation), every key
    unchanged except the RoPE keys of `extended_metadata`, plus `rope_freqs.weight` (F32, f_i per pair).

    Existing `rope_freqs.weight` and `rope_factors_long/short.weight` are replaced. The file is written
    beside `out` and renamed into place, so a failure leaves nothing at `out`.
    """
    require_rotation(plan, "llama.cpp's rope_freqs tensor")
    reader = open_gguf(source)
    rope = read_rope(source, reader)
    check_rope_freqs_support(rope)
    check_plan_matches(rope, plan)
    out = check_output_file(out, source=source, overwrite=overwrite)
    sets, drop = extended_metadata(rope, plan)
    sets.update(gguf_record.record_keys())  # the file's own manifest: kind, command, hash (ropekit.apply.gguf_record)
    factors = np.asarray(plan.runtime_factors, dtype=np.float32)  # relative to the base, as llama.cpp divides θ_i
    skip_tensors = {ROPE_FREQS, *LONGROPE_TENSORS}

    def write(tmp: Path) -> None:
        _write_gguf(
            reader,
            rope.architecture,
            tmp,
            sets=sets,
            drop=drop,
            new_tensors={ROPE_FREQS: factors},
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
    """`ropekit inspect X.gguf`: geometry, existing scaling, quantisation, and whether llama.cpp can take a plan."""
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
        "trained_context": rope.original_length or "unknown (pass --original-length to plan)",
        "current_scaling": _scaling_summary(rope),
        "ropekit_plan": rope.ropekit_method or "none",
    }
    if rope.original_length:
        spec = rope.spec()
        crit = critical_dimension(spec)
        card["critical_dimension"] = crit
        card["pairs_without_full_turn"] = f"{spec.num_pairs - crit // 2} of {spec.num_pairs} (pairs ≥ {crit // 2})"
        card["extrapolation_bound"] = round(extrapolation_bound(spec))
    supported = rope.architecture in ROPE_FREQS_ARCHITECTURES
    card["llama_cpp_plan"] = (
        "supported (rope_freqs.weight)"
        if supported
        else f"not supported: llama.cpp's {rope.architecture!r} graph ignores rope_freqs"
    )
    target = 4 * (rope.original_length or rope.context_length)
    card["next"] = (
        f"ropekit plan --model {path} --target-length {target}; "
        + (f"ropekit extend {path} --method dprope --target-length {target} --out EXTENDED.gguf; " if supported else "")
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
    **params: Any,
) -> Plan:
    """Plan against the GGUF's own geometry and write the extended GGUF (`write_extended_gguf`); returns the plan.

    Any scaling the file already carries is replaced, not stacked: the plan starts from the trained
    length before it (`rope.scaling.original_context_length`, or `original_length` when the file
    does not say).
    """
    from ropekit.plan.registry import plan as make_plan

    rope = read_rope(source)
    check_rope_freqs_support(rope)  # before planning: one clear line, nothing written
    out = check_output_file(out, source=source, overwrite=overwrite)
    plan = make_plan(rope.spec(original_length=original_length), target_length, method, **params)
    write_extended_gguf(source, plan, out, overwrite=overwrite)
    return plan
