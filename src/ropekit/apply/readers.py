"""Read a model's RoPE geometry (a `RopeSpec`) from what the model ships.

Sources: a transformers config object, a `config.json` (a file, a directory holding one, or a
hub id), and a GGUF file (`ropekit.apply.gguf`). `ropekit.plan` holds the geometry itself and
imports nothing above it; `RopeSpec.from_config`, `from_pretrained` and `from_gguf` call these
readers, which this module registers with `ropekit.plan.geometry` when ropekit is imported.

`SUPPORTED_MODEL_TYPES` is ropekit's one list of model families: the `model_type` values whose
rotary modules `ropekit.apply_plan` is tested on end to end (tests/apply/test_apply.py,
tests/apply/test_families.py). Other RoPE models are planned and exported; `apply` tells them apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ropekit.apply.gguf import is_gguf_path, spec_from_gguf
from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec, register_readers
from ropekit.plan.trained import extended_spec

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3n_text",
    "gpt_neox",
    "olmo2",
    "olmo3",
    "gpt_oss",
    "cohere2",
    "exaone4",
    "ministral",
    "smollm3",
    "llama4_text",
)
PER_LAYER_TYPE_MODEL_TYPES = ("gemma3_text", "gemma3n_text", "olmo3")  # per-layer-type rotary modules, tested


def spec_from_config(
    config: Any, *, name: str | None = None, from_scratch: bool = False, layer_type: str | None = None
) -> RopeSpec:
    """Geometry from a transformers `PretrainedConfig` (v5 `rope_parameters` or v4 `rope_scaling`).

    See `spec_from_config_dict` for what an existing scaling block means.
    """
    return spec_from_config_dict(config.to_dict(), name=name, from_scratch=from_scratch, layer_type=layer_type)


def spec_from_pretrained(path_or_id: str, *, from_scratch: bool = False, layer_type: str | None = None) -> RopeSpec:
    """Geometry from a model directory, a `config.json` path, a `.gguf` file, or a hub id (needs the hub)."""
    if is_gguf_path(path_or_id):
        if from_scratch or layer_type is not None:
            raise RopekitError(
                f"{path_or_id}: a GGUF is always planned from its RoPE before any scaling it carries; "
                "from_scratch and layer_type apply to transformers models"
            )
        return spec_from_gguf(path_or_id)
    return spec_from_config_dict(
        load_config_dict(path_or_id), name=str(path_or_id), from_scratch=from_scratch, layer_type=layer_type
    )


def load_config_dict(path_or_id: str) -> dict[str, Any]:
    """Read a model config as a plain dict: a `config.json` file, a directory holding one, or a hub id."""
    path = Path(path_or_id)
    if path.exists() and not (path.is_dir() or path.is_file()):
        raise RopekitError(
            f"{path_or_id}: not a model directory, config.json or .gguf file (a device or other special file)"
        )
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
    """A hub model's config: from the local hub cache when the hub cannot be reached (checked in a few
    seconds, instead of the hub client's retries), else downloaded."""
    from transformers import AutoConfig

    offline = not hub_reachable()
    try:
        return AutoConfig.from_pretrained(model_id, local_files_only=offline).to_dict()
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        if offline:
            raise RopekitError(
                f"{model_id}: not a local path, and the Hugging Face hub cannot be reached (no network?) nor is the "
                "model in its local cache; give a model directory, config.json or .gguf file"
            ) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RopekitError(f"{model_id}: could not load a config from a path or the hub ({first_line})") from None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (False when
    HF_HUB_OFFLINE is set)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


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
        head_dim=_whole(head_dim, "head_dim", name),
        base=_number(base, "rope_theta", name),
        context_length=_whole(original, "max_position_embeddings", name),
        partial_rotary_factor=_number(prf if prf is not None else 1.0, "partial_rotary_factor", name),
        name=name,
        current_scaling=current,
        layer_type=layer_type if blocks is not None else None,
        length_source="max_position_embeddings" if current is None else "original_max_position_embeddings",
    )
    if current is None or from_scratch:
        return plain
    return extended_spec(
        plain, current, max_positions=_whole(max_pos, "max_position_embeddings", name) if max_pos else None
    )


def _number(value: Any, key: str, name: str | None) -> float:
    """A config number as float; one line for a string, a list or a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RopekitError(f"{name}: config {key} must be a number, got {value!r}")
    return float(value)


def _whole(value: Any, key: str, name: str | None) -> int:
    """A config count (tokens, channels) as int; 4096.5 is refused, 4096.0 is 4096."""
    number = _number(value, key, name)
    if not number.is_integer():
        raise RopekitError(f"{name}: config {key} must be a whole number, got {value!r}")
    return int(number)


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
    return cfg.get("model_type") in SUPPORTED_MODEL_TYPES


def _derive_head_dim(cfg: dict[str, Any], name: str | None) -> int:
    hidden = cfg.get("hidden_size") or cfg.get("dim") or cfg.get("n_embd")
    heads = cfg.get("num_attention_heads") or cfg.get("n_heads") or cfg.get("n_head")
    if not hidden or not heads:
        raise RopekitError(f"{name}: config gives neither head_dim nor hidden_size/num_attention_heads")
    return int(hidden) // int(heads)


register_readers(
    spec_from_config,
    spec_from_pretrained,
    spec_from_gguf,
    load_config_dict,
    check_local_source,
    spec_from_config_dict,
    text_config_of,
    layer_rope_blocks,
    default_layer_type,
)
