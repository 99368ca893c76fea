"""`ropekit eval`: one model, several methods side by side, perplexity and passkey tasks.

Every protocol parameter goes into results.json. Files are written into a temporary sibling
directory and renamed into place at the end, so an interrupted or failed run never leaves a
results file that looks complete.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ropekit._version import __version__
from ropekit.apply.extend import load_model, load_tokenizer
from ropekit.apply.patch import apply, model_spec
from ropekit.apply.readers import load_config_dict
from ropekit.data.documents import read_documents, tokenize_documents
from ropekit.errors import RopekitError
from ropekit.eval.longbench import CHAT_MODES as LONGBENCH_CHAT_MODES
from ropekit.eval.longbench import load_longbench, load_prompt_config, run_longbench
from ropekit.eval.longppl import Evaluator, long_ppl
from ropekit.eval.passkey import SCORERS as PASSKEY_SCORERS
from ropekit.eval.passkey import STYLES as PASSKEY_STYLES
from ropekit.eval.passkey import build_prompt, passkey_grid, read_task_line
from ropekit.eval.perplexity import CONVENTIONS, perplexity
from ropekit.eval.ruler import TASKS as RULER_TASKS
from ropekit.eval.ruler import get_task as get_ruler_task
from ropekit.eval.ruler import make_sample as make_ruler_sample
from ropekit.eval.ruler import read_essay as read_ruler_essay
from ropekit.eval.ruler import run_ruler
from ropekit.eval.ruler import runnable_tasks as runnable_ruler_tasks
from ropekit.eval.ruler_qa import load_qa
from ropekit.output import OutputTarget, atomic_directory, prepare_output
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.registry import get_method
from ropekit.plan.registry import plan as make_plan

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


TASKS = ("ppl", "longppl", "passkey", "ruler", "longbench")
AS_SAVED = "as-saved"  # the model exactly as loaded, no plan applied


@dataclass
class EvalConfig:
    model: str  # model directory or hub id
    out: Path | None  # report directory; None: return the results and write nothing
    tasks: list[str] = field(default_factory=lambda: ["ppl"])
    lengths: list[int] = field(default_factory=lambda: [512])
    methods: list[str] = field(default_factory=list)  # empty: evaluate the model as saved
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # method → its parameters
    target_length: int | None = None  # plan target; default: the largest length
    bins: int = 360  # histogram bins K for the plans' disturbance (and dprope's per-pair choice)
    data: str | None = None  # documents for perplexity
    max_tokens: int | None = 16384  # perplexity reads at most this many tokens per document
    convention: str = "strided"
    stride: int = 256
    short_length: int = 4096  # longppl: short context, tokens (official default)
    longppl_window: int = 1024  # longppl: tokens sharing one short context (official sliding window)
    longppl_threshold: float = 2.0  # longppl: α, long − short log-prob difference, nats
    longppl_beta: float = -2.0  # longppl: β, floor on the long-context log-prob, nats
    evaluator: str | None = None  # longppl: key-token evaluator model; None: the model under test
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 5  # passkey trials per cell; RULER samples per cell
    passkey_scorer: str = "generation"  # or "teacher-forced"
    passkey_style: str = "yarn"  # or "compact" (ropekit's earlier prompt)
    passkey_task_file: str | None = None  # text file holding the task line; default: ropekit's wording
    ruler_tasks: list[str] = field(default_factory=lambda: list(RULER_TASKS))
    ruler_essay: str | None = None  # essay haystack (text file or folder); default: --data
    ruler_qa_dir: str | None = None  # folder with SQuAD / HotpotQA files for qa_1 / qa_2
    longbench_dir: str | None = None  # folder of LongBench-E JSONL files
    longbench_datasets: list[str] = field(default_factory=list)  # empty: every known file in the folder
    longbench_config: str | None = None  # folder with LongBench's dataset2prompt.json / dataset2maxlen.json
    longbench_max_length: int | None = None  # prompt tokens before middle truncation; default: LongBench's rule
    longbench_chat: str = "auto"  # chat template: auto (when the tokenizer has one), on, off
    seed: int = 0
    progress: bool = True
    overwrite: bool = False  # replace an earlier ropekit report at `out` (never anything else)
    source_gguf: str | None = None  # set when `model` is the cached conversion of this GGUF
    backend: str = "transformers"  # or "llama.cpp": perplexity of a .gguf in llama.cpp itself

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise RopekitError(f"unknown task {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(TASKS)}")
        if {"ppl", "longppl"} & set(self.tasks) and not self.data:
            raise RopekitError(
                "the ppl and longppl tasks need --data (a text file, a folder, or JSONL with a 'text' field)"
            )
        if self.convention not in CONVENTIONS:
            raise RopekitError(f"--convention must be one of {', '.join(CONVENTIONS)}")
        if not self.lengths or min(self.lengths) < 2:
            raise RopekitError("--lengths must be positive token counts ≥ 2")
        for m in self.methods:
            get_method(m)
        for t in self.ruler_tasks if "ruler" in self.tasks else []:
            get_ruler_task(t)
        if "longbench" in self.tasks and not self.longbench_dir:
            raise RopekitError("the longbench task needs --longbench-dir (a folder of LongBench-E JSONL files)")
        if self.longbench_chat not in LONGBENCH_CHAT_MODES:
            raise RopekitError(f"--longbench-chat must be one of {', '.join(LONGBENCH_CHAT_MODES)}")
        if self.max_tokens is not None and self.max_tokens < max(self.lengths):
            raise RopekitError(f"--max-tokens {self.max_tokens} is below the longest length {max(self.lengths)}")
        if self.passkey_scorer not in PASSKEY_SCORERS or self.passkey_style not in PASSKEY_STYLES:
            raise RopekitError(
                f"--passkey-scorer must be one of {', '.join(PASSKEY_SCORERS)} and --passkey-style one of "
                f"{', '.join(PASSKEY_STYLES)}"
            )
        if self.trials < 1:
            raise RopekitError("--trials must be ≥ 1")
        if "passkey" in self.tasks and not all(0.0 <= d <= 1.0 for d in self.depths):
            raise RopekitError(f"--depths must lie in [0, 1], got {self.depths}")
        if self.backend not in ("transformers", "llama.cpp"):
            raise RopekitError(f"--backend must be transformers or llama.cpp, got {self.backend!r}")
        if self.backend == "llama.cpp" and (
            set(self.tasks) != {"ppl"} or not str(self.model).lower().endswith(".gguf")
        ):
            raise RopekitError("--backend llama.cpp scores perplexity (--tasks ppl) of a .gguf MODEL")


def context_limit(cfg: EvalConfig) -> int:
    """The longest length a run may ask for: the plan target, else the model's max_position_embeddings."""
    if cfg.methods:
        return cfg.target_length or max(cfg.lengths)
    if str(cfg.model).lower().endswith(".gguf"):
        from ropekit.apply.gguf import read_rope

        return read_rope(cfg.model).context_length
    return int(load_config_dict(cfg.model).get("max_position_embeddings") or 0)


