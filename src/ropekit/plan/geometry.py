"""RoPE geometry of a model: what every scaling method is a function of.

Conventions (see docs/rope-methods.md in the shared reference):
    rotary_dim d = int(head_dim * partial_rotary_factor)   (as transformers computes it)
    pairs i = 0 … d/2 − 1, rotate-half pairing as in transformers
    inv_freq θ_i = 1 / base**(2i/d)   [rad/token], float32, computed exactly as
        transformers' ``1.0 / (base ** (torch.arange(0, d, 2).float() / d))``
    wavelength λ_i = 2π / θ_i          [tokens]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ropekit.errors import RopekitError, did_you_mean


@dataclass(frozen=True)
class RopeSpec:
    """The RoPE geometry of one attention head.

    >>> spec = RopeSpec(head_dim=128, base=10000.0, original_length=4096)
    >>> spec.rotary_dim, spec.num_pairs
    (128, 64)
    """

    head_dim: int  # channels per attention head
    base: float  # RoPE base (rope_theta), e.g. 10000.0
    original_length: int  # pre-training context length L, in tokens
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated (GPT-NeoX, Phi)
    name: str | None = None  # where it came from: preset name, model path or id
    current_scaling: dict[str, Any] | None = field(default=None, compare=False)  # existing rope block, if any
    # An already-extended model (see `ropekit.plan.trained`): its current frequencies are θ_i / g_i with
    # g = prior_factors, attention factor prior_attention_factor, and `original_length` is the context it
    # runs at with them; `pretrained_length` is the length before that scaling. None: plain RoPE.
    prior_factors: tuple[float, ...] | None = None
    current_inv_freq: tuple[float, ...] | None = None  # float32 values of the current θ_i / g_i, runtime arithmetic
    prior_attention_factor: float = 1.0
    pretrained_length: int | None = None
    layer_type: str | None = None  # per-layer-type RoPE (Gemma 3): which layers' block this is
    length_source: str | None = field(default=None, compare=False)  # why original_length is what it is

    def __post_init__(self) -> None:
        _check_positive_int("head_dim", self.head_dim)
        _check_positive_int("original_length", self.original_length)
        if not _finite(self.base) or self.base <= 1.0:
            raise RopekitError(f"rope base (rope_theta) must be a finite number > 1, got {self.base}")
        prf = self.partial_rotary_factor
        if not _finite(prf) or not 0.0 < prf <= 1.0:
            raise RopekitError(f"partial_rotary_factor must be in (0, 1], got {prf}")
        if prf == 1.0 and self.head_dim % 2:
            raise RopekitError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise RopekitError(
                f"rotary dimension int(head_dim × partial_rotary_factor) = {self.rotary_dim} must be even and ≥ 2"
            )
        for what in ("prior_factors", "current_inv_freq"):
            values = getattr(self, what)
            if values is not None and len(values) != self.num_pairs:
                raise RopekitError(f"{what} has {len(values)} entries; this geometry has {self.num_pairs} pairs")

    @property
    def is_extended(self) -> bool:
        """True when planning starts from an existing scaling (frequencies θ_i / g_i), not plain RoPE."""
        return self.prior_factors is not None

    @property
    def rotary_dim(self) -> int:
        """d = int(head_dim × partial_rotary_factor): channels that rotate."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_pairs(self) -> int:
        """d/2 rotary pairs (frequencies)."""
        return self.rotary_dim // 2

    def inv_freq(self, base: float | None = None) -> torch.Tensor:
        """The frequencies planning starts from, float32, shape (d/2,).

        Plain RoPE: θ_i = 1/b^(2i/d) with transformers' exact arithmetic. An already-extended
        spec: its current frequencies θ_i / g_i. With `base`: plain RoPE at that base.
        """
        if base is None and self.current_inv_freq is not None:
            return torch.tensor(self.current_inv_freq, dtype=torch.float32)
        return self.base_inv_freq(base)

    def base_inv_freq(self, base: float | None = None) -> torch.Tensor:
        """Plain θ_i = 1/b^(2i/d) in float32 (transformers' arithmetic), ignoring any existing scaling."""
        b = self.base if base is None else base
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        return 1.0 / (b**exponent)

    def wavelengths(self) -> torch.Tensor:
        """λ_i = 2π/θ_i in tokens (float64), shape (d/2,)."""
        return 2 * math.pi / self.inv_freq().double()

    def with_base(self, base: float) -> RopeSpec:
        return replace(self, base=float(base))

    def describe(self) -> str:
        prf = f", partial_rotary_factor={self.partial_rotary_factor:g}" if self.partial_rotary_factor < 1 else ""
        layers = f"{self.layer_type} layers: " if self.layer_type else ""
        text = (
            f"{layers}head_dim={self.head_dim}{prf} (rotary_dim={self.rotary_dim}, {self.num_pairs} pairs), "
            f"rope_theta={self.base:g}, original_length={self.original_length}"
        )
        if self.is_extended:
            kind = (self.current_scaling or {}).get("rope_type", "existing")
            text += f" (already extended: its {kind} frequencies, from {self.pretrained_length})"
        return text

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str) -> RopeSpec:
        """Geometry of a well-known model, from its public config (see `PRESETS`)."""
        from ropekit.plan.presets import PRESETS

        key = name.lower()
        if key not in PRESETS:
            raise did_you_mean("preset", name, PRESETS)
        return PRESETS[key].spec

    @classmethod
    def from_config(
        cls, config: Any, *, name: str | None = None, from_scratch: bool = False, layer_type: str | None = None
    ) -> RopeSpec:
        """Geometry from a transformers `PretrainedConfig` (v5 `rope_parameters` or v4 `rope_scaling`).

        See `spec_from_config_dict` for what an existing scaling block means.
        """
        return spec_from_config_dict(config.to_dict(), name=name, from_scratch=from_scratch, layer_type=layer_type)

    @classmethod
    def from_pretrained(cls, path_or_id: str, *, from_scratch: bool = False, layer_type: str | None = None) -> RopeSpec:
        """Geometry from a model directory, a `config.json` path, a `.gguf` file, or a hub id (needs the hub)."""
        if str(path_or_id).lower().endswith(".gguf"):
            return cls.from_gguf(path_or_id)
        return spec_from_config_dict(
            load_config_dict(path_or_id), name=str(path_or_id), from_scratch=from_scratch, layer_type=layer_type
        )

    @classmethod
    def from_gguf(cls, path: str, *, original_length: int | None = None) -> RopeSpec:
        """Geometry from a GGUF file's metadata (see `ropekit.apply.gguf.read_rope`)."""
        from ropekit.apply.gguf import spec_from_gguf

        return spec_from_gguf(path, original_length=original_length)


