"""Which search family and which optuna sampler `ropekit tune` should default to, measured on a tiny
model whose best plan is known (tests/choose/known_optimum.py: documents sampled from the model running plan X).

    nice -n 5 .venv/bin/python bench/tune_samplers.py              # 3 families × tpe/cmaes/random × 1 seed × 16 trials
    .venv/bin/python bench/tune_samplers.py --trials 30 --seeds 3   # more trials and seeds (not run here: CPU)
    .venv/bin/python bench/tune_samplers.py --readme                # the README block from the JSON

Every run starts from the same deliberately bad seed (PI) with the retention constraint off, so the
comparison is the optimiser's alone. Reported per (family, sampler), mean over seeds: the best NLL
beyond the trained length on the tuning documents after 10, 20 and 30 trials (those within --trials;
minus X's own, so 0 is the optimum), the winner's held-out perplexity against X's, and the distance
of its factors to X.
Writes bench/results/tune_samplers.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "choose"))

import known_optimum as ko  # noqa: E402

import ropekit  # noqa: E402
from ropekit.choose.tune import TuneConfig  # noqa: E402

FAMILIES = ("ramp", "monotone", "per-pair")
SAMPLERS = ("tpe", "cmaes", "random")
OUT = ROOT / "bench" / "results"


def x_reference(k: ko.KnownOptimum, root: Path) -> dict:
    """X's own tuning objective and held-out perplexity, measured through the same store-backed path."""
    cfg = TuneConfig(
        model=str(k.model_dir), target_length=ko.TARGET, data=str(k.tuning), held_out=str(k.held_out),
        out=root / "x", screen=["pi"], seeds=0, trials=0, retention_tolerance=1.0, report_methods=[], progress=False,
    )  # fmt: skip
    from ropekit.choose.tune import open_context

    ctx = open_context(cfg)
    x = ctx.plan_of(k.x_factors, k.x_attention)
    P = ctx.retention_length
    tuning = ctx.measurer.window(x, ctx.tuning, ko.TARGET, prefixes=(P,))
    held = ctx.measurer.window(x, ctx.held_out, ko.TARGET, prefixes=(P,))
    ctx.measurer.store.close()
    return {"nll_beyond": tuning["nll_beyond"], "held_out_ppl": math.exp(held["nll"])}


def one_run(k: ko.KnownOptimum, root: Path, family: str, sampler: str, seed: int, trials: int) -> dict:
    cfg = TuneConfig(
        model=str(k.model_dir), target_length=ko.TARGET, data=str(k.tuning), held_out=str(k.held_out),
        out=root / family, study_name=f"{family}-{sampler}-{seed}", family=family, sampler=sampler, seed=seed,
        trials=trials, screen=["pi"], seeds=1, retention_tolerance=1.0, report_methods=[], progress=False,
    )  # fmt: skip
    started = time.perf_counter()
    r = ropekit.tune(cfg)
    values = [t["value"] for t in sorted(r["trials"], key=lambda t: t["number"])]
    best = np.minimum.accumulate(values).tolist()
    tuned = next(x for x in r["held_out"] if x["label"] == "tuned")
    return {
        "family": family,
        "sampler": sampler,
        "seed": seed,
        "best_by_trial": best,
        "held_out_ppl": tuned["ppl"],
        "distance_to_x": ko.distance_to_x(r["tuned"]["factors"], r["tuned"]["attention_factor"], k),
        "seconds": time.perf_counter() - started,
    }


def summarise(runs: list[dict], x: dict, checkpoints: list[int]) -> list[dict]:
    rows = []
    for family in FAMILIES:
        for sampler in SAMPLERS:
            mine = [r for r in runs if r["family"] == family and r["sampler"] == sampler]
            if not mine:
                continue
            row = {"family": family, "sampler": sampler, "runs": len(mine)}
            for n in checkpoints:
                row[f"gap@{n}"] = float(
                    np.mean([r["best_by_trial"][min(n, len(r["best_by_trial"])) - 1] for r in mine])
                )
                row[f"gap@{n}"] -= x["nll_beyond"]
            row["held_out_vs_x"] = float(np.mean([r["held_out_ppl"] / x["held_out_ppl"] - 1 for r in mine]))
            row["distance_to_x"] = float(np.mean([r["distance_to_x"] for r in mine]))
            rows.append(row)
    return rows


