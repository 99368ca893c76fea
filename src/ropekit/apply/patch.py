"""Make a loaded transformers model use a plan.

Two routes, both ending with every rotary module's `inv_freq` and `attention_scaling` equal
to the plan's:
  * "config" (default): write the plan into `model.config` as a `longrope` block (per-pair
    factors, explicit attention factor, max_position_embeddings = L') and rebuild each rotary
    module from it. The model then saves with `save_pretrained` and reloads in stock
    transformers with the same frequencies.
  * "inv_freq": overwrite the rotary modules' buffers directly and switch off their dynamic
    updates. For modules or methods a config cannot express; the config is left as it was,
    so a saved model will not carry the plan.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from ropekit.apply import readers
from ropekit.apply.export import rope_block_of, transformers_config
from ropekit.apply.readers import PER_LAYER_TYPE_MODEL_TYPES, spec_from_config
from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.registry import METHODS
from ropekit.plan.scaling import Plan

if TYPE_CHECKING:
    from transformers import PreTrainedModel


ROUTES = ("config", "inv_freq")
_MOVED = {  # old name here → the one list of model types in ropekit.apply.readers
    "SUPPORTED_FAMILIES": "SUPPORTED_MODEL_TYPES",
    "PER_LAYER_TYPE_FAMILIES": "PER_LAYER_TYPE_MODEL_TYPES",
}


def __getattr__(name: str) -> Any:
    """`SUPPORTED_FAMILIES` and `PER_LAYER_TYPE_FAMILIES` still import from here, with a DeprecationWarning."""
    if name in _MOVED:
        warnings.warn(
            f"ropekit.apply.patch.{name} is deprecated: use ropekit.apply.readers.{_MOVED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(readers, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


GEOMETRY_KEYS = ("partial_rotary_factor",)  # keys of the model's own rope block that a plan keeps


def rotary_modules(
    model: torch.nn.Module, layer_type: str | None = None
) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute name, module) for every rotary-embedding module holding the frequency buffer.

    The buffer is `inv_freq`, or `<layer_type>_inv_freq` in per-layer-type modules (Gemma 3, OLMo 3).
    """
    buffer = buffer_name(layer_type)
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding") and isinstance(
                getattr(child, buffer, None), torch.Tensor
            ):
                found.append((parent, name, child))
    return found


def buffer_name(layer_type: str | None, what: str = "inv_freq") -> str:
    return what if layer_type is None else f"{layer_type}_{what}"


def model_spec(model: torch.nn.Module, *, from_scratch: bool = False, layer_type: str | None = None) -> RopeSpec:
    """The RoPE geometry a loaded model was built with (refuses models without RoPE)."""
    config = getattr(model, "config", None)
    if config is None:
        raise RopekitError(
            f"{type(model).__name__} has no transformers config; ropekit applies plans to transformers models"
        )
    name = getattr(config, "_name_or_path", None) or config.model_type
    return spec_from_config(config, name=name, from_scratch=from_scratch, layer_type=layer_type)


def check_plan_fits(model_geometry: RopeSpec, plan: Plan) -> None:
    """Refuse a plan made for another geometry, naming the difference."""
    planned = plan.spec
    for what, got, want in [
        ("head_dim", model_geometry.head_dim, planned.head_dim),
        ("rotary_dim", model_geometry.rotary_dim, planned.rotary_dim),
        ("original length", model_geometry.context_length, planned.context_length),
    ]:
        if got != want:
            raise RopekitError(
                f"plan was made for {what} {want}, but the model has {what} {got}; re-plan for this model"
            )
    if not math.isclose(model_geometry.base, planned.base, rel_tol=1e-12):
        raise RopekitError(f"plan was made for rope_theta {planned.base:g}, but the model has {model_geometry.base:g}")
    if not _same_factors(model_geometry.prior_factors, planned.prior_factors):
        raise RopekitError("plan was made for other existing scaling factors than the model's; re-plan for this model")


def _same_factors(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a, b))


def apply(
    model: PreTrainedModel, plan: Plan | Mapping[str, Plan] | Iterable[Plan], *, route: str = "config"
) -> PreTrainedModel:
    """Make `model` use `plan` (in place; returns the model). See the module docstring for routes.

    Per-layer-type models (Gemma 3) take one plan per layer type to change (a mapping or a list;
    each plan's `spec.layer_type` names its layers); the other layer types keep their RoPE.
    """
    if route not in ROUTES:
        raise RopekitError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise RopekitError(f"apply_plan takes a loaded transformers model (e.g. AutoModelForCausalLM), got {model!r}")
    plans = as_plan_list(plan)
    check_family(model, plans)
    for p in plans:
        layer_type = p.spec.layer_type
        check_plan_fits(model_spec(model, from_scratch=not p.spec.is_extended, layer_type=layer_type), p)
        if not rotary_modules(model, layer_type):
            raise RopekitError(
                f"{type(model).__name__} has no rotary-embedding module with a {buffer_name(layer_type)} buffer"
            )
    if route == "config":
        _apply_config(model, plans)
    else:
        for p in plans:
            _apply_inv_freq(p, rotary_modules(model, p.spec.layer_type))
    for p in plans:
        method = METHODS.get(p.method)
        exact = route == "inv_freq" or (method is not None and method.exact_inv_freq) or p.spec.is_extended
        _verify(p, rotary_modules(model, p.spec.layer_type), exact=exact)
    return model


