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

    @property
    def rotary_dim(self) -> int:
        """d = int(head_dim × partial_rotary_factor): channels that rotate."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_pairs(self) -> int:
        """d/2 rotary pairs (frequencies)."""
        return self.rotary_dim // 2

    def inv_freq(self, base: float | None = None) -> torch.Tensor:
        """θ_i = 1/b^(2i/d) in float32, shape (d/2,), with transformers' exact arithmetic."""
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
        return (
            f"head_dim={self.head_dim}{prf} (rotary_dim={self.rotary_dim}, {self.num_pairs} pairs), "
            f"rope_theta={self.base:g}, original_length={self.original_length}"
        )

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
    def from_config(cls, config: Any, *, name: str | None = None) -> RopeSpec:
        """Geometry from a transformers `PretrainedConfig` (v5 `rope_parameters` or v4 `rope_scaling`).

        The original length L is `original_max_position_embeddings` when the config already
        carries a scaling block that records it (llama3, yarn, longrope), else
        `max_position_embeddings`.
        """
        return spec_from_config_dict(config.to_dict(), name=name)

    @classmethod
    def from_pretrained(cls, path_or_id: str) -> RopeSpec:
        """Geometry from a model directory, a `config.json` path, a `.gguf` file, or a hub id (needs the hub)."""
        if str(path_or_id).lower().endswith(".gguf"):
            return cls.from_gguf(path_or_id)
        return spec_from_config_dict(load_config_dict(path_or_id), name=str(path_or_id))

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
    if path_or_id.count("/") > 1 or path_or_id.startswith((".", "/")) or path.suffix == ".json":
        raise RopekitError(f"{path_or_id}: no such file or directory")
    return _config_dict_from_hub(path_or_id)


def _config_dict_from_hub(model_id: str) -> dict[str, Any]:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id).to_dict()
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RopekitError(f"{model_id}: could not load a config from a path or the hub ({first_line})") from None


def spec_from_config_dict(cfg: dict[str, Any], *, name: str | None = None) -> RopeSpec:
    """Build a `RopeSpec` from a config dict (transformers v4 or v5 layout; GPT-NeoX `rotary_pct` too)."""
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
    if text_cfg is not None and not _has_rope(cfg):
        cfg = text_cfg
    if not _has_rope(cfg):
        kind = cfg.get("model_type", "this model")
        raise RopekitError(f"{name or kind}: config has no RoPE (no rope_theta / rope_parameters); ropekit needs a RoPE model")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if rope and all(isinstance(v, dict) for v in rope.values()):
        raise RopekitError(f"{name}: per-layer-type RoPE blocks (e.g. Gemma 3 style) are not supported yet")
    mrope = rope.get("mrope_section") or rope.get("rope_type") in ("mrope", "3d", "axial")
    if mrope:
        raise RopekitError(f"{name}: multimodal RoPE variant {rope.get('rope_type')!r} is not supported")
    base = rope.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
    prf = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
    head_dim = cfg.get("head_dim") or _derive_head_dim(cfg, name)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    max_pos = cfg.get("max_position_embeddings") or cfg.get("n_positions") or cfg.get("seq_len")
    original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if rope_type in ("default", None) or original is None:
        original = max_pos
    if original is None:
        raise RopekitError(f"{name}: config has no max_position_embeddings; pass --original-length")
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    current = scaling if rope_type not in ("default", None) else None
    return RopeSpec(
        head_dim=int(head_dim),
        base=float(base),
        original_length=int(original),
        partial_rotary_factor=float(prf if prf is not None else 1.0),
        name=name,
        current_scaling=current,
    )


def _has_rope(cfg: dict[str, Any]) -> bool:
    keys = ("rope_parameters", "rope_scaling", "rope_theta", "rotary_emb_base", "rotary_pct")
    if any(cfg.get(k) is not None for k in keys):
        return True
    # Llama-family configs may omit rope_theta and rely on the 10000 default.
    return cfg.get("model_type") in _ROPE_MODEL_TYPES


_ROPE_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gpt_neox", "phi", "olmo"}


def _derive_head_dim(cfg: dict[str, Any], name: str | None) -> int:
    hidden = cfg.get("hidden_size") or cfg.get("dim") or cfg.get("n_embd")
    heads = cfg.get("num_attention_heads") or cfg.get("n_heads") or cfg.get("n_head")
    if not hidden or not heads:
        raise RopekitError(f"{name}: config gives neither head_dim nor hidden_size/num_attention_heads")
    return int(hidden) // int(heads)


def _check_positive_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RopekitError(f"{what} must be a positive integer, got {value!r}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
