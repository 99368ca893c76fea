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
import math
import os
import platform
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ropekit._version import __version__
from ropekit.choose.finish import finish
from ropekit.choose.measure import Documents, Measurer
from ropekit.choose.screen import Screened, screen_labels, screen_plans
from ropekit.choose.space import SearchSpace
from ropekit.choose.study import (
    KIND,
    MARKER,
    PASSKEY_DEPTHS,
    PENALTY,
    STORE_FILE,
    Context,
    Evaluation,
    TuneConfig,
    best_feasible,
    completed,
    progress_bar,
    read_marker,
    redact,
    storage_url,
    sync_manifest,
    write_marker,
)
from ropekit.errors import RopekitError, did_you_mean
from ropekit.eval.store import EvalStore, canonical_json, model_fingerprint, plan_fingerprint, state_fingerprint
from ropekit.output import prepare_output, remove_replaced

if TYPE_CHECKING:
    import optuna

    from ropekit.plan.scaling import Plan


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
        return finish(ctx, study)
    finally:
        ctx.measurer.store.close()
        if not cfg.worker:
            sync_manifest(Path(cfg.out))


# ---- set-up ---------------------------------------------------------------------------------------


def open_context(cfg: TuneConfig) -> Context:
    """Check the output directory, load the model and documents, open the store; refuse a study of other settings."""
    started = time.monotonic()
    out = Path(cfg.out)
    target = prepare_output(
        out,
        kind=KIND,
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
    trained = spec.context_length
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
    sync_manifest(out)
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
