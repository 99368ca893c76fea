"""Options shared by CLI commands, and their conversion into API objects."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from ropekit.errors import RopekitError, did_you_mean
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.methods.base_change import BASE_RULES
from ropekit.plan.methods.longrope import read_factors_file
from ropekit.plan.registry import get_method

GEOMETRY = "Model geometry (pick one source)"
METHOD = "Method options"

Preset = Annotated[
    str | None,
    typer.Option("--preset", help="Named model, e.g. llama2-7b (see `ropekit presets`).", rich_help_panel=GEOMETRY),
]
Model = Annotated[
    str | None,
    typer.Option("--model", help="Model directory, config.json path, .gguf file, or hub id.", rich_help_panel=GEOMETRY),
]
HeadDim = Annotated[
    int | None, typer.Option("--head-dim", help="Channels per attention head.", rich_help_panel=GEOMETRY)
]
RopeTheta = Annotated[
    float | None, typer.Option("--rope-theta", help="RoPE base b, e.g. 10000.", rich_help_panel=GEOMETRY)
]
OriginalLength = Annotated[
    int | None,
    typer.Option(
        "--original-length",
        help="Pre-training context L in tokens (overrides a preset/config).",
        rich_help_panel=GEOMETRY,
    ),
]
PartialRotary = Annotated[
    float | None,
    typer.Option(
        "--partial-rotary-factor",
        help="Rotated fraction of head_dim (GPT-NeoX/Phi), default 1.",
        rich_help_panel=GEOMETRY,
    ),
]
FromScratch = Annotated[
    bool,
    typer.Option(
        "--from-scratch",
        help="Already-extended model: plan from plain RoPE at its original length, replacing its scaling (default: plan from its current frequencies over its trained context).",
        rich_help_panel=GEOMETRY,
    ),
]
LayerType = Annotated[
    str | None,
    typer.Option(
        "--layer-type",
        help="Per-layer-type RoPE (Gemma 3): which layers' block to plan (default full_attention).",
        rich_help_panel=GEOMETRY,
    ),
]
TargetLength = Annotated[int, typer.Option("--target-length", help="Target context L' in tokens; must exceed L.")]
Bins = Annotated[
    int,
    typer.Option(
        "--bins", help="Histogram bins K over [0, 2π) for disturbance (and dprope's choice).", rich_help_panel=METHOD
    ),
]
Threshold = Annotated[
    float | None,
    typer.Option(
        "--threshold",
        help="dprope: interpolate a pair iff D(extra) − D(interp) > t (default 0).",
        rich_help_panel=METHOD,
    ),
]
InterpDims = Annotated[
    int | None,
    typer.Option(
        "--interpolated-dims",
        help="dprope: interpolate exactly n dims (n/2 pairs with largest margin).",
        rich_help_panel=METHOD,
    ),
]
FactorsFile = Annotated[
    Path | None,
    typer.Option(
        "--factors-file", help="longrope: JSON list / Phi-3 config / text of per-pair factors.", rich_help_panel=METHOD
    ),
]
Alpha = Annotated[float | None, typer.Option("--alpha", help="ntk: α (default s).", rich_help_panel=METHOD)]
BetaFast = Annotated[
    float | None, typer.Option("--beta-fast", help="yarn: β_fast (default 32).", rich_help_panel=METHOD)
]
BetaSlow = Annotated[
    float | None, typer.Option("--beta-slow", help="yarn: β_slow (default 1).", rich_help_panel=METHOD)
]
AttentionFactor = Annotated[
    float | None,
    typer.Option("--attention-factor", help="yarn/longrope: override the attention factor a.", rich_help_panel=METHOD),
]
LowFreq = Annotated[
    float | None, typer.Option("--low-freq-factor", help="llama3: lf (default 1).", rich_help_panel=METHOD)
]
HighFreq = Annotated[
    float | None, typer.Option("--high-freq-factor", help="llama3: hf (default 4).", rich_help_panel=METHOD)
]
NewBase = Annotated[
    float | None,
    typer.Option(
        "--new-base", help="base: the new RoPE base b' (else derived by --base-rule).", rich_help_panel=METHOD
    ),
]
BaseRule = Annotated[
    str | None,
    typer.Option(
        "--base-rule",
        help="base: 'critical' (Liu et al. 2023, default), 'men2024' (smallest passing base, Men et al. 2024) or 'men2024-all-above'.",
        rich_help_panel=METHOD,
    ),
]
Inner = Annotated[
    str | None, typer.Option("--inner", help="resonance: the method it wraps (default yarn).", rich_help_panel=METHOD)
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace --out if it is an earlier ropekit output (never anything else).")
]
AtLength = Annotated[
    int | None,
    typer.Option(
        "--at-length", help="dynamic-ntk: sequence length to evaluate at (default L').", rich_help_panel=METHOD
    ),
]


def build_spec(
    *,
    preset: str | None,
    model: str | None,
    head_dim: int | None,
    rope_theta: float | None,
    original_length: int | None,
    partial_rotary_factor: float | None,
    from_scratch: bool = False,
    layer_type: str | None = None,
) -> RopeSpec:
    """Exactly one geometry source: --preset, --model, or explicit --head-dim/--rope-theta/--original-length.

    `--from-scratch` and `--layer-type` apply to --model only.
    """
    if (from_scratch or layer_type) and not model:
        raise RopekitError("--from-scratch and --layer-type apply to --model only")
    explicit = head_dim is not None or rope_theta is not None
    sources = [
        name
        for name, given in (("--preset", preset), ("--model", model), ("--head-dim/--rope-theta", explicit))
        if given
    ]
    if len(sources) != 1:
        raise RopekitError(
            "give exactly one geometry: --preset NAME, --model PATH_OR_ID, or --head-dim D --rope-theta B --original-length L"
            + (f" (got {' and '.join(sources)})" if sources else "")
        )
    check_finite(rope_theta=rope_theta, partial_rotary_factor=partial_rotary_factor)
    if preset:
        spec = RopeSpec.from_preset(preset)
    elif model and model.lower().endswith(".gguf"):  # a GGUF may need --original-length to be read at all
        spec = RopeSpec.from_gguf(model, original_length=original_length)
    elif model:
        spec = RopeSpec.from_pretrained(model, from_scratch=from_scratch, layer_type=layer_type)
    else:
        if head_dim is None or rope_theta is None or original_length is None:
            raise RopekitError("explicit geometry needs all of --head-dim, --rope-theta and --original-length")
        name = f"d{head_dim}-b{rope_theta:g}-L{original_length}"
        return RopeSpec(
            head_dim=head_dim,
            base=rope_theta,
            original_length=original_length,
            partial_rotary_factor=partial_rotary_factor or 1.0,
            name=name,
        )
    overrides: dict[str, Any] = {}
    if original_length is not None:
        overrides["original_length"] = original_length
    if partial_rotary_factor is not None:
        overrides["partial_rotary_factor"] = partial_rotary_factor
    return RopeSpec(**{**spec.__dict__, **overrides}) if overrides else spec


def method_params(method: str, **given: Any) -> dict[str, Any]:
    """Keep the method options the user set; refuse ones that do not apply to `method`."""
    check_finite(**{k: v for k, v in given.items() if isinstance(v, float)})
    m = get_method(method)
    params = {k: v for k, v in given.items() if v is not None}
    if "factors_file" in params:
        params["factors"] = read_factors_file(params.pop("factors_file"))
    accepted = set(m.parameters) | ({"bins"} if m.name == "dprope" else set())
    if m.name == "resonance":
        accepted |= set(params)  # resonance passes the rest to the method it wraps
    for key in params:
        if key not in accepted:
            flag = "--" + ("factors-file" if key == "factors" else key.replace("_", "-"))
            raise RopekitError(f"option {flag} does not apply to method {m.name!r}")
    if "rule" in params and params["rule"] not in BASE_RULES:  # enumerated options: refused before any work
        raise did_you_mean("--base-rule", params["rule"], BASE_RULES)
    if "inner" in params:
        get_method(params["inner"])
    return params


METHOD_OPTIONS = {  # CLI parameter name → method keyword
    "threshold": "threshold",
    "interpolated_dims": "interpolated_dims",
    "factors_file": "factors_file",
    "alpha": "alpha",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "attention_factor": "attention_factor",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "new_base": "new_base",
    "base_rule": "rule",
    "inner": "inner",
    "at_length": "at_length",
}


def method_params_from(method: str, cli_values: dict[str, Any]) -> dict[str, Any]:
    """`method_params` from a command's parsed options (its locals)."""
    return method_params(method, **{kw: cli_values[name] for name, kw in METHOD_OPTIONS.items()})