def plan_entry(plan, bins: int) -> dict[str, Any]:
    """What results.json records of a method's plan: target, per-pair factors, attention factor, disturbance (at K bins)."""
    return {
        "target_length": plan.target_length,
        "factors": list(plan.factors),
        "attention_factor": plan.attention_factor,
        "disturbance": plan.disturbance,
        "bins": bins,
    }


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every task for every method; with `cfg.out`, write results.json, results.csv, report.md and plots."""
    cfg.validate()
    target = None
    if cfg.out is not None:  # before any work
        target = prepare_output(
            cfg.out, overwrite=cfg.overwrite, marker="results.json", inputs=(cfg.model, cfg.data, cfg.longbench_dir)
        )
    limit = context_limit(cfg)  # from the config alone: refuse before loading any weights
    if max(cfg.lengths) > limit:
        raise RopekitError(
            f"length {max(cfg.lengths)} is beyond this run's limit of {limit} tokens "
            "(raise --target-length, or evaluate a model extended that far)"
        )
    if cfg.backend == "llama.cpp":
        from ropekit.eval.llamacpp import evaluate_llama_cpp

        return evaluate_llama_cpp(cfg, limit)
    if str(cfg.model).lower().endswith(".gguf"):  # evaluate a GGUF through its dequantised transformers copy
        from ropekit.apply.gguf_convert import converted_dir

        cfg = replace(cfg, model=str(converted_dir(cfg.model)), source_gguf=str(cfg.model))
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise RopekitError(f"{cfg.model}: no tokenizer found beside the model")
    if "ruler" in cfg.tasks:
        check_ruler_fits(cfg, tokenizer)
    if "passkey" in cfg.tasks:
        check_passkey_fits(cfg, tokenizer)
    if "longbench" in cfg.tasks:
        longbench_dir = required(cfg.longbench_dir, "--longbench-dir", "longbench")
        longbench = load_longbench(longbench_dir, cfg.longbench_datasets or None)
        prompt_config = load_prompt_config(longbench_dir, cfg.longbench_config) if longbench else None
    else:
        longbench, prompt_config = {}, None
    needs_text = {"ppl", "longppl"} & set(cfg.tasks)
    documents = (
        tokenize_documents(read_documents(required(cfg.data, "--data", "ppl/longppl")), tokenizer) if needs_text else []
    )
    documents = [doc[: cfg.max_tokens] for doc in documents] if cfg.max_tokens else documents
    evaluator = load_evaluator(cfg.evaluator) if "longppl" in cfg.tasks and cfg.evaluator else None
    results: dict[str, Any] = {
        "ropekit_version": __version__,
        "config": _jsonable(asdict(cfg)),
        "trained_length": _trained_length(cfg.model),
        "methods": {},
        "warnings": [],
    }
    if "ppl" in cfg.tasks:
        results["warnings"] += short_document_warnings(documents, cfg.lengths)
    methods = cfg.methods or [AS_SAVED]
    overall = _progress_bar(cfg, total=len(methods) * len(cfg.tasks))
    try:
        for method in methods:
            results["methods"][method] = run_method(
                cfg,
                method,
                limit=limit,
                tokenizer=tokenizer,
                documents=documents,
                longbench=longbench,
                prompt_config=prompt_config,
                evaluator=evaluator,
                overall=overall,
            )
    finally:
        if overall is not None:
            overall.close()
    results["warnings"] += non_finite_warnings(result_rows(results))
    for line in results["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    if target is not None:
        write_report(results, target)
    return results


def required(value: str | None, flag: str, task: str) -> str:
    """`value`, or one clear error naming the option the task needs."""
    if value is None:
        raise RopekitError(f"--tasks {task} needs {flag}")
    return value


def run_method(
    cfg: EvalConfig,
    method: str,
    *,
    limit: int,
    tokenizer: PreTrainedTokenizerBase,
    documents: list,
    longbench: dict,
    prompt_config=None,
    evaluator=None,
    overall=None,
) -> dict[str, Any]:
    """Every task of `cfg` for one method (AS_SAVED: the model as loaded); its results entry."""
    model = load_model(cfg.model, dtype="float32")
    entry: dict[str, Any] = {}
    if method != AS_SAVED:
        plan = make_plan(model_spec(model), limit, method, bins=cfg.bins, **cfg.method_params.get(method, {}))
        apply(model, plan)
        entry["plan"] = plan_entry(plan, cfg.bins)
    show: dict[str, Any] = dict(progress=cfg.progress, label=method)
    for task in cfg.tasks:
        if overall is not None:
            overall.set_description(f"eval: {method} · {task}")
        if task == "ppl":
            entry["ppl"] = {
                str(n): perplexity(
                    model, documents, length=n, convention=cfg.convention, stride=min(cfg.stride, n), **show
                ).as_dict()
                for n in cfg.lengths
            }
        elif task == "longppl":
            entry["longppl"] = {
                str(n): long_ppl(
                    model,
                    documents,
                    length=n,
                    short_length=cfg.short_length,
                    sliding_window=cfg.longppl_window,
                    threshold=cfg.longppl_threshold,
                    beta=cfg.longppl_beta,
                    evaluator=evaluator,
                    tokenizer=tokenizer,
                ).as_dict()
                for n in cfg.lengths
                if n > cfg.short_length
            }
        elif task == "passkey":
            entry["passkey"] = passkey_grid(
                model,
                tokenizer,
                lengths=cfg.lengths,
                depths=cfg.depths,
                trials=cfg.trials,
                seed=cfg.seed,
                scorer=cfg.passkey_scorer,
                style=cfg.passkey_style,
                task_file=cfg.passkey_task_file,
                **show,
            ).as_dict()
        elif task == "ruler":
            entry["ruler"] = run_ruler(
                model,
                tokenizer,
                tasks=cfg.ruler_tasks,
                lengths=cfg.lengths,
                samples=cfg.trials,
                seed=cfg.seed,
                essay_path=ruler_essay_path(cfg),
                qa_dir=cfg.ruler_qa_dir,
                **show,
            ).as_dict()
        elif task == "longbench" and longbench:
            entry["longbench"] = run_longbench(
                model,
                tokenizer,
                longbench,
                window=limit,
                max_length=cfg.longbench_max_length,
                config=prompt_config,
                chat=cfg.longbench_chat,
                **show,
            ).as_dict()
        if overall is not None:
            overall.update(1)
    return entry


def _progress_bar(cfg: EvalConfig, *, total: int):
    """The whole-eval bar (one unit per method × task), above each task's own bar."""
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="task", position=0)


