"""The reference experiment: the distributional paper's comparison in miniature.

    .venv/bin/python bench/compare_methods.py --quick   # < 10 min: s = 2, 4; short fine-tunes
    .venv/bin/python bench/compare_methods.py           # full grid (reference model cached)

For scale s ∈ {2, 4, 8} (target 256·s) and methods none, pi, ntk, yarn, dprope (t = 0),
dprope-n (the paper's "n" setting: interpolate exactly the dims past the critical dimension)
and base (critical-dimension base change):
  (a) no fine-tuning: perplexity on held-out text at 256 … 256·s and a passkey grid;
  (b) fine-tuning: the same budget for every method (steps × global batch at length 256·s,
      same data, same seed) through `ropekit finetune`, PoSE variants at s = 4 (train at
      256); then the same evaluation.
Each method's disturbance (1000 × mean KL) is recorded next to its results, with Spearman
rank correlations between disturbance and quality. Writes bench/results/compare/
(results.json, tables.md, plots); `bench/readme_results.py` turns them into the README section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import reference_model as ref  # noqa: E402

import ropekit  # noqa: E402
from ropekit.apply.extend import load_model, load_tokenizer  # noqa: E402
from ropekit.apply.patch import apply  # noqa: E402
from ropekit.eval.passkey import passkey_grid  # noqa: E402
from ropekit.eval.perplexity import perplexity  # noqa: E402

OUT = ROOT / "bench" / "results" / "compare"


def method_grid(spec: ropekit.RopeSpec) -> dict[str, tuple[str, dict]]:
    """name → (ropekit method, parameters)."""
    n_paper = spec.rotary_dim - ropekit.critical_dimension(spec)
    return {"none": ("none", {}), "pi": ("pi", {}), "ntk": ("ntk", {}), "yarn": ("yarn", {}),
            "dprope": ("dprope", {}), "dprope-n": ("dprope", {"interpolated_dims": n_paper}), "base": ("base", {})}


SETTINGS = {
    "quick": dict(scales=[2, 4], ft_scales=[4], pose_methods=["pi", "dprope"], steps=20, batch=4, trials=2,
                  max_tokens=6144, methods=["none", "pi", "yarn", "dprope"]),
    "full": dict(scales=[2, 4, 8], ft_scales=[2, 4], pose_methods=["pi", "yarn", "dprope"], steps=100, batch=4,
                 trials=4, max_tokens=16384, methods=None),
}


def training_data(docs_dir: Path) -> Path:
    """The reference model's training documents as files (for `ropekit finetune --data`)."""
    if not (docs_dir / "done").is_file():
        docs_dir.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(ref.corpus()[0]):
            (docs_dir / f"doc{i}.txt").write_text(text)
        (docs_dir / "done").write_text("ok")
    return docs_dir


def evaluate(model, tokenizer, held: list[np.ndarray], scale: int, trials: int) -> dict:
    lengths = [256 * 2**k for k in range(int(np.log2(scale)) + 1)]
    ppl = {str(n): perplexity(model, held, length=n, stride=min(256, n)).perplexity for n in lengths}
    grid = passkey_grid(model, tokenizer, lengths=[256, 256 * scale], depths=[0.0, 0.5, 1.0], trials=trials, seed=7,
                        agreement_every=6)
    target = 256 * scale
    passkey = {str(n): float(np.mean([grid.cell(n, d) for d in (0.0, 0.5, 1.0)])) for n in (256, target)}
    return {"ppl": ppl, "passkey": passkey, "scorer_agreement": grid.agreement}


