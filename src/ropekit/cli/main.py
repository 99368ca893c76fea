"""`ropekit` command line: a thin layer over the Python API. Run `ropekit --help`."""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from ropekit.cli import options as o
from ropekit.cli.eval_options import run_default, with_task_options
from ropekit.cli.render import comparison_table, print_plan
from ropekit.cli.tune import tune_cmd
from ropekit.errors import RopekitError, Terminated
from ropekit.manifest import MANIFEST, set_command
from ropekit.output import atomic_directory, prepare_output
from ropekit.plan.analysis.angles import DEFAULT_BINS
from ropekit.plan.registry import DEFAULT_METHOD
from ropekit.train.config import TrainConfig, domain_help

T = TypeVar("T")
TRAIN = TrainConfig(model="", out=Path(), data="", target_length=1)  # its defaults, shown by `finetune --help`

app = typer.Typer(
    help="Plan, apply, fine-tune and evaluate RoPE context-window extensions.\n\n"
    "Example: ropekit plan --preset llama2-7b --target-length 16384 --method dprope",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console()
err_console = Console(stderr=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a RopekitError into one line on stderr and exit code 2; Ctrl-C (exit 130) and SIGTERM (143)
    into one line saying that nothing was written (partial files are removed on the way out)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RopekitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            print(f"error: {what} before the result was complete; nothing was written", file=sys.stderr)
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None

    return wrapper


@app.command("plan")
@user_errors
@o.with_method_options
def plan_cmd(
    target_length: o.TargetLength,
    method: Annotated[
        str,
        typer.Option("--method", help="Scaling method (`ropekit methods` lists them with their options)."),
    ] = DEFAULT_METHOD,
    preset: o.Preset = None,
    model: o.Model = None,
    head_dim: o.HeadDim = None,
    rope_theta: o.RopeTheta = None,
    original_length: o.OriginalLength = None,
    partial_rotary_factor: o.PartialRotary = None,
    bins: o.Bins = DEFAULT_BINS,
    from_scratch: o.FromScratch = False,
    layer_type: o.LayerType = None,
    json_out: Annotated[bool, o.flag("--json", help="Print one JSON object (and nothing else) on stdout.")] = False,
    compare: Annotated[
        bool,
        o.flag(
            "--compare",
            help="With --json: add disturbance_by_method for every method (how far each moves the angle "
            "statistics, not a quality ranking: `ropekit tune` measures that).",
        ),
    ] = False,
    paper_setting: Annotated[
        bool,
        o.flag(
            "--paper-setting",
            help="dprope: the paper's n for LLaMA-2 (80 dims at 8k, 64 at 16k) instead of the t = 0 argmin.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for the export files and plan.json (without it nothing is written)."),
    ] = None,
    no_write: Annotated[bool, o.flag("--no-write", help="Do not write export files, even with --out.")] = False,
    overwrite: o.Overwrite = False,
    *,
    method_options: dict[str, Any],
) -> None:
    """Plan an extension: per-pair factors, attention factor, disturbance, and config exports.

    Prints the per-pair plan and every method's disturbance, and writes configs for
    transformers (v5 and v4), vLLM and llama.cpp. The disturbance says how far a plan moves the
    angle statistics from pre-training; it does not rank plans by quality (on SmolLM2-135M the
    lowest-disturbance plans had the worst perplexity): `ropekit tune` measures that.
    """
    from ropekit.apply.plan_dir import write_plan_directory
    from ropekit.plan.report import plan_report

    spec = o.build_spec(
        preset=preset,
        model=model,
        head_dim=head_dim,
        rope_theta=rope_theta,
        original_length=original_length,
        partial_rotary_factor=partial_rotary_factor,
        from_scratch=from_scratch,
        layer_type=layer_type,
    )
    params = o.method_params(method, method_options)
    settings: dict[str, Any] = dict(
        bins=bins, compare_methods=compare or not json_out, paper_setting=paper_setting, **params
    )
    out_dir = None if no_write else out  # files only where the user asked for them
    with err_console.status(f"planning {method} to {target_length} tokens"):
        if out_dir is None:
            report = plan_report(spec, target_length, method, **settings)
        else:
            inputs = (model, *o.method_input_paths(method_options))  # e.g. a factors file
            report = write_plan_directory(
                spec, target_length, out_dir, method, overwrite=overwrite, inputs=inputs, **settings
            )
    if json_out:
        print(json.dumps(report.summary()))
        return
    print_plan(out_console, report)
    if out_dir is not None:
        names = ", ".join(p.name for p in report.exports.values())
        out_console.print(f"exports written to {out_dir}/: {names}, plan.json, {MANIFEST}")
    elif not no_write:
        out_console.print("add --out DIR to write the transformers, vLLM and llama.cpp exports and plan.json")


@app.command("analyze")
@user_errors
def analyze_cmd(
    target_length: o.TargetLength,
    out: Annotated[Path, typer.Option("--out", help="Directory for plots and per_pair.csv (required).")],
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated methods to compare (default: all that need no factors).")
    ] = "",
    pairs: Annotated[
        str,
        typer.Option(
            "--pairs",
            help="Comma-separated pair indices for angle histograms (default: around the critical dimension).",
        ),
    ] = "",
    fmt: Annotated[str, typer.Option("--format", help="png or svg.")] = "png",
    preset: o.Preset = None,
    model: o.Model = None,
    head_dim: o.HeadDim = None,
    rope_theta: o.RopeTheta = None,
    original_length: o.OriginalLength = None,
    partial_rotary_factor: o.PartialRotary = None,
    bins: o.Bins = DEFAULT_BINS,
    overwrite: o.Overwrite = False,
    from_scratch: o.FromScratch = False,
    layer_type: o.LayerType = None,
) -> None:
    """Angle distributions and disturbance of every method: plots (PNG/SVG) and a per-pair CSV."""
    from ropekit.plan import plots
    from ropekit.plan.analysis.bounds import critical_dimension
    from ropekit.plan.registry import compare as compare_methods
    from ropekit.plan.registry import get_method
    from ropekit.plan.summary import per_pair_rows

    if fmt not in ("png", "svg"):
        raise RopekitError(f"--format must be png or svg, got {fmt!r}")
    spec = o.build_spec(
        preset=preset,
        model=model,
        head_dim=head_dim,
        rope_theta=rope_theta,
        original_length=original_length,
        partial_rotary_factor=partial_rotary_factor,
        from_scratch=from_scratch,
        layer_type=layer_type,
    )
    names = [m.strip() for m in methods.split(",") if m.strip()] or None
    for name in names or []:
        if get_method(name).needs_factors:
            raise RopekitError(
                f"analyze compares methods from the geometry alone; {name} needs searched factors "
                f"(see it with: ropekit plan --method {name} --factors-file FILE)"
            )
    pair_list = _parse_pairs(pairs, spec.num_pairs) or _default_pairs(critical_dimension(spec) // 2, spec.num_pairs)
    target = prepare_output(out, kind="analysis", overwrite=overwrite, inputs=(model,))
    with err_console.status("computing angle distributions"), atomic_directory(target) as tmp:
        plans = compare_methods(spec, target_length, names, bins=bins)
        written = [
            plots.plot_pair_disturbance(plans, tmp / f"disturbance_per_pair.{fmt}"),
            plots.plot_factors(plans, tmp / f"factors_per_pair.{fmt}"),
        ]
        written += [
            plots.plot_angle_histograms(spec, target_length, i, tmp / f"angles_pair{i:03d}.{fmt}", bins=bins)
            for i in pair_list
        ]
        rows = per_pair_rows(plans)
        with (tmp / "per_pair.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    out_console.print(comparison_table({n: p.disturbance for n, p in plans.items()}, chosen=DEFAULT_METHOD))
    out_console.print(f"wrote {out / 'per_pair.csv'} and " + ", ".join(str(out / p.name) for p in written))


def _parse_pairs(text: str, num_pairs: int) -> list[int]:
    try:
        pairs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RopekitError(f"--pairs must be comma-separated integers, got {text!r}") from None
    bad = [p for p in pairs if not 0 <= p < num_pairs]
    if bad:
        raise RopekitError(f"pair {bad[0]} is out of range: this geometry has pairs 0 … {num_pairs - 1}")
    return pairs


def _default_pairs(critical_pair: int, num_pairs: int) -> list[int]:
    """The last pair that saw a full turn, the first that did not, and the lowest frequency."""
    return sorted({max(critical_pair - 1, 0), min(critical_pair, num_pairs - 1), num_pairs - 1})


@app.command("extend")
@user_errors
@o.with_method_options
def extend_cmd(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="Model directory or hub id (transformers format; see `ropekit convert`), or a .gguf file.",
        ),
    ],
    target_length: o.TargetLength,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="New model directory (must not exist or be empty); for a .gguf MODEL, a new .gguf file."
        ),
    ],
    method: Annotated[str, typer.Option("--method", help="Scaling method (see `ropekit methods`).")] = DEFAULT_METHOD,
    overwrite: o.Overwrite = False,
    from_scratch: o.FromScratch = False,
    layer_types: Annotated[
        str,
        typer.Option(
            "--layer-types",
            help="Per-layer-type RoPE (Gemma 3): comma-separated layer types to extend (default: full_attention only).",
        ),
    ] = "",
    bins: o.Bins = DEFAULT_BINS,
    original_length: Annotated[
        int | None,
        typer.Option(
            "--original-length",
            help="GGUF only: the context to plan from (with --from-scratch: the length before the file's scaling).",
        ),
    ] = None,
    *,
    method_options: dict[str, Any],
) -> None:
    """Write an extended copy of MODEL that stock transformers loads (no ropekit needed).

    The config gets a longrope block with the plan's per-pair factors and attention factor and
    max_position_embeddings = target; ropekit.json records the plan. Prints the vLLM and
    llama.cpp equivalents. A .gguf MODEL gives a .gguf that llama.cpp runs with the plan.
    """
    from ropekit.apply.export import export_forms, llama_cpp_rope_freqs
    from ropekit.apply.extend import extend
    from ropekit.apply.patch import as_plan_list

    params = o.method_params(method, method_options)
    inputs = o.method_input_paths(method_options)  # e.g. a --factors-file: never inside --out
    if model.lower().endswith(".gguf"):
        if layer_types:
            raise RopekitError(
                "--layer-types applies to a model directory with per-layer-type RoPE; for a .gguf MODEL llama.cpp's "
                "graph decides which layers a plan reaches"
            )
        return _extend_gguf(
            model, out, target_length, method, overwrite, original_length, bins, params, from_scratch, inputs
        )
    if original_length is not None:
        raise RopekitError("--original-length applies to a .gguf MODEL only (a model directory's config says it)")
    with err_console.status(f"extending {model} to {target_length} tokens with {method}"):
        plans = as_plan_list(
            extend(
                model,
                out,
                target_length=target_length,
                method=method,
                bins=bins,
                overwrite=overwrite,
                from_scratch=from_scratch,
                layer_types=_split(layer_types, str) or None,
                inputs=inputs,
                **params,
            )
        )
    out_console.print(f"wrote {out}/")
    for plan in plans:
        layers = f"{plan.spec.layer_type} layers, " if plan.spec.layer_type else ""
        out_console.print(
            f"  {layers}{plan.method}: {len(plan.interpolated_pairs)} of {plan.spec.num_pairs} pairs "
            f"interpolated, attention factor {plan.attention_factor:.4f}, disturbance {plan.disturbance:.3f}"
        )
    out_console.print("load it with: AutoModelForCausalLM.from_pretrained(" + repr(str(out)) + ")")
    plan = plans[0]
    forms, refused = export_forms(plan)
    if "vllm_hf_overrides" in forms:
        out_console.print(
            f"vLLM on the original weights: --hf-overrides '{json.dumps(forms['vllm_hf_overrides'])}' "
            f"--max-model-len {target_length}",
            soft_wrap=True,
        )
    else:
        out_console.print(f"vLLM: {refused['vllm_hf_overrides']}", soft_wrap=True)
    cpp = llama_cpp_rope_freqs(plan)
    if cpp.get("note"):
        out_console.print(cpp["note"], soft_wrap=True)
    else:
        out_console.print(
            f"llama.cpp: for a GGUF that keeps the plan, run `ropekit extend MODEL.gguf --method {plan.method} "
            f"--target-length {target_length} --out EXTENDED.gguf` on a GGUF of the original (unextended) "
            "model",
            soft_wrap=True,
        )
        err_console.print(
            f"warning: do not convert {out} with llama.cpp's convert_hf_to_gguf.py: it drops the longrope "
            "factors of Llama-family models, and the GGUF runs unextended",
            soft_wrap=True,
        )


