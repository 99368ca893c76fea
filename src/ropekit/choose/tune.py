"""`ropekit tune`: find the plan that works best on the user's own model, by measurement.

Three stages, all resumable (every measured plan is one evaluation-store cell, every trial
a row of an optuna study in a real database):

1. **Screen** every registered method that runs from the geometry alone, plus the
   attention-factor variants (`ropekit.choose.screen`), on the tuning documents: one causal
   pass per plan over the tuning window gives NLL beyond the trained length L (the objective),
   NLL within it, and the perplexity of the first P tokens (retention).
2. **Search** the family's parameters (`ropekit.choose.space`) with optuna (TPE or CMA-ES),
   seeded with the best screened plans, minimising

       objective = NLL beyond L on the tuning window   (+ w·(1 − passkey accuracy) with --objective nll+passkey)

   subject to retention: ppl_P(plan) ≤ (1 + tolerance) · ppl_P(unscaled model). A trial first
   runs the P-token retention window alone (a few percent of a long pass); a plan that fails the
   tolerance there gets PENALTY + the excess (nats) and no long pass, so the optimiser is steered
   back to feasible plans at little cost. The best feasible trial wins.
3. **Report** on held-out documents only: the winner, its seeds and the named methods, each one
   pass per held-out document over the report window: perplexity at the target, retention, NLL
   beyond L, NLL by position, with a paired block bootstrap over position buckets and the
   spread across documents. The winner becomes the method `tuned` (`plan.json` with the study's
   provenance) with every export of `ropekit plan --out`.

Workers: any number of processes (`worker=True`) may join one study through a shared optuna
storage (`storage`, any RDB URL; SQLite in the output directory by default); each runs search
trials only. The main process screens, seeds and reports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ropekit._version import __version__
from ropekit.apply.atomic import SIGNATURE, default_modes, prepare_output, remove_replaced
from ropekit.choose.measure import Documents, Measurer
from ropekit.choose.screen import NAMED, Screened, screen_labels, screen_plans
from ropekit.choose.space import FAMILIES, SearchSpace
from ropekit.errors import RopekitError, did_you_mean
from ropekit.eval.store import EvalStore, canonical_json, model_fingerprint, plan_fingerprint, state_fingerprint

if TYPE_CHECKING:
    import optuna

    from ropekit.plan.geometry import RopeSpec
    from ropekit.plan.scaling import Plan

MARKER = "results.json"  # written at the start (status "running") and rewritten when the study finishes
STORE_FILE = "cells.sqlite"
STUDY_FILE = "study.sqlite"
PENALTY = 1000.0  # objective of a plan that fails the retention tolerance, plus its excess in nats
SAMPLERS = ("tpe", "cmaes", "random")
OBJECTIVES = ("nll", "nll+passkey")
DEFAULT_FAMILY = "ramp"  # measured: bench/tune_samplers.py (README "ropekit tune")
DEFAULT_SAMPLER = "tpe"  # measured: bench/tune_samplers.py
PASSKEY_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class TuneConfig:
    """Everything `tune` needs. Lengths in tokens; tolerance relative (0.01 = 1% perplexity)."""

    model: str  # model directory, .gguf file or hub id
    target_length: int  # L′
    data: str | list[str]  # tuning documents: text files, folders or JSONL
    held_out: str | list[str]  # held-out documents (the report is measured on these only)
    out: Path  # the study directory: written in place, rerun to continue
    window: int | None = None  # tuning window (default: L′)
    report_window: int | None = None  # held-out window (default: L′)
    family: str = DEFAULT_FAMILY
    sampler: str = DEFAULT_SAMPLER
    trials: int = 40  # search trials in the study, all workers together (screened plans not counted)
    budget_minutes: float | None = None  # this process's screen + search time; the report follows
    retention_length: int | None = None  # P (default min(2048, L/4))
    retention_tolerance: float = 0.01
    attention_range: tuple[float, float] | None = None  # default (1, 1 + 0.2·ln s)
    objective: str = "nll"
    passkey_weight: float = 1.0  # nats per unit of passkey accuracy
    passkey_trials: int = 2  # per depth, teacher-forced, at the tuning window
    screen: list[str] | None = None  # screen labels (default: all)
    seeds: int = 3  # best screened plans enqueued as the first trials
    report_methods: list[str] = field(default_factory=lambda: [m for m in NAMED])
    report_seeds: bool = True  # also report the seeds on held-out text
    storage: str | None = None  # optuna RDB URL (default: SQLite in `out`)
    study_name: str | None = None  # default: derived from the study's identity
    worker: bool = False  # search trials only: no screen, no report
    seed: int = 0
    bucket: int = 256  # tokens per position bucket (plots, bootstrap)
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise RopekitError(f"--family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.sampler not in SAMPLERS:
            raise RopekitError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.objective not in OBJECTIVES:
            raise RopekitError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.trials < 0:
            raise RopekitError(f"--trials must be ≥ 0, got {self.trials}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise RopekitError(f"--budget-minutes must be > 0, got {self.budget_minutes}")
        if not (math.isfinite(self.retention_tolerance) and self.retention_tolerance >= 0):
            raise RopekitError(f"--retention-tolerance must be ≥ 0, got {self.retention_tolerance}")
        if self.worker and self.overwrite:
            raise RopekitError("--worker joins a running study; it never starts one again (drop --overwrite)")
        if self.seeds < 0 or self.bucket < 1 or self.passkey_trials < 1:
            raise RopekitError("--seeds must be ≥ 0, --bucket and --passkey-trials ≥ 1")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise RopekitError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class Evaluation:
    """One plan measured on the tuning documents."""

    value: float  # the objective (PENALTY + excess when infeasible)
    retention_ppl: float
    retention_ratio: float  # against the unscaled model
    feasible: bool
    nll_beyond: float | None = None  # None: rejected at the retention check, no long pass
    nll_within: float | None = None
    window_ppl: float | None = None
    passkey: float | None = None

    def attrs(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Context:
    """What every stage shares: the model, its geometry, the documents and the store."""

    cfg: TuneConfig
    spec: RopeSpec
    measurer: Measurer
    tuning: Documents
    held_out: Documents
    space: SearchSpace
    window: int
    report_window: int
    retention_length: int
    identity: dict[str, Any]
    provenance: dict[str, Any]
    started: float
    reference_retention: float = math.nan
    screen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def deadline(self) -> float | None:
        minutes = self.cfg.budget_minutes
        return None if minutes is None else self.started + 60 * minutes

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def plan_of(self, factors: Sequence[float], attention_factor: float) -> Plan:
        from ropekit.plan.registry import plan as make_plan

        return make_plan(
            self.spec, self.cfg.target_length, "tuned", factors=list(factors), attention_factor=attention_factor
        )


def tune(cfg: TuneConfig) -> dict[str, Any]:
    """Screen, search and report (see the module docstring); returns the results (also results.json).

    A worker (`cfg.worker`) runs search trials only and returns a short summary.
    """
    cfg.validate()
    ctx = open_context(cfg)
    try:
        study = open_study(ctx)
        if not cfg.worker:
            if run_screen(ctx, study):  # complete: seed the search (a budget stop leaves it to the rerun)
                enqueue_seeds(ctx, study)
        else:
            ctx.screen = list(study.user_attrs.get("screen", []))
            ctx.reference_retention = float(study.user_attrs.get("reference_retention", math.nan))
            if not math.isfinite(ctx.reference_retention):
                raise RopekitError(
                    "the study has no retention reference yet: start the main `ropekit tune` process first"
                )
        run_search(ctx, study)
        if cfg.worker:
            return {"study": study.study_name, "trials": len(study.trials), "passes": ctx.measurer.passes}
        from ropekit.choose.finish import finish

        return finish(ctx, study)
    finally:
        ctx.measurer.store.close()


# ---- set-up ---------------------------------------------------------------------------------------


def open_context(cfg: TuneConfig) -> Context:
    """Check the output directory, load the model and documents, open the store; refuse a study of other settings."""
    started = time.monotonic()
    out = Path(cfg.out)
    target = prepare_output(
        out,
        overwrite=cfg.overwrite,
        inputs=(cfg.model, *paths(cfg.data), *paths(cfg.held_out)),
        in_place=True,
        existing_ok=True,
    )
    earlier = read_marker(out)
    filled = out.is_dir() and any(out.iterdir())
    if filled and earlier is None and not cfg.overwrite:  # with --overwrite: another ropekit output, replaced below
        raise RopekitError(
            f"{out} is not a `ropekit tune` study directory (no {MARKER} of a study); choose another --out"
        )
    model, tokenizer, model_path = load(cfg)
    from ropekit.apply.patch import model_spec

    spec = model_spec(model)
    trained = spec.original_length
    if cfg.target_length <= trained:
        raise RopekitError(f"--target-length {cfg.target_length} must exceed the trained length {trained}")
    window = cfg.window or cfg.target_length
    report_window = cfg.report_window or cfg.target_length
    retention = cfg.retention_length or min(2048, trained // 4)
    for name, value in (("--window", window), ("--report-window", report_window)):
        if not trained < value <= cfg.target_length:
            raise RopekitError(f"{name} {value} must lie beyond the trained length {trained} and within the target")
    if not 2 <= retention < trained:
        raise RopekitError(f"--retention-length {retention} must be at least 2 and below the trained length {trained}")
    for label in [*(cfg.screen or []), *cfg.report_methods]:  # before any measurement
        if label not in screen_labels(spec):
            raise did_you_mean("screened plan", label, screen_labels(spec))
    tuning = read_documents_for(cfg.data, tokenizer, role="tuning", length=window)
    held_out = read_documents_for(cfg.held_out, tokenizer, role="held-out", length=report_window)
    scale = cfg.target_length / trained
    space = SearchSpace(cfg.family, spec.num_pairs, scale, cfg.attention_range or (1.0, 1.0 + 0.2 * math.log(scale)))
    target.path.mkdir(parents=True, exist_ok=True)
    store = EvalStore(target.path / STORE_FILE)
    fingerprint = model_fingerprint(model_path, store) if model_path is not None else state_fingerprint(model)
    measurer = Measurer(model, store, fingerprint, trained, bucket=cfg.bucket, tokenizer=tokenizer)
    identity = study_identity(cfg, fingerprint, tuning, window, retention, space)
    if filled and (cfg.overwrite or earlier is None or earlier.get("identity") != identity):
        if not cfg.overwrite:
            store.close()
            raise RopekitError(
                f"{out} holds a study with other settings ({describe_change((earlier or {}).get('identity'), identity)}); "
                "use another --out, or --overwrite to start it again"
            )
        store.close()
        remove_replaced(target)
        target.path.mkdir(parents=True, exist_ok=True)
        store = EvalStore(target.path / STORE_FILE)
        measurer.store = store
        earlier = None
    provenance = {
        "model": str(cfg.model),
        "model_sha256": fingerprint,
        "tuning_documents": {
            "source": paths(cfg.data),
            "names": list(tuning.names),
            "tokens_sha256": tuning.fingerprint(window),
        },
        "held_out_documents": {
            "source": paths(cfg.held_out),
            "names": list(held_out.names),
            "tokens_sha256": held_out.fingerprint(report_window),
        },
        "versions": versions(),
    }
    ctx = Context(
        cfg, spec, measurer, tuning, held_out, space, window, report_window, retention, identity, provenance, started
    )
    if earlier is None:
        status = "worker" if cfg.worker else "running"
        write_marker(out, {"status": status, "identity": identity, "provenance": provenance})
    return ctx


def load(cfg: TuneConfig) -> tuple[Any, Any, Path | None]:
    """(model in float32 on the device, tokenizer, path to fingerprint) for a directory, .gguf or hub id."""
    import torch

    from ropekit.apply.extend import load_model, load_tokenizer

    source, fingerprinted = str(cfg.model), Path(cfg.model) if Path(cfg.model).exists() else None
    if source.lower().endswith(".gguf"):
        from ropekit.apply.gguf_convert import converted_dir

        source = str(converted_dir(source, progress=lambda m: print(m, file=sys.stderr)))
    model: Any = load_model(source, dtype="float32")  # transformers types .to as a wrapped method
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise RopekitError(f"{cfg.model}: no tokenizer found beside the model; tune reads text documents")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    return model, tokenizer, fingerprinted


def paths(given: str | list[str]) -> list[str]:
    return [given] if isinstance(given, (str, os.PathLike)) else [str(p) for p in given]


def read_documents_for(given: str | list[str], tokenizer: Any, *, role: str, length: int) -> Documents:
    """Tokenised documents holding at least `length` tokens (shorter ones are left out, with a note)."""
    from ropekit.data.documents import read_documents, tokenize_documents

    path = ", ".join(paths(given))
    docs = [doc for p in paths(given) for doc in read_documents(p)]
    if not docs:
        raise RopekitError(f"no {role} documents given")
    ids = tokenize_documents(docs, tokenizer)
    kept = [(name, d) for (name, _), d in zip(docs, ids) if len(d) >= length]
    if not kept:
        longest = max(len(d) for d in ids)
        raise RopekitError(
            f"{path}: no {role} document holds the {length:,}-token window (longest {longest:,} tokens); "
            "give longer documents or a shorter window"
        )
    if len(kept) < len(docs):
        print(
            f"note: {len(docs) - len(kept)} {role} document(s) shorter than {length:,} tokens left out", file=sys.stderr
        )
    return Documents(role, path, tuple(n for n, _ in kept), tuple(d for _, d in kept))


def study_identity(
    cfg: TuneConfig, fingerprint: str, tuning: Documents, window: int, retention: int, space: SearchSpace
) -> dict[str, Any]:
    """What makes two runs the same study: model, target, tuning windows, objective, constraint, family."""
    identity: dict[str, Any] = {
        "model_sha256": fingerprint,
        "target_length": cfg.target_length,
        "tuning_tokens_sha256": tuning.fingerprint(window),
        "window": window,
        "retention_length": retention,
        "retention_tolerance": cfg.retention_tolerance,
        "objective": cfg.objective,
        "family": space.family,
        "attention_range": list(space.attention_range),
        "bucket": cfg.bucket,
    }
    if cfg.objective == "nll+passkey":
        identity["passkey"] = {"weight": cfg.passkey_weight, "trials": cfg.passkey_trials}
    return identity


def study_name(identity: dict[str, Any]) -> str:
    return "ropekit-tune-" + hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:12]


def describe_change(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "unreadable settings"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "changed: " + ", ".join(changed)


def read_marker(out: Path) -> dict[str, Any] | None:
    path = out / MARKER
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("kind") == "ropekit tune" else None


def write_marker(out: Path, record: dict[str, Any]) -> None:
    write_json_atomically(out / MARKER, {**SIGNATURE, "kind": "ropekit tune", "ropekit_version": __version__, **record})


def write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.chmod(tmp, default_modes()[1])
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    import optuna
    import torch
    import transformers

    return {
        "ropekit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "optuna": optuna.__version__,
        "python": platform.python_version(),
    }


# ---- the study ------------------------------------------------------------------------------------


def storage_url(ctx: Context) -> str:
    return ctx.cfg.storage or f"sqlite:///{(Path(ctx.cfg.out) / STUDY_FILE).resolve()}"


def redact(url: str) -> str:
    """An RDB URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (any unparsable URL is shown as its scheme only)
        return url.split(":", 1)[0] + ":…"