# ---- config parsing -----------------------------------------------------------------------------


def load_config_dict(path_or_id: str) -> dict[str, Any]:
    """Read a model config as a plain dict: a `config.json` file, a directory holding one, or a hub id."""
    path = Path(path_or_id)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise RopekitError(f"{path_or_id}: no config.json in this directory")
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RopekitError(f"{path}: not a valid JSON config ({exc})") from None
        if not isinstance(data, dict):
            raise RopekitError(f"{path}: a model config must be a JSON object")
        return data
    check_local_source(path_or_id)
    if path.suffix == ".json":
        raise RopekitError(f"{path_or_id}: no such file or directory")
    return _config_dict_from_hub(path_or_id)


def check_local_source(path_or_id: str | Path) -> None:
    """Refuse at once a model path that looks local but does not exist, instead of asking the hub.

    Local-looking: an absolute or ./ path, more than one '/', a backslash, or a first
    component that exists here (`out/s260kk` when `out/` exists). Hub ids are `org/name`.
    """
    text = str(path_or_id)
    if Path(text).exists():
        return
    first = text.replace("\\", "/").split("/")[0]
    looks_local = (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
        or ("/" in text and Path(first).exists())
    )
    if looks_local:
        raise RopekitError(f"{text}: no such file or directory")


def _config_dict_from_hub(model_id: str) -> dict[str, Any]:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id).to_dict()
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RopekitError(f"{model_id}: could not load a config from a path or the hub ({first_line})") from None