def _extend_gguf(
    model: str,
    out: Path,
    target_length: int,
    method: str,
    overwrite: bool,
    original_length: int | None,
    bins: int,
    params: dict[str, Any],
    from_scratch: bool,
    inputs: tuple[Path, ...],
) -> None:
    from ropekit.apply.gguf import extend_gguf, read_rope
    from ropekit.output import refuse_overlaps

    refuse_overlaps(out, inputs)
    with err_console.status(f"extending {model} to {target_length} tokens with {method}"):
        plan = extend_gguf(
            model,
            out,
            target_length=target_length,
            method=method,
            overwrite=overwrite,
            original_length=original_length,
            from_scratch=from_scratch,
            bins=bins,
            **params,
        )
    out_console.print(
        f"wrote {out} ({plan.method}: {len(plan.interpolated_pairs)} of {plan.spec.num_pairs} pairs "
        f"interpolated, attention factor {plan.attention_factor:.4f}; tensors copied unchanged, "
        f"{read_rope(out).carried_by()}, context_length {target_length})"
    )
    out_console.print(
        f"run it with llama.cpp: llama-cli -m {out} -c {target_length}, no --rope-* or --yarn-* flags "
        f"(they would scale again)  (or llama_cpp.Llama(model_path={str(out)!r}, n_ctx={target_length}))",
        soft_wrap=True,
    )