def open_study(ctx: Context) -> optuna.Study:
    """Create or load the study (refusing one of other settings); workers only load."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(ctx)
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental; they are what recovers a killed worker
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs={"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None,
                heartbeat_interval=60,
                grace_period=180,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except Exception as exc:  # noqa: BLE001 (sqlalchemy/driver errors: one line for the user)
        raise RopekitError(f"cannot open the study storage {redact(url)} ({str(exc).splitlines()[0]})") from None
    name = ctx.cfg.study_name or study_name(ctx.identity)
    if ctx.cfg.worker:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise RopekitError(
                f"no study {name!r} in {redact(url)}: start the main `ropekit tune` process first (same settings)"
            ) from None
    else:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
    found = study.user_attrs.get("identity")
    if found is None and not ctx.cfg.worker:
        study.set_user_attr("identity", ctx.identity)
    elif found != ctx.identity:
        raise RopekitError(
            f"study {name!r} in {redact(url)} was made with other settings ({describe_change(found, ctx.identity)})"
        )
    return study


def evaluate(ctx: Context, plan: Plan, *, gate: bool) -> Evaluation:
    """The objective of one plan on the tuning documents (see the module docstring)."""
    P = ctx.retention_length
    short = ctx.measurer.window(plan, ctx.tuning, P, prefixes=(P,))
    retention = float(short["prefix_ppl"][str(P)])
    ratio = retention / ctx.reference_retention
    excess = math.log(ratio) - math.log1p(ctx.cfg.retention_tolerance)
    feasible = excess <= 0
    if gate and not feasible:
        return Evaluation(PENALTY + excess, retention, ratio, False)
    long = ctx.measurer.window(plan, ctx.tuning, ctx.window, prefixes=(P,))
    nll_beyond = float(long["nll_beyond"])
    value = nll_beyond
    passkey = None
    if ctx.cfg.objective == "nll+passkey":
        passkey = ctx.measurer.passkey(
            plan, length=ctx.window, depths=PASSKEY_DEPTHS, trials=ctx.cfg.passkey_trials, seed=ctx.cfg.seed
        )
        value += ctx.cfg.passkey_weight * (1.0 - passkey)
    if not feasible:
        value = PENALTY + excess
    return Evaluation(
        value, retention, ratio, feasible, nll_beyond, float(long["nll_within"]), math.exp(long["nll"]), passkey
    )


def run_screen(ctx: Context, study: optuna.Study) -> bool:
    """Measure every screened plan once (the store remembers them) and record them in the study;
    False when the budget ran out first."""
    plans = screen_plans(ctx.spec, ctx.cfg.target_length, ctx.cfg.screen)
    P = ctx.retention_length
    reference = ctx.measurer.window(plans[0].plan, ctx.tuning, P, prefixes=(P,))  # `none`
    ctx.reference_retention = float(reference["prefix_ppl"][str(P)])
    study.set_user_attr("reference_retention", ctx.reference_retention)
    bar = progress_bar(ctx, total=len(plans), desc="screen", unit="plan")
    rows: list[dict[str, Any]] = []
    for item in plans:
        if ctx.out_of_time() and rows:  # `none`, first, is always screened
            print(
                f"note: the budget ran out while screening; {item.label} and later plans not screened", file=sys.stderr
            )
            break
        bar.set_postfix_str(item.label)
        ev = evaluate(ctx, item.plan, gate=False)
        rows.append(screen_row(item, ev))
        bar.update(1)
    bar.close()
    ctx.screen = rows
    study.set_user_attr("screen", rows)
    return len(rows) == len(plans)


def screen_row(item: Screened, ev: Evaluation) -> dict[str, Any]:
    return {
        "label": item.label,
        "method": item.method,
        "params": item.params,
        "attention_override": item.attention_override,
        "factors": list(item.plan.factors),
        "attention_factor": item.plan.attention_factor,
        "plan": plan_fingerprint(item.plan),
        **ev.attrs(),
    }


def enqueue_seeds(ctx: Context, study: optuna.Study) -> None:
    """Enqueue the best screened plans (by NLL beyond L, and the best feasible one) once per study."""
    if study.user_attrs.get("seeded") or not ctx.cfg.seeds:
        return
    chosen = choose_seeds(ctx.screen, ctx.cfg.seeds)
    seeds = []
    for row in chosen:
        params = ctx.space.project(row["factors"], row["attention_factor"])
        study.enqueue_trial(params, user_attrs={"seed": row["label"]}, skip_if_exists=True)
        seeds.append({"label": row["label"], "params": params})
    study.set_user_attr("seeds", seeds)
    study.set_user_attr("seeded", True)


def choose_seeds(screen: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The `count` screened plans best beyond L, then the best feasible plan if it is not among them."""
    measured = [r for r in screen if r.get("nll_beyond") is not None and r["label"] != "none"]
    best = sorted(measured, key=lambda r: r["nll_beyond"])[:count]
    feasible = sorted((r for r in measured if r["feasible"]), key=lambda r: r["nll_beyond"])
    if feasible and feasible[0] not in best:
        best.append(feasible[0])
    return best