def spec_from_config_dict(
    cfg: dict[str, Any], *, name: str | None = None, from_scratch: bool = False, layer_type: str | None = None
) -> RopeSpec:
    """Build a `RopeSpec` from a config dict (transformers v4 or v5 layout; GPT-NeoX `rotary_pct` too).

    A config that already carries a scaling block (linear, yarn, llama3, longrope, dynamic) is
    planned, by default, from what the model runs with now: its current frequencies over the
    context it runs at (`ropekit.plan.trained`). `from_scratch=True` plans from plain RoPE at
    the original length instead (replacing the existing block). Per-layer-type configs (Gemma 3)
    give the block of `layer_type` (default: the full-attention layers).
    """
    cfg = text_config_of(cfg, name)
    blocks = layer_rope_blocks(cfg)
    if blocks is not None:
        layer_type = layer_type or default_layer_type(blocks, name)
        block = blocks.get(layer_type)
        if block is None:
            raise RopekitError(f"{name}: no RoPE block for layer type {layer_type!r}; it has: {', '.join(blocks)}")
        rope = dict(block)
    elif layer_type is not None:
        raise RopekitError(f"{name}: this model has one RoPE block for every layer; --layer-type does not apply")
    else:
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    mrope = rope.get("mrope_section") or rope.get("rope_type") in ("mrope", "3d", "axial")
    if mrope:
        raise RopekitError(f"{name}: multimodal RoPE variant {rope.get('rope_type')!r} is not supported")
    if rope.get("rope_type") == "proportional":
        raise RopekitError(
            f"{name}: 'proportional' RoPE (Gemma 4: exponents over head_dim, unrotated pairs kept) is not supported"
        )
    base = rope.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
    prf = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
    head_dim = cfg.get("head_dim") or _derive_head_dim(cfg, name)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    max_pos = cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("seq_len")
    # transformers gives a top-level original_max_position_embeddings (Phi-3) priority over the block's
    original = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    if rope_type in ("default", None) or original is None:
        original = max_pos
    if original is None:
        raise RopekitError(f"{name}: config has no max_position_embeddings; pass --original-length")
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    current = scaling if rope_type not in ("default", None) else None
    if current is not None and "original_max_position_embeddings" in current:
        current["original_max_position_embeddings"] = original
    plain = RopeSpec(
        head_dim=int(head_dim),
        base=float(base),
        original_length=int(original),
        partial_rotary_factor=float(prf if prf is not None else 1.0),
        name=name,
        current_scaling=current,
        layer_type=layer_type if blocks is not None else None,
        length_source="max_position_embeddings" if current is None else "original_max_position_embeddings",
    )
    if current is None or from_scratch:
        return plain
    from ropekit.plan.trained import extended_spec

    return extended_spec(plain, current, max_positions=int(max_pos) if max_pos else None)


def text_config_of(cfg: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The config dict holding the RoPE keys (a multimodal config's `text_config` when the top has none)."""
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    if text_cfg is not None and not _has_rope(cfg):
        cfg = {**text_cfg, "model_type": text_cfg.get("model_type", cfg.get("model_type"))}
    if not _has_rope(cfg):
        kind = cfg.get("model_type", "this model")
        raise RopekitError(
            f"{name or kind}: config has no RoPE (no rope_theta / rope_parameters); ropekit needs a RoPE model"
        )
    return cfg


def layer_rope_blocks(cfg: dict[str, Any]) -> dict[str, dict[str, Any] | None] | None:
    """Per-layer-type RoPE blocks {layer_type: block}, or None for a model with one block.

    transformers v5 nests `rope_parameters` by layer type (Gemma 3: `sliding_attention`,
    `full_attention`); Gemma 3's v4 form is `rope_theta` + `rope_scaling` for the full-attention
    layers and `rope_local_base_freq` for the sliding ones.
    """
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and rope and all(v is None or isinstance(v, dict) for v in rope.values()):
        return {k: (dict(v) if v is not None else None) for k, v in rope.items()}
    if cfg.get("rope_local_base_freq") is not None:
        full = {
            "rope_type": "default",
            "rope_theta": cfg.get("rope_theta", 1_000_000.0),
            **(cfg.get("rope_scaling") or {}),
        }
        return {
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]},
            "full_attention": full,
        }
    return None


def default_layer_type(blocks: dict[str, Any], name: str | None) -> str:
    """The layer type planned by default: the one that attends over the whole context."""
    if "full_attention" in blocks:
        return "full_attention"
    raise RopekitError(
        f"{name}: per-layer-type RoPE without a 'full_attention' block ({', '.join(blocks)}); pass --layer-type"
    )


def _has_rope(cfg: dict[str, Any]) -> bool:
    keys = ("rope_parameters", "rope_scaling", "rope_theta", "rotary_emb_base", "rotary_pct")
    if any(cfg.get(k) is not None for k in keys):
        return True
    # Llama-family configs may omit rope_theta and rely on the 10000 default.
    return cfg.get("model_type") in _ROPE_MODEL_TYPES


_ROPE_MODEL_TYPES = {
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt_neox",
    "phi",
    "olmo",
    "olmo2",
    "olmo3",
    "gpt_oss",
}


def _derive_head_dim(cfg: dict[str, Any], name: str | None) -> int:
    hidden = cfg.get("hidden_size") or cfg.get("dim") or cfg.get("n_embd")
    heads = cfg.get("num_attention_heads") or cfg.get("n_heads") or cfg.get("n_head")
    if not hidden or not heads:
        raise RopekitError(f"{name}: config gives neither head_dim nor hidden_size/num_attention_heads")
    return int(hidden) // int(heads)


def require_spec(spec: Any, name: str = "spec") -> None:
    """Refuse anything but a RopeSpec where the API expects one (`critical_dimension("x")`)."""
    if not isinstance(spec, RopeSpec):
        raise RopekitError(f"{name} must be a RopeSpec (e.g. RopeSpec.from_preset('llama2-7b')), got {spec!r}")


def _check_positive_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RopekitError(f"{what} must be a positive integer, got {value!r}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