convert_app = typer.Typer(help="Convert checkpoints from other formats to transformers.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("llama2c")
@user_errors
def convert_llama2c_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(metavar="CHECKPOINT", help="llama2.c .bin checkpoint (legacy or v1 'ak42').")
    ],
    tokenizer: Annotated[Path, typer.Argument(metavar="TOKENIZER", help="llama2.c tokenizer.bin (e.g. tok512.bin).")],
    out: Annotated[Path, typer.Option("--out", help="Output model directory (must not exist or be empty).")],
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Expected sha256 of the checkpoint; refuse on mismatch.")
    ] = None,
    overwrite: o.Overwrite = False,
    allow_non_finite: Annotated[
        bool, o.flag("--allow-non-finite", help="Convert even if some weights are NaN or inf.")
    ] = False,
) -> None:
    """Convert a llama2.c checkpoint + tokenizer to a transformers LlamaForCausalLM directory."""
    import hashlib

    from ropekit.apply.llama2c import convert

    target = prepare_output(out, kind="converted model", overwrite=overwrite, inputs=(checkpoint, tokenizer))
    if sha256 is not None:
        if not checkpoint.is_file():
            raise RopekitError(f"{checkpoint}: checkpoint file not found")
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        if digest != sha256.lower():
            raise RopekitError(f"{checkpoint}: sha256 {digest} does not match the expected {sha256}")
    convert(checkpoint, tokenizer, target, allow_non_finite=allow_non_finite)
    out_console.print(f"wrote {out}/ (transformers LlamaForCausalLM + tokenizer); try: ropekit inspect {out}")