def check_family(model: torch.nn.Module, plans: list[Plan]) -> None:
    """Refuse what ropekit cannot patch exactly: multimodal wrappers, untested per-layer-type modules."""
    config: Any = model.config  # a transformers PretrainedConfig
    if getattr(config, "text_config", None) is not None and not getattr(config, "rope_parameters", None):
        raise RopekitError(
            f"{config.model_type} is a multimodal wrapper; apply the plan to its language model "
            "(e.g. model.model.language_model), whose config holds the RoPE block"
        )
    per_layer = any(p.spec.layer_type is not None for p in plans)
    if per_layer and config.model_type not in PER_LAYER_TYPE_MODEL_TYPES:
        raise RopekitError(
            f"per-layer-type RoPE of {config.model_type!r} models is not tested by ropekit "
            f"(tested: {', '.join(PER_LAYER_TYPE_MODEL_TYPES)})"
        )


def as_plan_list(plan: Plan | Mapping[str, Plan] | Iterable[Plan]) -> list[Plan]:
    """One plan, a {layer_type: plan} mapping, or a list of plans, as a list (one target length, distinct layers)."""
    iterable = isinstance(plan, (Mapping, list, tuple))
    plans = (
        [plan]
        if isinstance(plan, Plan)
        else list(plan.values() if isinstance(plan, Mapping) else plan)
        if iterable
        else []
    )
    if not (isinstance(plan, Plan) or iterable) or not all(isinstance(p, Plan) for p in plans):
        raise RopekitError(
            f"expected a Plan (ropekit.make_plan(spec, target_length, method)), a {{layer_type: Plan}} mapping or a "
            f"list of plans, got {plan!r}"
        )
    if not plans:
        raise RopekitError("no plan to apply")
    if len({p.target_length for p in plans}) > 1:
        raise RopekitError("plans for different layer types must share one target length")
    layer_types = [p.spec.layer_type for p in plans]
    if len(set(layer_types)) != len(layer_types):
        raise RopekitError(f"two plans for the same layers ({layer_types}); give one plan per layer type")
    return plans


def _apply_config(model: PreTrainedModel, plans: list[Plan]) -> None:
    config = model.config
    old_modules = {
        id(m): (parent, name, m) for p in plans for parent, name, m in rotary_modules(model, p.spec.layer_type)
    }
    for p in plans:
        keys = transformers_config(p)
        block = rope_block_of(keys, p)
        layer_type = p.spec.layer_type
        current = (config.rope_parameters or {}) if layer_type is None else (config.rope_parameters[layer_type] or {})
        kept = {k: v for k, v in current.items() if k in GEOMETRY_KEYS}  # e.g. Phi-3 requires partial_rotary_factor
        if layer_type is None:
            config.rope_parameters = {**kept, **block}
        else:
            config.rope_parameters = {**config.rope_parameters, layer_type: {**kept, **block}}
        config.max_position_embeddings = keys["max_position_embeddings"]
        if getattr(config, "original_max_position_embeddings", None) is not None:
            config.original_max_position_embeddings = block[
                "original_max_position_embeddings"
            ]  # Phi-3 reads this first
    for parent, name, old in old_modules.values():
        device = next(iter(old.buffers())).device
        setattr(parent, name, type(old)(config=config).to(device))


def _apply_inv_freq(plan: Plan, modules: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    layer_type = plan.spec.layer_type
    for _, _, rotary in modules:
        module: Any = rotary  # a transformers rotary-embedding module (rope_type, buffers per layer type)
        target = getattr(module, buffer_name(layer_type))
        inv_freq = plan.inv_freq.to(device=target.device, dtype=target.dtype)
        target.copy_(inv_freq)
        original = getattr(module, buffer_name(layer_type, "original_inv_freq"), None)
        if isinstance(original, torch.Tensor):
            original.copy_(inv_freq)
        setattr(module, buffer_name(layer_type, "attention_scaling"), plan.attention_factor)
        if layer_type is None:
            module.rope_type = "default"  # no dynamic or longrope switching on top of the plan
        else:
            module.rope_type[layer_type] = "default"


def _verify(plan: Plan, modules: list[tuple[torch.nn.Module, str, torch.nn.Module]], *, exact: bool) -> None:
    layer_type = plan.spec.layer_type
    for _, _, module in modules:
        got = getattr(module, buffer_name(layer_type)).detach().float().cpu()
        scaling = float(getattr(module, buffer_name(layer_type, "attention_scaling")))
        same = torch.equal(got, plan.inv_freq) if exact else torch.allclose(got, plan.inv_freq, rtol=3e-7, atol=0)
        if not same or not math.isclose(scaling, plan.attention_factor, rel_tol=1e-9):
            raise RopekitError(
                f"{type(module).__name__} did not take the plan (its family may not support per-pair factors); "
                "try route='inv_freq'"
            )