def _trained_length(model: str) -> int | None:
    """The context the model was trained at (its spec's original length), for plots and reports."""
    try:
        return RopeSpec.from_pretrained(model).context_length
    except RopekitError:
        return None


def short_document_warnings(documents: list, lengths: list[int]) -> list[str]:
    """One line per window length that some documents do not fill (their perplexity uses fewer tokens)."""
    out = []
    for n in lengths:
        short = [len(d) for d in documents if len(d) < n]
        if short:
            out.append(
                f"{len(short)} of {len(documents)} documents are shorter than the {n}-token window "
                f"(shortest {min(short)} tokens); perplexity @ {n} scores them with less context"
            )
    return out


def non_finite_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One line per result that is NaN or inf (e.g. a model with NaN weights)."""
    return [
        f"{r['method']} · {r['task']} @ {r['length'] or r['depth']}: non-finite result ({r['value']}); "
        "check the model's weights"
        for r in rows
        if isinstance(r["value"], float) and not math.isfinite(r["value"])
    ]


def check_passkey_fits(cfg: EvalConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse, before any weights load, a passkey prompt that cannot fit the shortest length."""
    try:
        task_line = read_task_line(cfg.passkey_task_file)[0] if cfg.passkey_style == "yarn" else ""
        build_prompt(tokenizer, min(cfg.lengths), 0.0, 12345, style=cfg.passkey_style, task_line=task_line)
    except RopekitError as exc:
        raise RopekitError(f"passkey at {min(cfg.lengths)} tokens: {exc}; use longer --lengths") from None