@convert_app.command("gguf")
@user_errors
def convert_gguf_cmd(
    gguf_file: Annotated[
        Path, typer.Argument(metavar="GGUF", help="A .gguf file (any quantisation transformers can dequantise).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output model directory (must not exist or be empty).")],
    overwrite: o.Overwrite = False,
) -> None:
    """Convert a GGUF to a transformers directory: dequantised float32 weights, tokenizer, chat template, RoPE plan."""
    from ropekit.apply.gguf_convert import convert_gguf

    with err_console.status(f"dequantising {gguf_file}"):
        convert_gguf(gguf_file, out, overwrite=overwrite)
    out_console.print(f"wrote {out}/ (transformers model + tokenizer); try: ropekit inspect {out}")


@app.command("inspect")
@user_errors
def inspect_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model directory, config.json, .gguf file, or hub id.")],
    json_out: Annotated[bool, o.flag("--json", help="Print one JSON object.")] = False,
) -> None:
    """Model card: RoPE geometry, current scaling, critical dimension, trained context, what to do next."""
    from ropekit.apply.inspect import model_card

    card = model_card(model)
    if json_out:
        print(json.dumps(card))
        return
    t = Table(title=f"{model}", show_header=False)
    for key, value in card.items():
        if key != "next":
            t.add_row(key.replace("_", " "), value if isinstance(value, str) else json.dumps(value))
    out_console.print(t)
    if card.get("next"):  # whole lines, never folded or cut, so they can be pasted
        out_console.print("next:")
        for command in str(card["next"]).split("; "):
            out_console.print(f"  {command}", soft_wrap=True, markup=False, highlight=False)


