"""Collect bench/finetune_demo.sh's results into bench/results/finetune_demo/{results.json,table.md}."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "finetune_demo"


def main() -> None:
    rows = {}
    base = json.loads((ROOT / "out/eval-ft-base/results.json").read_text())["methods"]
    rows["no scaling, no fine-tuning"] = base["none"]["ppl"]
    rows["dprope, no fine-tuning"] = base["dprope"]["ppl"]
    for name, folder in [
        ("dprope + full-length fine-tune (2048)", "out/eval-ft-full"),
        ("dprope + PoSE fine-tune (512 → 2048)", "out/eval-ft-pose"),
    ]:
        rows[name] = json.loads((ROOT / folder / "results.json").read_text())["methods"]["as-saved"]["ppl"]
    training = {
        name: json.loads((ROOT / d / "ropekit.json").read_text())["training"]
        for name, d in [("full-length", "out/ft-2k"), ("pose", "out/ft-2k-pose")]
    }
    lengths = ["512", "1024", "2048"]
    lines = ["| model | " + " | ".join(lengths) + " |", "|---" * 4 + "|"]
    for name, ppl in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{ppl[n]['perplexity']:.3f}" for n in lengths) + " |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    summary = {
        "perplexity": {k: {n: v[n]["perplexity"] for n in lengths} for k, v in rows.items()},
        "tokens_per_second": {k: t["tokens_per_second"] for k, t in training.items()},
    }
    (OUT / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    print({k: round(v) for k, v in summary["tokens_per_second"].items()}, "tokens/s")


if __name__ == "__main__":
    main()