def markdown(rows: list[dict], x: dict, checkpoints: list[int], seed_gap: float) -> str:
    head = " | ".join(f"gap after {n}" for n in checkpoints)
    lines = [
        f"Tiny model with a known optimum X (X: NLL beyond L {x['nll_beyond']:.4f} nats on the tuning documents, "
        f"held-out perplexity {x['held_out_ppl']:.4f}); every run starts from PI (gap {seed_gap:.4f} nats). "
        "gap = best NLL beyond L found so far − X's (0 is the optimum); mean over seeds.",
        "",
        f"| family | sampler | runs | {head} | held-out ppl vs X | distance to X |",
        "|---|---|---|" + "---|" * len(checkpoints) + "---|---|",
    ]
    for r in rows:
        gaps = " | ".join(f"{r[f'gap@{n}']:+.4f}" for n in checkpoints)
        lines.append(
            f"| {r['family']} | {r['sampler']} | {r['runs']} | {gaps} | {100 * r['held_out_vs_x']:+.2f}% | "
            f"{r['distance_to_x']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def checkpoints_for(trials: int) -> list[int]:
    return sorted({n for n in (5, 10, 20, 30) if n <= trials} | {trials})


def write_readme() -> None:
    """Summary table from bench/results/tune_samplers.json into README.md's tune-samplers block."""
    import re

    record = json.loads((OUT / "tune_samplers.json").read_text())
    checkpoints = checkpoints_for(record["trials"])
    rows = summarise(record["runs"], record["x"], checkpoints)
    seed_gap = float(np.mean([r["best_by_trial"][0] for r in record["runs"]])) - record["x"]["nll_beyond"]
    table = markdown(rows, record["x"], checkpoints, seed_gap)
    (OUT / "tune_samplers.md").write_text(table)
    command = (
        f"`nice -n 5 .venv/bin/python bench/tune_samplers.py --trials {record['trials']} --seeds {record['seeds']}`"
    )
    block = f"Generated by {command} then `bench/tune_samplers.py --readme`.\n\n{table}"
    readme = ROOT / "README.md"
    begin, end = "<!-- tune-samplers:begin -->", "<!-- tune-samplers:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{block}{end}", readme.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--readme", action="store_true", help="rewrite the README block from the JSON")
    args = parser.parse_args()
    if args.readme:
        write_readme()
        return
    checkpoints = checkpoints_for(args.trials)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        k = ko.build(root / "model-and-documents")
        x = x_reference(k, root)
        runs = []
        for family in FAMILIES:
            for sampler in SAMPLERS:
                for seed in range(args.seeds):
                    runs.append(one_run(k, root, family, sampler, seed, args.trials))
                    r = runs[-1]
                    print(f"{family:9s} {sampler:6s} seed {seed}: best {r['best_by_trial'][-1]:.4f} "
                          f"({r['seconds']:.0f} s)", flush=True)  # fmt: skip
    rows = summarise(runs, x, checkpoints)
    seed_gap = float(np.mean([r["best_by_trial"][0] for r in runs])) - x["nll_beyond"]
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"x": x, "trials": args.trials, "seeds": args.seeds, "summary": rows, "runs": runs}
    (OUT / "tune_samplers.json").write_text(json.dumps(record, indent=1) + "\n")
    (OUT / "tune_samplers.md").write_text(markdown(rows, x, checkpoints, seed_gap))
    print(markdown(rows, x, checkpoints, seed_gap))


if __name__ == "__main__":
    main()