@app.command("eval")
@user_errors
@o.with_method_options
@with_task_options
def eval_cmd(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="Model directory, hub id, or .gguf file (dequantised once into ~/.cache/ropekit)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Report directory (results.json/.csv, report.md, plots); without it, the table only."
        ),
    ] = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="Comma-separated tasks (see `ropekit eval --help`).")
    ] = None,
    lengths: Annotated[
        str | None,
        typer.Option(
            "--lengths", help=f"Comma-separated context lengths in tokens (default {run_default('lengths')})."
        ),
    ] = None,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="Apply this method on the fly; repeat for a side-by-side comparison. Without --method the model is evaluated as saved.",
        ),
    ] = None,
    target_length: Annotated[
        int | None, typer.Option("--target-length", help="Plan target (default: the longest length).")
    ] = None,
    bins: Annotated[
        int | None,
        typer.Option(
            "--bins",
            help=f"Histogram bins K over [0, 2π) for disturbance (and dprope's choice) (default {run_default('bins')}).",
            rich_help_panel=o.METHOD,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", help="Documents for ppl, longppl and nll: text file, folder, or JSONL with a 'text' field."
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", help=f"Tokens read per document, 0 = all (default {run_default('max_tokens')})."),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(
            "--store",
            help="The evaluation store (SQLite) that keeps every measured cell, so a rerun measures nothing twice "
            "(default: ropekit's cache, ~/.cache/ropekit/eval/cells.sqlite or $ROPEKIT_CACHE/eval/cells.sqlite).",
        ),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Measure every cell again and replace what the store holds for it.")
    ] = False,
    overwrite: o.Overwrite = False,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            help="transformers, or llama.cpp (a .gguf in llama.cpp itself: ppl, nll, passkey; needs ropekit\\[llamacpp]) "
            f"(default {run_default('backend')}).",
        ),
    ] = None,
    *,
    method_options: dict[str, Any],
    task_options: dict[str, Any],
) -> None:
    """Evaluate long-context ability; several --method values give a side-by-side comparison.

    Every measured cell (plan × task × length …) is kept in the evaluation store: an interrupted run
    resumes, and plans with identical factors share their cells.

    Example: ropekit eval out/s260k --tasks ppl,passkey --lengths 256,512,1024,2048,4096
    --method none --method pi --method yarn --method dprope --data ../shared/assets/text/tinystories
    """
    from ropekit.eval.runner import EvalConfig, best_by_length, evaluate, result_rows

    methods = list(method or [])
    given = {
        "tasks": None if tasks is None else _split(tasks, str),
        "lengths": None if lengths is None else _split(lengths, int),
        "target_length": target_length,
        "bins": bins,
        "data": data,
        "max_tokens": max_tokens,
        "backend": backend,
        "store": store,
    }
    cfg = EvalConfig(
        model=model,
        out=out,
        methods=methods,
        method_params=o.method_params_by_method(methods, method_options),
        options=task_options,
        fresh=fresh,
        overwrite=overwrite,
    )
    for name, value in given.items():  # the others keep EvalConfig's defaults
        if value is not None:
            setattr(cfg, name, value)
    if cfg.max_tokens == 0:
        cfg.max_tokens = None
    results = evaluate(cfg)
    t = Table(title=f"{model}: results" + (f" (written to {out}/)" if out is not None else ""))
    for col in ("method", "task", "length", "depth", "value", "tokens scored"):
        t.add_column(col)
    rows = result_rows(results)
    for r in rows:
        t.add_row(
            r["method"],
            r["task"],
            str(r["length"]),
            str(r["depth"]),
            "—" if r["value"] is None else f"{r['value']:.4g}",
            str(r["tokens_scored"]),
        )
    out_console.print(t)
    for line in best_by_length(rows):
        out_console.print(line)
    err_console.print(eval_cache_note(Path(results["store"]["path"])), soft_wrap=True)


