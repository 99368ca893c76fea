"""Extend a saved model: plan, apply (config route), save a directory stock transformers loads.

The output directory holds the weights (save_pretrained), the tokenizer (when the source has
one), a config.json with the `longrope` block and max_position_embeddings = L', and
`ropekit.json` recording the plan. Everything is written to a temporary sibling directory
first, so a failure leaves nothing partial at `out_dir`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ropekit._version import __version__
from ropekit.apply.export import llama_cpp_rope_freqs, vllm_hf_overrides
from ropekit.apply.patch import apply, as_plan_list
from ropekit.apply.readers import (
    check_local_source,
    default_layer_type,
    layer_rope_blocks,
    load_config_dict,
    spec_from_pretrained,
    text_config_of,
)
from ropekit.errors import RopekitError
from ropekit.output import SIGNATURE, OutputTarget, atomic_directory, prepare_output
from ropekit.plan.registry import plan as make_plan
from ropekit.plan.scaling import Plan
from ropekit.plan.summary import plan_summary

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


RECORD = "ropekit.json"
KIND = "extended model"  # the kind of output in its manifest (ropekit.manifest)


def load_model(path_or_id: str, *, dtype: str = "auto") -> PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained with a one-line error for a missing or broken model."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_local_source(path_or_id)
    try:
        return AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype).eval()
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # SafetensorError: truncated or garbled weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RopekitError(f"{path_or_id}: could not load the model ({first})") from None


def load_tokenizer(path_or_id: str) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    check_local_source(path_or_id)
    try:
        return AutoTokenizer.from_pretrained(path_or_id)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan_for_model(
    path_or_id: str,
    target_length: int,
    method: str,
    *,
    from_scratch: bool = False,
    layer_type: str | None = None,
    **params: Any,
) -> Plan:
    """Plan against the geometry in the model's own config (its current frequencies unless `from_scratch`)."""
    spec = spec_from_pretrained(path_or_id, from_scratch=from_scratch, layer_type=layer_type)
    return make_plan(spec, target_length, method, **params)


def plans_for_model(
    path_or_id: str,
    target_length: int,
    method: str,
    *,
    from_scratch: bool = False,
    layer_types: list[str] | None = None,
    **params: Any,
) -> Plan | dict[str, Plan]:
    """One plan, or for a per-layer-type model one per layer type in `layer_types`.

    Default for per-layer-type models: only the full-attention layers (sliding-window layers never
    see a distance beyond their window, so their angles stay in distribution).
    """
    blocks = layer_rope_blocks(text_config_of(load_config_dict(path_or_id), str(path_or_id)))
    if blocks is None:
        if layer_types:
            raise RopekitError(
                f"{path_or_id}: this model has one RoPE block for every layer; --layer-types does not apply"
            )
        return plan_for_model(path_or_id, target_length, method, from_scratch=from_scratch, **params)
    chosen = layer_types or [default_layer_type(blocks, str(path_or_id))]
    return {
        lt: plan_for_model(path_or_id, target_length, method, from_scratch=from_scratch, layer_type=lt, **params)
        for lt in chosen
    }


def extend(
    path_or_id: str,
    out_dir: str | Path,
    *,
    target_length: int,
    method: str = "dprope",
    overwrite: bool = False,
    from_scratch: bool = False,
    layer_types: list[str] | None = None,
    inputs: Iterable[str | Path] = (),
    **params: Any,
) -> Plan | dict[str, Plan]:
    """Write an extended copy of a model to `out_dir`; returns the plan it applied.

    Per-layer-type models (Gemma 3) return {layer_type: plan} for the layer types changed
    (default: only the full-attention layers). `inputs`: other files the plan was read from (a
    factors file), which `out_dir` must not overlap.
    """
    target = prepare_output(  # before the (slow) model load
        out_dir, kind=KIND, overwrite=overwrite, inputs=(path_or_id, *inputs)
    )
    plan = plans_for_model(
        path_or_id, target_length, method, from_scratch=from_scratch, layer_types=layer_types, **params
    )
    model = apply(load_model(path_or_id), plan)
    save_extended(model, plan, target, tokenizer=load_tokenizer(path_or_id), source=str(path_or_id))
    return plan


def extended_record(plan: Plan | dict[str, Plan], *, source: str, **extra: Any) -> dict[str, Any]:
    """The `ropekit.json` of an extended model: source, plan, runtime equivalents, and any extras.

    Per-layer-type plans go under `plans_by_layer_type`; `plan` is then the full-attention one.
    """
    plans = as_plan_list(plan)
    first = plans[0]
    record = {
        **SIGNATURE,
        "ropekit_version": __version__,
        "source_model": source,
        "plan": plan_summary(first),
        "vllm_hf_overrides": vllm_hf_overrides(first),
        "llama_cpp": llama_cpp_rope_freqs(first),
    }
    if first.spec.layer_type is not None:
        record["plans_by_layer_type"] = {str(p.spec.layer_type): plan_summary(p) for p in plans}
    return {**record, **extra}


def save_extended(
    model: PreTrainedModel,
    plan: Plan | dict[str, Plan],
    out_dir: OutputTarget | str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    source: str,
    overwrite: bool = False,
) -> Path:
    """Save an already-patched model, its tokenizer and `ropekit.json` atomically."""
    with atomic_directory(out_dir, overwrite=overwrite, kind=KIND) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(extended_record(plan, source=source), indent=2) + "\n")
    return out_dir.path if isinstance(out_dir, OutputTarget) else Path(out_dir)


def read_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The `ropekit.json` of an extended model directory, if any."""
    path = Path(model_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise RopekitError(f"{path}: not a readable JSON file (ropekit writes it; restore it or remove it)") from None
    if not isinstance(record, dict):
        raise RopekitError(f"{path}: must be a JSON object (ropekit writes it; restore it or remove it)")
    return record
