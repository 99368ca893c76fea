"""Time the dprope plan (vectorised) at 16k, 128k and 1M tokens, and the authors' literal
double loop at 16k, for the LLaMA-2 geometry (d = 128, b = 10000, L = 4096).

    .venv/bin/python bench/plan_speed.py            # full run (the literal loop takes a minute or two)
    .venv/bin/python bench/plan_speed.py --quick    # literal loop on 8 of the 64 pairs, extrapolated ×8

Prints a table and writes bench/results/plan_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import ropekit
from ropekit.plan.analysis.angles import angle_counts_literal
from ropekit.plan.analysis.disturbance import clear_cache

RESULTS = Path(__file__).parent / "results" / "plan_speed.json"


def time_vectorised(spec: ropekit.RopeSpec, target: int, repeats: int) -> float:
    """Median seconds for a fresh dprope plan (memo cleared before each run)."""
    times = []
    for _ in range(repeats):
        clear_cache()
        start = time.perf_counter()
        ropekit.make_plan(spec, target, "dprope")
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def time_literal(spec: ropekit.RopeSpec, target: int, pairs: int) -> float:
    """Seconds for the authors' three histograms (P at L, both candidates at L') on `pairs` pairs."""
    theta = spec.inv_freq()[:pairs]
    scale = target / spec.context_length
    start = time.perf_counter()
    angle_counts_literal(theta, spec.context_length)
    angle_counts_literal(theta, target)
    angle_counts_literal(theta / scale, target)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="literal loop on 8 pairs only, scaled up to 64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    spec = ropekit.RopeSpec.from_preset("llama2-7b")
    rows = {target: time_vectorised(spec, target, args.repeats) for target in (16384, 131072, 1048576)}
    pairs = 8 if args.quick else spec.num_pairs
    literal = time_literal(spec, 16384, pairs) * spec.num_pairs / pairs
    result = {
        "geometry": spec.describe(),
        "dprope_seconds_by_target": {str(k): v for k, v in rows.items()},
        "literal_double_loop_seconds_16k": literal,
        "literal_pairs_timed": pairs,
        "speedup_16k": literal / rows[16384],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "ropekit_version": ropekit.__version__,
    }
    print(f"dprope plan, {spec.describe()}")
    for target, seconds in rows.items():
        print(f"  target {target:>9,} tokens: {seconds:8.3f} s  (vectorised, median of {args.repeats})")
    note = "" if pairs == spec.num_pairs else f" (timed on {pairs} pairs, scaled to {spec.num_pairs})"
    print(f"  literal double loop at 16,384: {literal:8.1f} s{note}")
    print(f"  speed-up at 16k: {result['speedup_16k']:,.0f}×")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