def eval_cache_note(store: Path) -> str:
    """Where `ropekit eval` kept its cells and how to clear them."""
    from ropekit.paths import cache_root, describe_size

    if cache_root(create=False).resolve() in store.resolve().parents:
        return f"evaluation cells kept in {store} for reruns; " + cache_note()
    size = describe_size(store.stat().st_size) if store.is_file() else "empty"
    return f"evaluation cells kept in {store} ({size}; your --store: delete the file to clear it)"


def _split(text: str, kind: Callable[[str], T]) -> list[T]:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RopekitError(f"expected a comma-separated list of {kind.__name__} values, got {text!r}") from None


@app.command("finetune")
@user_errors
@o.with_method_options
def finetune_cmd(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model directory or hub id to extend and fine-tune.")],
    data: Annotated[
        str, typer.Option("--data", help="Long documents: text file, folder, or JSONL with a 'text' field.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Run directory; becomes the fine-tuned extended model.")],
    recipe: Annotated[
        str | None,
        typer.Option("--recipe", help="dprope-llama2-8k or dprope-llama2-16k (the paper's recipe); flags override it."),
    ] = None,
    method: Annotated[str | None, typer.Option("--method", help=f"Scaling method (default {TRAIN.method}).")] = None,
    target_length: Annotated[
        int | None,
        typer.Option("--target-length", help="Context to extend to, tokens (required unless --recipe gives it)."),
    ] = None,
    train_length: Annotated[
        int | None,
        typer.Option(
            "--train-length",
            help="Training window (default: target; with --pose: required, e.g. the original length)."
            + " "
            + domain_help("train_length"),
        ),
    ] = None,
    pose: Annotated[
        bool, o.flag("--pose", help="PoSE: train at --train-length with position ids skipped up to the target.")
    ] = False,
    pose_chunks: Annotated[
        int, typer.Option("--pose-chunks", help="PoSE chunks per window." + " " + domain_help("pose_chunks"))
    ] = TRAIN.pose_chunks,
    pose_text_skip: Annotated[
        int,
        typer.Option(
            "--pose-text-skip",
            help="PoSE text skipping: cut each window from a span this many tokens longer (0 = off)."
            + " "
            + domain_help("pose_text_skip"),
        ),
    ] = TRAIN.pose_text_skip,
    passkey_mix: Annotated[
        float,
        typer.Option(
            "--passkey-mix",
            help="Share of training windows that are passkey examples (yarn-style prompt + answer, one window "
            "each), so retrieval is trained rather than forgotten; 0 = text only." + " " + domain_help("passkey_mix"),
        ),
    ] = TRAIN.passkey_mix,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help=f"Optimizer steps (default {TRAIN.steps})." + " " + domain_help("steps")),
    ] = None,
    global_batch: Annotated[
        int | None,
        typer.Option(
            "--global-batch",
            help=f"Windows per step over all processes (default {TRAIN.global_batch})."
            + " "
            + domain_help("global_batch"),
        ),
    ] = None,
    micro_batch: Annotated[
        int,
        typer.Option("--micro-batch", help="Windows per forward pass per process." + " " + domain_help("micro_batch")),
    ] = TRAIN.micro_batch,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help=f"AdamW learning rate (default {TRAIN.lr:g})." + " " + domain_help("lr")),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            "--weight-decay",
            help=f"AdamW weight decay (default {TRAIN.weight_decay:g})." + " " + domain_help("weight_decay"),
        ),
    ] = None,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            "--warmup-steps",
            help=f"Linear warmup steps (default {TRAIN.warmup_steps})." + " " + domain_help("warmup_steps"),
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option("--seed", help="Data order, PoSE skips and init of any new state." + " " + domain_help("seed")),
    ] = TRAIN.seed,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Checkpoint every N steps." + " " + domain_help("save_every"))
    ] = TRAIN.save_every,
    resume: Annotated[
        bool, o.flag("--resume", help="Continue the run in --out from its latest complete checkpoint.")
    ] = False,
    stop_after_steps: Annotated[
        int | None,
        typer.Option(
            "--stop-after-steps",
            help="Stop cleanly after N steps (time-limited jobs); continue with --resume."
            + " "
            + domain_help("stop_after"),
        ),
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        o.flag(
            "--gradient-checkpointing/--no-gc",
            help=f"Trade compute for memory (default {'on' if TRAIN.gradient_checkpointing else 'off'}; on in recipes).",
        ),
    ] = None,
    mixed_precision: Annotated[
        str, typer.Option("--mixed-precision", help="auto (bf16 on a capable GPU), no, bf16, fp16.")
    ] = TRAIN.mixed_precision,
    report_to: Annotated[
        str, typer.Option("--report-to", help="auto (tensorboard if installed), none, tensorboard, wandb.")
    ] = TRAIN.report_to,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Tokens read per document." + " " + domain_help("max_tokens"))
    ] = None,
    overwrite: o.Overwrite = False,
    bins: o.Bins = DEFAULT_BINS,
    *,
    method_options: dict[str, Any],
) -> None:
    """Extend MODEL with a method and fine-tune it at long context (full-length or PoSE).

    Runs on accelerate: one process here, or many with
    `torchrun --nproc_per_node N -m ropekit.cli.main finetune ...` (CPU/GPU) or
    `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml -m ropekit.cli.main finetune ...`.
    """
    from ropekit.train.loop import finetune
    from ropekit.train.recipes import get_recipe

    settings = get_recipe(recipe) if recipe else {}
    explicit = dict(
        method=method,
        target_length=target_length,
        steps=steps,
        global_batch=global_batch,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        gradient_checkpointing=gradient_checkpointing,
    )
    settings.update({k: v for k, v in explicit.items() if v is not None})
    if settings.get("target_length") is None:
        raise RopekitError("give --target-length (or a --recipe)")
    chosen = settings.pop("method", TRAIN.method)
    params = {**o.method_params(chosen, method_options), "bins": bins}  # make_plan takes bins for any method
    cfg = TrainConfig(
        model=model,
        out=out,
        data=data,
        extra_inputs=tuple(str(p) for p in o.method_input_paths(method_options)),
        method=chosen,
        method_params=params,
        train_length=train_length,
        pose=pose,
        pose_chunks=pose_chunks,
        pose_text_skip=pose_text_skip,
        passkey_mix=passkey_mix,
        micro_batch=micro_batch,
        seed=seed,
        save_every=save_every,
        resume=resume,
        stop_after=stop_after_steps,
        mixed_precision=mixed_precision,
        report_to=report_to,
        max_tokens=max_tokens,
        overwrite=overwrite,
        **settings,
    )
    try:
        record = finetune(cfg)
    except KeyboardInterrupt as exc:  # before the first step (the loop itself stops cleanly after a step)
        kept = f"{out} holds only the run's settings: rerun with --overwrite" if out.is_dir() else "nothing was written"
        print(f"error: interrupted before the first training step; {kept}", file=sys.stderr)
        raise typer.Exit(getattr(exc, "exit_code", 130)) from None
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun every process returns here; one reports
    state = (
        "finished"
        if record["completed"]
        else f"stopped after step {record['steps_completed']} (continue with --resume)"
    )
    err_console.print(
        f"{state}; {record['tokens_per_second'] or 0:,.0f} tokens/s; loss curve in {out}/logs/loss_curve.csv"
    )
    err_console.print(cache_note(), soft_wrap=True)


