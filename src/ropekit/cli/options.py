"""Options shared by CLI commands, and their conversion into API objects."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from ropekit.errors import RopekitError
from ropekit.plan.analysis.angles import BINS
from ropekit.plan.geometry import CONTEXT_LENGTH, HEAD_DIM, PARTIAL_ROTARY_FACTOR, ROPE_THETA, TARGET_LENGTH, RopeSpec
from ropekit.plan.registry import METHODS, Method, Param, get_method

GEOMETRY = "Model geometry (pick one source)"
METHOD = "Method options"


def flag(*decls: str, help: str, **kwargs: Any) -> Any:  # noqa: A002 (typer's own keyword)
    """A boolean option: --help shows no `<bool>` after it (a flag takes no value)."""
    return typer.Option(*decls, help=help, metavar="", **kwargs)


Preset = Annotated[
    str | None,
    typer.Option("--preset", help="Named model, e.g. llama2-7b (see `ropekit presets`).", rich_help_panel=GEOMETRY),
]
Model = Annotated[
    str | None,
    typer.Option("--model", help="Model directory, config.json path, .gguf file, or hub id.", rich_help_panel=GEOMETRY),
]
HeadDim = Annotated[
    int | None,
    typer.Option("--head-dim", help=f"Channels per attention head {HEAD_DIM.help()}.", rich_help_panel=GEOMETRY),
]
RopeTheta = Annotated[
    float | None,
    typer.Option("--rope-theta", help=f"RoPE base b, e.g. 10000 {ROPE_THETA.help()}.", rich_help_panel=GEOMETRY),
]
OriginalLength = Annotated[
    int | None,
    typer.Option(
        "--original-length",
        help=f"Pre-training context L in tokens (overrides a preset/config) {CONTEXT_LENGTH.help()}.",
        rich_help_panel=GEOMETRY,
    ),
]
PartialRotary = Annotated[
    float | None,
    typer.Option(
        "--partial-rotary-factor",
        help=f"Rotated fraction of head_dim (GPT-NeoX/Phi), default 1 {PARTIAL_ROTARY_FACTOR.help()}.",
        rich_help_panel=GEOMETRY,
    ),
]
FromScratch = Annotated[
    bool,
    flag(
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
TargetLength = Annotated[
    int, typer.Option("--target-length", help=f"Target context L' in tokens; must exceed L {TARGET_LENGTH.help()}.")
]
Bins = Annotated[
    int,
    typer.Option(
        "--bins",
        help=f"Histogram bins K over [0, 2π) for disturbance (and dprope's choice) {BINS.help()}.",
        rich_help_panel=METHOD,
    ),
]
Overwrite = Annotated[
    bool,
    flag(
        "--overwrite",
        help="Replace --out only if it is an earlier output of the same kind that ropekit wrote and nobody "
        "changed: its manifest (ropekit-manifest.json) must list every file in it, unchanged. Anything else "
        "(a file you added or edited, another kind of output, a folder ropekit did not write) is refused.",
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
        from ropekit.apply.gguf import spec_from_gguf

        if layer_type:
            raise RopekitError(
                "--layer-type does not apply to a .gguf MODEL: llama.cpp's graph decides which layers a plan reaches"
            )
        spec = spec_from_gguf(model, original_length=original_length, from_scratch=from_scratch)
    elif model:
        spec = RopeSpec.from_pretrained(model, from_scratch=from_scratch, layer_type=layer_type)
    else:
        if head_dim is None or rope_theta is None or original_length is None:
            raise RopekitError("explicit geometry needs all of --head-dim, --rope-theta and --original-length")
        name = f"d{head_dim}-b{rope_theta:g}-L{original_length}"
        return RopeSpec(
            head_dim=head_dim,
            base=rope_theta,
            context_length=original_length,
            partial_rotary_factor=1.0 if partial_rotary_factor is None else partial_rotary_factor,
            name=name,
        )
    if original_length is not None:
        spec = spec.with_context_length(original_length)
    if partial_rotary_factor is not None:
        spec = dataclasses.replace(spec, partial_rotary_factor=partial_rotary_factor)
    return spec


@dataclass(frozen=True)
class GeneratedOption:
    """One CLI option generated from records (a method parameter, a task option)."""

    flag: str
    type: type
    help: str
    panel: str


class GeneratedOptions:
    """A decorator giving a CLI command one option per record-defined option (`options()`).

    The generated parameters are keyword-only, named `prefix` + option name, default None ("not
    given"); typer reads `__signature__` each time it builds the CLI, so records registered later
    have their options too. The command body takes `keyword`: {option name: value} of the options
    the user set, after `parse`.
    """

    keyword: str  # the body's parameter that receives the options given
    prefix: str  # of the generated parameters' names, apart from the command's own
    kind: str  # "method option", "task option": for the clash message

    def __init__(self, command: Callable[..., Any]) -> None:
        functools.update_wrapper(self, command)
        self.command = command

    def options(self) -> dict[str, GeneratedOption]:
        raise NotImplementedError

    def own_parameter(self, p: inspect.Parameter) -> inspect.Parameter:
        """The command's own parameter `p` as the CLI shows it (unchanged unless a subclass says)."""
        return p

    def parse(self, given: dict[str, Any]) -> dict[str, Any]:
        """The options the user set, as the body takes them (unchanged unless a subclass says)."""
        return given

    def clash_message(self, flag: str) -> str:
        return f"{self.kind} {flag} clashes with the command's own option"

    @property
    def __signature__(self) -> inspect.Signature:
        own = inspect.signature(self.command, eval_str=True)
        kept = [self.own_parameter(p) for p in own.parameters.values() if p.name != self.keyword]
        taken = {p.name for p in kept} | {flag for p in kept for flag in _flags_of(p)}
        extra = []
        for name, option in self.options().items():
            if {self.prefix + name, option.flag} & taken:
                raise RopekitError(self.clash_message(option.flag))
            help_ = typer.Option(option.flag, help=option.help, rich_help_panel=option.panel)
            extra.append(
                inspect.Parameter(
                    self.prefix + name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[option.type | None, help_],
                )
            )
        return own.replace(parameters=kept + extra)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        n = len(self.prefix)
        given = {k[n:]: kwargs.pop(k) for k in [k for k in kwargs if k.startswith(self.prefix)]}
        values = self.parse({k: v for k, v in given.items() if v is not None})
        return self.command(*args, **{self.keyword: values}, **kwargs)


class with_method_options(GeneratedOptions):  # noqa: N801 (used as a decorator)
    """Give a CLI command one option per method parameter of every registered method.

    The options come from the records (`Method.params`); one shared by several methods (e.g.
    --attention-factor) is one option whose help names them all. The command body takes
    `method_options`: {parameter name: value} of the options the user set.
    """

    keyword = "method_options"
    prefix = "method_option_"
    kind = "method option"

    def options(self) -> dict[str, GeneratedOption]:
        return {name: GeneratedOption(o.flag, o.type, o.help, METHOD) for name, o in method_options().items()}


@dataclass(frozen=True)
class MethodOption:
    """The CLI option for one parameter name, shared by every method that has it."""

    flag: str  # e.g. --base-rule
    type: type
    help: str  # "yarn/longrope: …", or one clause per method where their texts differ
    records: dict[str, Param]  # method name → its record of the parameter


def method_options() -> dict[str, MethodOption]:
    """Parameter name → its CLI option, over every registered method's records that have a flag."""
    by_name: dict[str, dict[str, Param]] = {}
    for m in METHODS.values():
        for p in m.params:
            if p.option is not None:
                by_name.setdefault(p.name, {})[m.name] = p
    options = {}
    for name, records in by_name.items():
        first = next(iter(records.values()))
        if any((p.option, p.type) != (first.option, first.type) for p in records.values()):
            raise RopekitError(f"methods {', '.join(records)} give parameter {name!r} different flags or types")
        texts = {p.describe() for p in records.values()}
        if len(texts) == 1:
            text = "/".join(records) + ": " + texts.pop()
        else:
            text = "; ".join(f"{m}: {p.describe()}" for m, p in records.items())
        options[name] = MethodOption(str(first.option), first.type, text + ".", records)  # flags: filtered above
    return options


def _flags_of(p: inspect.Parameter) -> list[str]:
    infos = [a for a in getattr(p.annotation, "__metadata__", ()) if isinstance(a, typer.models.OptionInfo)]
    return [d for info in infos for d in (info.default, *(info.param_decls or ())) if isinstance(d, str)]


def method_input_paths(given: dict[str, Any]) -> tuple[Path, ...]:
    """The files method options name (a --factors-file): inputs the output must never overlap."""
    return tuple(v for v in given.values() if isinstance(v, Path))


def method_params(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The method options the user set, as the method takes them; refuse ones that do not apply to `method`."""
    params = _read(given)
    m = get_method(method)
    for key in params:
        if key not in _accepted(m, params):
            wrapped = f" (nor to {params.get(m.wraps) or m.default_of(m.wraps)!r}, which it wraps)" if m.wraps else ""
            raise RopekitError(f"option {_flag(key)} does not apply to method {m.name!r}{wrapped}")
    return params


def method_params_by_method(methods: list[str], given: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Several methods side by side (`ropekit eval`): each takes the options that apply to it."""
    params = _read(given)
    if params and not methods:
        raise RopekitError(f"option {_flag(next(iter(params)))} needs --method (the model as saved takes none)")
    by_method = {}
    for name in methods:
        accepted = _accepted(get_method(name), params)
        by_method[name] = {k: v for k, v in params.items() if k in accepted}
    for key in params:
        if not any(key in p for p in by_method.values()):
            raise RopekitError(f"option {_flag(key)} does not apply to any --method given ({', '.join(methods)})")
    return by_method


def _read(given: dict[str, Any]) -> dict[str, Any]:
    """Check finiteness and read each set option into its API value (e.g. a factors file into factors)."""
    options = method_options()
    params = {}
    for key, value in given.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise RopekitError(f"{_flag(key)} must be a finite number, got {value}")
        record = next(iter(options[key].records.values())) if key in options else None
        params[key] = record.read(value) if record is not None and record.read is not None else value
    return params


def _accepted(m: Method, params: dict[str, Any]) -> set[str]:
    """Parameters `m` has CLI options for, with those of the method it wraps (`Method.wraps`, e.g. resonance)."""
    accepted = {p.name for p in m.params if p.option is not None}
    if m.wraps is not None:
        inner = get_method(params.get(m.wraps) or m.default_of(m.wraps))
        accepted |= set(params) if inner.wraps is not None else _accepted(inner, params)
    return accepted


def _flag(name: str) -> str:
    option = method_options().get(name)
    return option.flag if option else "--" + name.replace("_", "-")


def check_finite(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise RopekitError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