def finetuned_dir(ref_dir: Path, data: Path, name: str, method: str, params: dict, scale: int, pose: bool,
                  setting: dict) -> tuple[Path, float]:
    from ropekit.train.loop import TrainConfig, finetune

    tag = f"ft-{ref_dir.name}-{name}-s{scale}{'-pose' if pose else ''}-{setting['steps']}x{setting['batch']}"
    out = ref.CACHE / tag
    if (out / "ropekit.json").is_file():
        return out, json.loads((out / "ropekit.json").read_text())["training"].get("seconds", 0.0)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    started = time.perf_counter()
    finetune(TrainConfig(model=str(ref_dir), out=out, data=str(data), target_length=256 * scale, method=method,
                         method_params=params, train_length=256 if pose else None, pose=pose, steps=setting["steps"],
                         global_batch=setting["batch"], lr=5e-4, seed=0, save_every=setting["steps"], progress=False,
                         report_to="none", max_tokens=200_000))
    seconds = time.perf_counter() - started
    record = json.loads((out / "ropekit.json").read_text())
    record["training"]["seconds"] = seconds
    (out / "ropekit.json").write_text(json.dumps(record, indent=2))
    return out, seconds


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller grid and fine-tunes (< 10 minutes)")
    args = parser.parse_args()
    name = "quick" if args.quick else "full"
    setting = SETTINGS[name]
    started = time.perf_counter()
    ref_dir = ref.reference_model(ref.RefConfig())
    tokenizer = load_tokenizer(str(ref_dir))
    held = [np.array(tokenizer(p.read_text())["input_ids"][: setting["max_tokens"]]) for p in sorted((ref_dir / "held_out").glob("*.txt"))]
    data = training_data(ref.CACHE / "train-docs")
    spec = ropekit.RopeSpec.from_pretrained(str(ref_dir))
    grid = {k: v for k, v in method_grid(spec).items() if setting["methods"] is None or k in setting["methods"]}
    results: dict = {"setting": name, "reference_model": json.loads((ref_dir / "metrics.json").read_text()),
                     "no_finetune": {}, "finetune": {}, "pose": {}}
    for scale in setting["scales"]:
        row = results["no_finetune"][str(scale)] = {}
        for label, (method, params) in grid.items():
            plan = ropekit.plan(spec, 256 * scale, method, **params)
            model = apply(load_model(str(ref_dir), dtype="float32"), plan)
            row[label] = {"disturbance": plan.disturbance, **evaluate(model, tokenizer, held, scale, setting["trials"])}
            print(f"[no FT] s={scale} {label:9s} D={plan.disturbance:8.2f} ppl@{256 * scale}="
                  f"{row[label]['ppl'][str(256 * scale)]:.2f} passkey={row[label]['passkey'][str(256 * scale)]:.0%}", flush=True)
    for scale in setting["ft_scales"]:
        for kind, methods in (("finetune", grid), ("pose", {k: grid[k] for k in setting["pose_methods"] if k in grid})):
            if kind == "pose" and scale != 4:
                continue
            row = results[kind].setdefault(str(scale), {})
            for label, (method, params) in methods.items():
                out, seconds = finetuned_dir(ref_dir, data, label, method, params, scale, kind == "pose", setting)
                model = load_model(str(out), dtype="float32")
                plan = ropekit.plan(spec, 256 * scale, method, **params)
                row[label] = {"disturbance": plan.disturbance, "train_seconds": seconds,
                              **evaluate(model, tokenizer, held, scale, setting["trials"])}
                print(f"[{kind}] s={scale} {label:9s} ppl@{256 * scale}={row[label]['ppl'][str(256 * scale)]:.2f} "
                      f"passkey={row[label]['passkey'][str(256 * scale)]:.0%}", flush=True)
    results["correlations"] = correlations(results)
    results["wall_seconds"] = time.perf_counter() - started
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"results_{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plots(results, name)
    print(f"wrote {OUT}/results_{name}.json in {results['wall_seconds'] / 60:.1f} min")


def correlations(results: dict) -> dict:
    """Spearman ρ between disturbance and ppl / passkey at the target length, per setting and scale."""
    out = {}
    for kind in ("no_finetune", "finetune"):
        for scale, row in results[kind].items():
            target = str(256 * int(scale))
            names = [m for m in row if m != "none"]  # 'none' is the unscaled reference point
            d = [row[m]["disturbance"] for m in names]
            out[f"{kind}/s={scale}"] = {
                "methods": names,
                "rho_disturbance_ppl": spearman(d, [row[m]["ppl"][target] for m in names]),
                "rho_disturbance_passkey": spearman(d, [row[m]["passkey"][target] for m in names]),
            }
    return out


def plots(results: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for kind in ("no_finetune", "finetune"):
        rows = results[kind]
        if not rows:
            continue
        fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 3.8), squeeze=False)
        for ax, (scale, row) in zip(axes[0], rows.items()):
            for method, r in row.items():
                xs = [int(n) for n in r["ppl"]]
                ax.plot(xs, list(r["ppl"].values()), marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"s = {scale} ({'fine-tuned' if kind == 'finetune' else 'no fine-tuning'})")
            ax.set_xlabel("context length")
            ax.set_ylabel("held-out perplexity")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(OUT / f"ppl_{kind}_{name}.png", dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for scale, row in results["no_finetune"].items():
        target = str(256 * int(scale))
        ds = [r["disturbance"] for m, r in row.items() if m != "none"]
        ps = [r["ppl"][target] for m, r in row.items() if m != "none"]
        ax.scatter(ds, ps, label=f"s = {scale}")
        for m, d, p in zip([m for m in row if m != "none"], ds, ps):
            ax.annotate(m, (d, p), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("disturbance (1000 × mean KL)")
    ax.set_ylabel("perplexity at the target length (no fine-tuning)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / f"disturbance_vs_ppl_{name}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
