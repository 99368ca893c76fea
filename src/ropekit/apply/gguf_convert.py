"""GGUF → transformers directory: dequantised weights, tokenizer, chat template, and the RoPE plan.

transformers can load a GGUF itself (`from_pretrained(dir, gguf_file=...)`), but the model it
returns is marked as quantised and refuses `save_pretrained`, and it ignores the file's RoPE
scaling (`rope_freqs.weight`, `rope.scaling.*`) for Llama-family models. `convert_gguf` uses the
same public building blocks instead: `load_gguf_checkpoint` for the config and the dequantised,
renamed tensors (it undoes llama.cpp's Q/K row permutation), and `AutoTokenizer.from_pretrained(
..., gguf_file=...)` for the tokenizer and chat template. It then builds a plain model from the
config, loads the tensors, writes the file's RoPE scaling into the config (`rope_scaling_block`),
and saves everything with `save_pretrained` into a new directory (temp sibling + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ropekit.apply.gguf import GgufRope, first_line, open_gguf, read_rope
from ropekit.errors import RopekitError
from ropekit.output import atomic_directory, prepare_output
from ropekit.paths import cache_root, describe_size

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

RECORD = "ropekit.json"


def rope_scaling_block(rope: GgufRope) -> dict[str, Any] | None:
    """transformers' `rope_parameters` (without rope_theta) that reproduce llama.cpp's RoPE for this file
    (`GgufRope.transformers_block`)."""
    return rope.transformers_block()


def gguf_config(path: str | os.PathLike, rope: GgufRope) -> PretrainedConfig:
    """A transformers config from the GGUF metadata (transformers' own mapping) plus its RoPE scaling."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    except (ValueError, KeyError, ImportError) as exc:
        raise RopekitError(f"{path}: transformers cannot read this GGUF ({first_line(exc)})") from None
    parsed.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(parsed.pop("model_type"), **parsed)
    block = rope_scaling_block(rope)
    if block is not None:
        block = {"rope_theta": rope.base, **block}
        if rope.layer_type is not None:  # per-layer-type RoPE (Gemma 3): llama.cpp scales only these layers
            config.rope_parameters = {**config.rope_parameters, rope.layer_type: block}
        else:
            config.rope_parameters = block
        config.max_position_embeddings = rope.context_length
    return config


def load_gguf_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A plain (not quantised) transformers model with the GGUF's dequantised weights, in float32."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    rope = read_rope(path, open_gguf(path))
    config = gguf_config(path, rope)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    except (ValueError, KeyError, NotImplementedError) as exc:  # e.g. a quantisation gguf cannot dequantise
        raise RopekitError(f"{path}: cannot dequantise this GGUF's tensors ({first_line(exc)})") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RopekitError(
            f"{path}: GGUF tensors do not fit the {config.model_type} model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def load_gguf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """The GGUF's tokenizer (with its chat template) through transformers, or None when it has none."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a transformers model directory from a GGUF: `AutoModelForCausalLM.from_pretrained(out_dir)`
    loads it with stock transformers. Weights are dequantised to float32; `ropekit.json` records the source."""
    target = prepare_output(
        Path(out_dir), kind="converted model", overwrite=overwrite, inputs=(Path(path),)
    )  # before the slow dequantisation
    rope = read_rope(path)
    model = load_gguf_model(path)
    tokenizer = load_gguf_tokenizer(path)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {
            "source_gguf": str(path),
            "architecture": rope.architecture,
            "rope_scaling": rope.scaling_type,
            "ropekit_method": rope.ropekit_method,
            "tokenizer": tokenizer is not None,
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return target.path


def converted_dir(path: str | os.PathLike, *, progress: Callable[[str], Any] | None = None) -> Path:
    """The transformers directory for a GGUF, converted once into the cache (keyed by path, size and mtime)."""
    path = Path(path)
    rope = read_rope(path)  # one clear line for a bad file before anything is written
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{path.stem}-{key}"
    if not (target / "config.json").is_file():
        if progress:
            progress(f"converting {path} ({rope.architecture}) into ropekit's cache, {target}")
        convert_gguf(path, target, overwrite=True)
        if progress:
            size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
            progress(f"the conversion takes {describe_size(size)} of cache (`ropekit cache --clear` frees it)")
    return target