def make_sampler(ctx: Context, study: optuna.Study) -> optuna.samplers.BaseSampler:
    """The sampler, seeded per process (seed + trials so far + worker pid), so workers and resumed runs differ."""
    import optuna

    seed = ctx.cfg.seed + len(study.trials) + (os.getpid() if ctx.cfg.worker else 0)
    if ctx.cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if ctx.cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(ctx.cfg.trials // 4, 1)))
    best = best_seed_params(ctx, study)
    return optuna.samplers.CmaEsSampler(x0=best, sigma0=None, seed=seed, warn_independent_sampling=False)


def best_seed_params(ctx: Context, study: optuna.Study) -> dict[str, float] | None:
    """CMA-ES starts from the best completed trial (a seed at first), clipped into the space."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.params]
    if not done:
        seeds = study.user_attrs.get("seeds") or []
        return dict(seeds[0]["params"]) if seeds else None
    best = min(done, key=lambda t: t.value if t.value is not None else math.inf)
    return {k: float(v) for k, v in best.params.items() if k in ctx.space.bounds()}


def completed(study: optuna.Study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def run_search(ctx: Context, study: optuna.Study) -> None:
    """Search trials until the study holds `trials` complete ones or this process's budget is spent."""

    remaining = ctx.cfg.trials - completed(study)
    if remaining <= 0 or ctx.out_of_time():
        return
    sampler = make_sampler(ctx, study)
    study.sampler = sampler
    bar = progress_bar(ctx, total=ctx.cfg.trials, desc=f"search ({ctx.cfg.family}, {ctx.cfg.sampler})", unit="trial")
    bar.update(completed(study))
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        candidate = ctx.space.suggest(trial)
        plan = ctx.plan_of(candidate.factors, candidate.attention_factor)
        ev = evaluate(ctx, plan, gate=True)
        attrs = {
            **ev.attrs(),
            "factors": list(plan.factors),
            "attention_factor": plan.attention_factor,
            "plan": plan_fingerprint(plan),
            "worker": worker,
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("sampler", ctx.cfg.sampler)
        return ev.value

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.n = completed(study)
        best = best_feasible(study)
        bar.set_postfix_str("best NLL beyond L " + ("—" if best is None else f"{best.value:.4f}"))
        bar.refresh()
        if completed(study) >= ctx.cfg.trials:
            study.stop()

    timeout = None if ctx.deadline is None else max(ctx.deadline - time.monotonic(), 1.0)
    try:
        study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=[after], gc_after_trial=False)
    finally:
        bar.close()
    if completed(study) < ctx.cfg.trials and ctx.out_of_time():
        print(
            f"note: the budget ran out after {completed(study)} of {ctx.cfg.trials} search trials; "
            "rerun the same command to continue the study",
            file=sys.stderr,
        )


def best_feasible(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    feasible = [t for t in done if t.user_attrs.get("feasible") and t.value is not None]
    return min(feasible, key=lambda t: float(t.value)) if feasible else None  # type: ignore[arg-type]


def progress_bar(ctx: Context, *, total: int, desc: str, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not ctx.cfg.progress, file=sys.stderr, dynamic_ncols=True)