@app.command("cache")
@user_errors
def cache_cmd(
    clear: Annotated[
        bool, o.flag("--clear", help="Empty ropekit's cache (only a directory tagged as ropekit's).")
    ] = False,
) -> None:
    """Where ropekit caches (tokenisations, GGUF conversions, evaluation cells), how much, and how to clear it."""
    from ropekit.paths import PARTS, cache_root, cache_usage, clear_cache, describe_size

    root = cache_root(create=False)
    where = "ROPEKIT_CACHE" if os.environ.get("ROPEKIT_CACHE") else "default; set ROPEKIT_CACHE to move it"
    if clear:
        out_console.print(f"cleared {root}: {describe_size(clear_cache())} freed")
        return
    usage = cache_usage()
    t = Table(title=f"ropekit's cache: {root} ({where})")
    for col in ("part", "what", "size", "files"):
        t.add_column(col, justify="right" if col in ("size", "files") else "left")
    for part, (size, files) in usage.items():
        t.add_row(f"{part}/", PARTS[part], describe_size(size), str(files))
    out_console.print(t)
    total = sum(size for size, _ in usage.values())
    out_console.print(f"total {describe_size(total)}; `ropekit cache --clear` empties it (it is rebuilt when needed)")


def cache_note() -> str:
    """One line for the end of a long command: where the cache is and how large."""
    from ropekit.paths import cache_root, cache_usage, describe_size

    total = sum(size for size, _ in cache_usage().values())
    return (
        f"cache: {cache_root(create=False)} holds {describe_size(total)} (`ropekit cache` shows it, --clear empties it)"
    )