def check_finite(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise RopekitError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def paper_setting_dims(method: str, spec, target_length: int, interpolated_dims: int | None) -> int:
    """--paper-setting: the distributional paper's n for this geometry and target, or one clear error."""
    from ropekit.plan.methods.dprope import PAPER_INTERPOLATED_DIMS, paper_interpolated_dims

    if method not in ("dprope", "distributional"):
        raise RopekitError("--paper-setting applies to --method dprope")
    if interpolated_dims is not None:
        raise RopekitError("give --paper-setting or --interpolated-dims, not both")
    n = paper_interpolated_dims(spec, target_length)
    if n is None:
        targets = ", ".join(str(t) for t in PAPER_INTERPOLATED_DIMS)
        raise RopekitError(
            f"the paper's setting exists for LLaMA-2's geometry (head_dim 128, base 10000, 4096) at {targets}"
        )
    return n


def paper_setting_scores(spec, target_length: int, bins: int) -> dict[str, float]:
    """{'dprope (paper, n=N)': disturbance} when the paper has a setting for this geometry and target."""
    from ropekit.plan.methods.dprope import paper_interpolated_dims
    from ropekit.plan.registry import plan as make_plan

    n = paper_interpolated_dims(spec, target_length)
    if n is None:
        return {}
    return {
        f"dprope (paper, n={n})": make_plan(spec, target_length, "dprope", bins=bins, interpolated_dims=n).disturbance
    }
