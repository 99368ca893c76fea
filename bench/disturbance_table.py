"""Disturbance of every method (1000 × mean KL, the paper's units) for model presets and targets.

    .venv/bin/python bench/disturbance_table.py

Writes bench/results/disturbance.json and bench/results/disturbance.md (the README table).
"""

from __future__ import annotations

import json
from pathlib import Path

import ropekit

CASES = [("llama2-7b", 8192), ("llama2-7b", 16384), ("llama2-7b", 32768), ("llama3-8b", 32768), ("phi-3-mini", 16384)]
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    table = {}
    for preset, target in CASES:
        spec = ropekit.RopeSpec.from_preset(preset)
        plans = ropekit.compare(spec, target)
        table[f"{preset} → {target}"] = {name: round(p.disturbance, 3) for name, p in plans.items()}
    methods = list(next(iter(table.values())))
    lines = ["| model → target | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for case, scores in table.items():
        best = min(scores.values())
        cells = [f"**{v:.2f}**" if v == best else f"{v:.2f}" for v in scores.values()]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "disturbance.json").write_text(json.dumps(table, indent=2) + "\n")
    (RESULTS / "disturbance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