app.command("tune")(user_errors(tune_cmd))  # the command lives in ropekit.cli.tune


@app.command("methods")
def methods_cmd() -> None:
    """List the scaling methods, their parameters and papers."""
    from ropekit.plan.registry import METHODS

    t = Table(title="methods")
    t.add_column("name", no_wrap=True)
    for col in ("what it does", "parameters", "paper", "native rope_type"):
        t.add_column(col, overflow="fold")
    for m in METHODS.values():
        t.add_row(m.name, m.summary, ", ".join(m.parameters), m.paper, m.transformers_type or "—")
    out_console.print(t)


@app.command("presets")
def presets_cmd() -> None:
    """List the model presets and where their numbers come from."""
    from ropekit.plan.geometry import RopeSpec
    from ropekit.plan.presets import PRESETS

    t = Table(title="presets (figures from public config.json files)")
    t.add_column("name", no_wrap=True)
    for col in ("head_dim", "rotary", "rope_theta", "L"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("source", overflow="fold")
    for name, p in PRESETS.items():
        s = RopeSpec.from_preset(name)
        t.add_row(name, str(s.head_dim), str(s.rotary_dim), f"{s.base:g}", str(s.context_length), p.source)
    out_console.print(t)
    for name, p in PRESETS.items():
        if p.note:
            out_console.print(f"[bold]{name}[/]: {p.note}")


class _FlagHelp:
    """--help shows no `<bool>` after --help itself (a flag takes no value; `o.flag` does it for the others)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Command(_FlagHelp, typer.core.TyperCommand):
    pass


class _Group(_FlagHelp, typer.core.TyperGroup):
    pass


for _typer in (app, convert_app):
    _typer.info.cls = _Group  # (ropekit defines no command class of its own elsewhere)
    for _info in _typer.registered_commands:
        _info.cls = _Command


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM raises `Terminated` (a KeyboardInterrupt), so it cleans up exactly as Ctrl-C does; exit 143."""
    raise Terminated


def main() -> None:
    """Entry point: usage mistakes (missing or malformed options) also become one `error:` line, exit 2.
    SIGTERM is handled like Ctrl-C (partial files removed), exit 143."""
    set_command(sys.argv[1:])
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        set_command(None)


def _run() -> None:
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # typer's public base of its usage errors (no private imports)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # a bare `ropekit plan`
            print(ctx.get_help())
            raise SystemExit(0) from None
        command = ctx.command_path if ctx else "ropekit"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"error: {message} (see '{command} --help')", file=sys.stderr)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt) as exc:
        print("error: aborted", file=sys.stderr)
        raise SystemExit(getattr(exc, "exit_code", 130)) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