def load_evaluator(path: str) -> Evaluator:
    """The LongPPL key-token evaluator: a model (as saved) and its own tokenizer."""
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise RopekitError(f"--evaluator {path}: no tokenizer found beside the model")
    return Evaluator(load_model(path, dtype="float32"), tokenizer, path)


def ruler_essay_path(cfg: EvalConfig) -> str | None:
    """RULER's essay haystack: --ruler-essay, else the --data documents."""
    return cfg.ruler_essay or cfg.data


def check_ruler_fits(cfg: EvalConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse, before any weights load, a runnable RULER task whose prompt cannot fit the shortest length."""
    shortest = min(cfg.lengths)
    essay = read_ruler_essay(ruler_essay_path(cfg))
    tasks, _ = runnable_ruler_tasks(cfg.ruler_tasks, essay=essay, qa_dir=cfg.ruler_qa_dir)
    for task in tasks:
        qa = load_qa(cfg.ruler_qa_dir, task.dataset) if task.kind == "qa" else None  # a bad file: its own error
        try:
            make_ruler_sample(task, tokenizer, shortest, 0, essay=essay, qa=qa)
        except RopekitError:
            raise RopekitError(
                f"RULER task {task.name} does not fit in {shortest} tokens with this tokenizer; "
                "use longer --lengths or drop it from --ruler-tasks"
            ) from None


def _finite_or_null(value: Any) -> Any:
    """NaN and inf become null, so results.json stays standard JSON (the warnings name them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def _jsonable(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def best_by_length(rows: list[dict[str, Any]]) -> list[str]:
    """The best method per length: lowest perplexity, highest passkey accuracy (mean over depths)."""
    lines = []
    for task, better, unit in (("ppl", min, "perplexity"), ("passkey", max, "passkey accuracy")):
        cells: dict[int, dict[str, list[float]]] = {}
        for r in rows:
            if r["task"] == task and isinstance(r["value"], float) and math.isfinite(r["value"]):
                cells.setdefault(r["length"], {}).setdefault(r["method"], []).append(r["value"])
        for n, by_method in sorted(cells.items()):
            if len(by_method) > 1:
                means = {m: sum(v) / len(v) for m, v in by_method.items()}
                best = better(means, key=lambda m: means[m])
                shown = f"{means[best]:.0%}" if task == "passkey" else f"{means[best]:.4g}"
                tie = len(set(means.values())) == 1
                lines.append(f"best {unit} @ {n}: " + (f"all methods tie ({shown})" if tie else f"{best} ({shown})"))
    return lines


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows: method, task, length, (depth), value."""
    rows = []
    for method, entry in results["methods"].items():
        for n, r in entry.get("ppl", {}).items():
            rows.append(
                {
                    "method": method,
                    "task": "ppl",
                    "length": int(n),
                    "depth": "",
                    "value": r["perplexity"],
                    "convention": r["convention"],
                    "stride": r["stride"],
                    "tokens_scored": r["tokens_scored"],
                }
            )
        for n, r in entry.get("longppl", {}).items():
            rows.append(
                {
                    "method": method,
                    "task": "longppl",
                    "length": int(n),
                    "depth": "",
                    "value": r["long_ppl"],
                    "convention": f"short {r['short_length']}/{r['sliding_window']}, α {r['threshold']}, β {r['beta']}, "
                    f"evaluator {r['evaluator']}",
                    "stride": "",
                    "tokens_scored": r["key_tokens"],
                }
            )
        for cell, value in entry.get("ruler", {}).get("score", {}).items():
            task, n = cell.split("@")
            rows.append(
                {
                    "method": method,
                    "task": f"ruler:{task}",
                    "length": int(n),
                    "depth": "",
                    "value": value,
                    "convention": f"{get_ruler_task(task).metric} ×100",
                    "stride": "",
                    "tokens_scored": "",
                }
            )
        for dataset, buckets in entry.get("longbench", {}).get("scores", {}).items():
            for bucket, value in buckets.items():
                rows.append(
                    {
                        "method": method,
                        "task": f"longbench:{dataset}",
                        "length": "",
                        "depth": bucket,
                        "value": value,
                        "convention": "LongBench-E metric ×100",
                        "stride": "",
                        "tokens_scored": "",
                    }
                )
        pk = entry.get("passkey")
        if pk:
            for cell, acc in pk["accuracy"].items():
                n, d = cell.split("@")
                rows.append(
                    {
                        "method": method,
                        "task": "passkey",
                        "length": int(n),
                        "depth": float(d),
                        "value": acc,
                        "convention": pk["scorer"],
                        "stride": "",
                        "tokens_scored": "",
                    }
                )
    return rows


def write_report(results: dict[str, Any], out: OutputTarget | Path) -> None:
    """results.json (the marker), results.csv, report.md and plots, written atomically to `out`."""
    from ropekit.eval.report import markdown_report, plot_passkey_heatmaps, plot_ppl

    rows = result_rows(results)
    with atomic_directory(out, marker="results.json") as tmp:
        figures = []
        if any(r["task"] == "ppl" for r in rows):
            figures.append(plot_ppl(rows, tmp / "ppl_vs_length.png", trained_length=results.get("trained_length")))
        if any(r["task"] == "passkey" for r in rows):
            figures.append(plot_passkey_heatmaps(results, tmp / "passkey_heatmaps.png"))
        with (tmp / "results.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "report.md").write_text(markdown_report(results, rows, [f.name for f in figures]))
        (tmp / "results.json").write_text(json.dumps(_finite_or_null(results), indent=2) + "\n")
