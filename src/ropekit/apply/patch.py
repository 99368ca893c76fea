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

import torch

from ropekit.apply.export import transformers_config
from ropekit.errors import RopekitError
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.scaling import Plan

ROUTES = ("config", "inv_freq")
GEOMETRY_KEYS = ("partial_rotary_factor",)  # keys of the model's own rope block that a plan keeps
SUPPORTED_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gpt_neox")


def rotary_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute name, module) for every rotary-embedding module holding an `inv_freq` buffer."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding") and isinstance(getattr(child, "inv_freq", None), torch.Tensor):
                found.append((parent, name, child))
    return found


def model_spec(model: torch.nn.Module) -> RopeSpec:
    """The RoPE geometry a loaded model was built with (refuses models without RoPE)."""
    config = getattr(model, "config", None)
    if config is None:
        raise RopekitError(f"{type(model).__name__} has no transformers config; ropekit applies plans to transformers models")
    return RopeSpec.from_config(config, name=getattr(config, "_name_or_path", None) or config.model_type)


def check_plan_fits(model_geometry: RopeSpec, plan: Plan) -> None:
    """Refuse a plan made for another geometry, naming the difference."""
    planned = plan.spec
    for what, got, want in [
        ("head_dim", model_geometry.head_dim, planned.head_dim),
        ("rotary_dim", model_geometry.rotary_dim, planned.rotary_dim),
        ("original length", model_geometry.original_length, planned.original_length),
    ]:
        if got != want:
            raise RopekitError(f"plan was made for {what} {want}, but the model has {what} {got}; re-plan for this model")
    if not math.isclose(model_geometry.base, planned.base, rel_tol=1e-12):
        raise RopekitError(f"plan was made for rope_theta {planned.base:g}, but the model has {model_geometry.base:g}")


def apply(model: torch.nn.Module, plan: Plan, *, route: str = "config") -> torch.nn.Module:
    """Make `model` use `plan` (in place; returns the model). See the module docstring for routes."""
    if route not in ROUTES:
        raise RopekitError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
    check_plan_fits(model_spec(model), plan)
    modules = rotary_modules(model)
    if not modules:
        raise RopekitError(f"{type(model).__name__} has no rotary-embedding module with an inv_freq buffer")
    if route == "config":
        _apply_config(model, plan, modules)
    else:
        _apply_inv_freq(plan, modules)
    _verify(plan, rotary_modules(model), exact=route == "inv_freq" or "d_extrapolation" in plan.scaling.details)
    return model


def _apply_config(model, plan: Plan, modules) -> None:
    keys = transformers_config(plan)
    config = model.config
    kept = {k: v for k, v in (config.rope_parameters or {}).items() if k in GEOMETRY_KEYS}
    config.rope_parameters = {**kept, **keys["rope_parameters"]}  # e.g. Phi-3 requires partial_rotary_factor
    config.max_position_embeddings = keys["max_position_embeddings"]
    for parent, name, old in modules:
        new = type(old)(config=config)
        setattr(parent, name, new.to(old.inv_freq.device))


def _apply_inv_freq(plan: Plan, modules) -> None:
    for _, _, module in modules:
        inv_freq = plan.inv_freq.to(device=module.inv_freq.device, dtype=module.inv_freq.dtype)
        module.inv_freq.copy_(inv_freq)
        if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
            module.original_inv_freq.copy_(inv_freq)
        module.attention_scaling = plan.attention_factor
        module.rope_type = "default"  # no dynamic or longrope switching on top of the plan


def _verify(plan: Plan, modules, *, exact: bool) -> None:
    for _, _, module in modules:
        got = module.inv_freq.detach().float().cpu()
        same = torch.equal(got, plan.inv_freq) if exact else torch.allclose(got, plan.inv_freq, rtol=3e-7, atol=0)
        if not same or not math.isclose(float(module.attention_scaling), plan.attention_factor, rel_tol=1e-9):
            raise RopekitError(
                f"{type(module).__name__} did not take the plan (its family may not support per-pair factors); "
                "try route='inv_freq'"
            )
