"""`ropekit tune`: the command line over `ropekit.tune` (registered in `ropekit.cli.main`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ropekit.choose.screen import NAMED
from ropekit.choose.tune import TuneConfig
from ropekit.cli import options as o
from ropekit.errors import RopekitError


def _default(name: str) -> Any:
    """TuneConfig's default for `name`: each default is written once, there."""
    return TuneConfig.__dataclass_fields__[name].default


REPORTED = ",".join(label for label in NAMED if label not in ("none", "yarn"))  # none and yarn are always reported
SEARCH = "Search"
STUDY = "Study and workers"
REPORT = "Report"


def tune_cmd(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="Model directory, .gguf file (dequantised once) or hub id.")
    ],
    target_length: o.TargetLength,
    data: Annotated[
        list[str],
        typer.Option("--data", help="Tuning documents: text file, folder or JSONL (repeat for more)."),
    ],
    held_out: Annotated[
        list[str],
        typer.Option(
            "--held-out",
            help="Held-out documents the report is measured on, never tuned on (repeat for more). Required: "
            "split your text yourself, e.g. one book to tune on and others to report on.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Study directory: new, or the same one to continue the study (rerun after Ctrl-C or a budget stop).",
        ),
    ],
    window: Annotated[
        int | None,
        typer.Option(
            "--window",
            help="Tuning window in tokens (default: the target; shorter is cheaper).",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    family: Annotated[
        str,
        typer.Option(
            "--family",
            help="ramp (3 parameters: ramp start and width, attention factor; fast pairs kept at 1), monotone "
            "(a factor per pair, non-decreasing with wavelength: LongRoPE's constraint) or per-pair (a factor per "
            "pair, unconstrained).",
            rich_help_panel=SEARCH,
        ),
    ] = _default("family"),
    sampler: Annotated[
        str, typer.Option("--sampler", help="tpe, cmaes or random (optuna).", rich_help_panel=SEARCH)
    ] = _default("sampler"),
    trials: Annotated[
        int,
        typer.Option("--trials", help="Search trials in the study, all workers together.", rich_help_panel=SEARCH),
    ] = _default("trials"),
    budget_minutes: Annotated[
        float | None,
        typer.Option(
            "--budget-minutes",
            help="This process's time for screening and search; it stops cleanly after the current plan, then "
            "reports. Rerun to continue.",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    retention_length: Annotated[
        int | None,
        typer.Option(
            "--retention-length",
            help="P: retention is the perplexity of the first P tokens (default min(2048, L/4)).",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    retention_tolerance: Annotated[
        float,
        typer.Option(
            "--retention-tolerance",
            help="Largest relative rise of the retention perplexity over the unscaled model's (0.01 = 1%).",
            rich_help_panel=SEARCH,
        ),
    ] = _default("retention_tolerance"),
    attention_range: Annotated[
        str | None,
        typer.Option(
            "--attention-range", help="LO:HI of the attention factor (default 1:1+0.2·ln s).", rich_help_panel=SEARCH
        ),
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            "--objective",
            help="nll (NLL beyond the trained length) or nll+passkey (adds --passkey-weight × (1 − teacher-forced "
            "passkey accuracy) at the tuning window).",
            rich_help_panel=SEARCH,
        ),
    ] = _default("objective"),
    passkey_weight: Annotated[
        float, typer.Option("--passkey-weight", help="Nats per unit of passkey accuracy.", rich_help_panel=SEARCH)
    ] = _default("passkey_weight"),
    passkey_trials: Annotated[
        int, typer.Option("--passkey-trials", help="Passkey trials per depth (5 depths).", rich_help_panel=SEARCH)
    ] = _default("passkey_trials"),
    screen: Annotated[
        str,
        typer.Option(
            "--screen",
            help="Comma-separated plans to screen (default: every method that runs from the geometry, plus "
            "dprope-n, yarn-a1 and M+a variants with YaRN's attention factor).",
            rich_help_panel=SEARCH,
        ),
    ] = "",
    seeds: Annotated[
        int, typer.Option("--seeds", help="Best screened plans enqueued as the first trials.", rich_help_panel=SEARCH)
    ] = _default("seeds"),
    seed: Annotated[int, typer.Option("--seed", help="Sampler seed.", rich_help_panel=SEARCH)] = _default("seed"),
    report_window: Annotated[
        int | None,
        typer.Option(
            "--report-window", help="Held-out window in tokens (default: the target).", rich_help_panel=REPORT
        ),
    ] = None,
    report_methods: Annotated[
        str,
        typer.Option(
            "--report-methods",
            help="Screened plans measured on held-out text beside the tuned plan, its seeds, none and yarn.",
            rich_help_panel=REPORT,
        ),
    ] = REPORTED,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="optuna RDB URL shared by workers, e.g. postgresql://user@host/db (default: SQLite in --out).",
            rich_help_panel=STUDY,
        ),
    ] = None,
    study_name: Annotated[
        str | None,
        typer.Option("--study-name", help="Default: derived from the study's settings.", rich_help_panel=STUDY),
    ] = None,
    worker: Annotated[
        bool,
        typer.Option(
            "--worker",
            help="Join a running study and run search trials only (no screen, no report).",
            rich_help_panel=STUDY,
        ),
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = _default("device"),
    overwrite: o.Overwrite = False,
) -> None:
    """Find the plan that works best on your model at the target length, by measurement.

    Screens every method on --data (one causal pass per plan: NLL beyond the trained length,
    NLL within it, retention), searches per-pair factors and the attention factor with optuna
    from the best screened plans, and reports on --held-out text only. The winner is the method
    `tuned`: apply it with `ropekit extend MODEL --method tuned --from-study OUT ...`.
    """
    from ropekit.choose.tune import tune

    cfg = TuneConfig(
        model=model,
        target_length=target_length,
        data=data,
        held_out=held_out,
        out=out,
        window=window,
        report_window=report_window,
        family=family,
        sampler=sampler,
        trials=trials,
        budget_minutes=budget_minutes,
        retention_length=retention_length,
        retention_tolerance=retention_tolerance,
        attention_range=_range(attention_range),
        objective=objective,
        passkey_weight=passkey_weight,
        passkey_trials=passkey_trials,
        screen=_names(screen) or None,
        seeds=seeds,
        report_methods=_names(report_methods),
        storage=storage,
        study_name=study_name,
        worker=worker,
        seed=seed,
        device=device,
        overwrite=overwrite,
    )
    results = tune(cfg)
    console = Console()
    if worker:
        console.print(f"worker done: study {results['study']} holds {results['trials']} trials")
        return
    console.print(ranking_table(results))
    tuned = results["tuned"]
    console.print(
        f"tuned: {'meets' if tuned['feasible'] else 'does NOT meet'} the retention tolerance on the tuning text; "
        f"written to {out}/ (plan.json, exports, report.md, plots)"
    )
    console.print(
        f"apply: ropekit extend MODEL --method tuned --from-study {out} --target-length {target_length} --out DIR",
        soft_wrap=True,
    )


def ranking_table(results: dict) -> Table:
    s = results["settings"]
    t = Table(title=f"held-out ranking at {s['report_window']:,} tokens (retention: first {s['retention_length']:,})")
    for col in ("rank", "plan", "ppl", "vs yarn", "retention ppl", "vs none", "disturbance"):
        t.add_column(col, justify="right" if col != "plan" else "left")
    for r in results["held_out"]:
        t.add_row(
            str(r["rank"]),
            r["label"],
            f"{r['ppl']:.3f}",
            f"{100 * r['vs_yarn']:+.2f}%",
            f"{r['retention_ppl']:.3f}",
            f"{100 * r['retention_vs_none']:+.2f}%",
            f"{r['disturbance']:.2f}",
        )
    return t


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise RopekitError(f"--attention-range must be LO:HI, e.g. 1:1.2, got {text!r}") from None
    return lo, hi
