"""The reference experiment: the distributional paper's comparison in miniature.

    .venv/bin/python bench/compare_methods.py --quick   # < 10 min: s = 2, 4; short fine-tunes
    .venv/bin/python bench/compare_methods.py           # full grid (reference model cached)
    .venv/bin/python bench/compare_methods.py --only-pose   # only the PoSE rows, into the saved results

For scale s ∈ {2, 4, 8} (target 256·s) and methods none, pi, ntk, yarn, dprope (t = 0),
dprope-n (the paper's "n" setting: interpolate exactly the dims past the critical dimension)
and base (critical-dimension base change):
  (a) no fine-tuning: perplexity on the held-out book at 256 … 256·s and a passkey grid;
  (b) fine-tuning: the same budget for every method (steps × global batch at length 256·s,
      same data, same seed) through `ropekit finetune`, PoSE variants at s = 4 (train at
      256); then the same evaluation.
Each method's disturbance (1000 × mean KL) is recorded next to its results, with Spearman
rank correlations between disturbance and quality. Writes bench/results/compare/
(results_{quick,full}.json and PNG plots); `bench/readme_results.py` turns them into the
README section. --replot recomputes the correlations and plots from a saved JSON.
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
from ropekit.eval.report import accuracy_heatmap, method_color, plain_log_axes  # noqa: E402
from ropekit.eval.stats import spearman  # noqa: E402

OUT = ROOT / "bench" / "results" / "compare"


def method_grid(spec: ropekit.RopeSpec) -> dict[str, tuple[str, dict]]:
    """name → (ropekit method, parameters)."""
    n_paper = spec.rotary_dim - ropekit.critical_dimension(spec)
    return {
        "none": ("none", {}),
        "pi": ("pi", {}),
        "ntk": ("ntk", {}),
        "yarn": ("yarn", {}),
        "dprope": ("dprope", {}),
        "dprope-n": ("dprope", {"interpolated_dims": n_paper}),
        "base": ("base", {}),
    }


SETTINGS = {
    "quick": dict(
        scales=[2, 4],
        ft_scales=[4],
        pose_methods=["pi", "dprope"],
        steps=20,
        batch=2,
        trials=2,
        max_tokens=4096,
        methods=["none", "pi", "yarn", "dprope"],
    ),
    "full": dict(
        scales=[2, 4, 8],
        ft_scales=[2, 4, 8],
        pose_methods=["pi", "yarn", "dprope"],
        steps=100,
        batch=2,
        trials=4,
        max_tokens=16384,
        methods=None,
    ),
}
DEPTHS = [0.0, 0.5, 1.0]


def training_data(docs_dir: Path) -> Path:
    """The reference model's training documents as files (for `ropekit finetune --data`)."""
    if not (docs_dir / "done").is_file():
        docs_dir.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(ref.corpus()[0]):
            (docs_dir / f"doc{i}.txt").write_text(text)
        (docs_dir / "done").write_text("ok")
    return docs_dir


def lengths_up_to(scale: int) -> list[int]:
    """256, 512, …, 256·scale."""
    return [256 * 2**k for k in range(int(np.log2(scale)) + 1)]


def evaluate(model, tokenizer, book: list[np.ndarray], scale: int, trials: int) -> dict:
    """Held-out book perplexity (windows of n tokens, stride n/2) and passkey accuracy at 256 … 256·scale."""
    lengths = lengths_up_to(scale)
    ppl = {str(n): perplexity(model, book, length=n, stride=n // 2).perplexity for n in lengths}
    grid = passkey_grid(
        model,
        tokenizer,
        lengths=lengths,
        depths=DEPTHS,
        trials=trials,
        seed=7,
        agreement_every=6,
        scorer="teacher-forced",
        style="compact",
    )  # the protocol the README tables were made with
    passkey = {str(n): float(np.mean([grid.cell(n, d) for d in DEPTHS])) for n in lengths}
    return {"ppl": ppl, "passkey": passkey, "scorer_agreement": grid.agreement}


def finetuned_dir(
    ref_dir: Path, data: Path, name: str, method: str, params: dict, scale: int, pose: bool, setting: dict
) -> tuple[Path, float]:
    from ropekit.train.loop import TrainConfig, finetune

    tag = f"ft-{ref_dir.name}-{name}-s{scale}{'-pose' if pose else ''}-{setting['steps']}x{setting['batch']}"
    out = ref.CACHE / tag
    if (out / "ropekit.json").is_file():
        return out, json.loads((out / "ropekit.json").read_text())["training"].get("seconds", 0.0)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    started = time.perf_counter()
    finetune(
        TrainConfig(
            model=str(ref_dir),
            out=out,
            data=str(data),
            target_length=256 * scale,
            method=method,
            method_params=params,
            train_length=256 if pose else None,
            pose=pose,
            steps=setting["steps"],
            global_batch=setting["batch"],
            lr=5e-4,
            seed=0,
            save_every=setting["steps"],
            progress=False,
            report_to="none",
            max_tokens=200_000,
        )
    )
    seconds = time.perf_counter() - started
    record = json.loads((out / "ropekit.json").read_text())
    record["training"]["seconds"] = seconds
    (out / "ropekit.json").write_text(json.dumps(record, indent=2))
    return out, seconds


def load_book(ref_dir: Path, tokenizer, max_tokens: int) -> list[np.ndarray]:
    text = (ref_dir / "held_out" / ref.HELD_OUT_BOOK_FILE).read_text()
    return [np.array(tokenizer(text)["input_ids"][:max_tokens])]


def report(kind: str, scale: int, label: str, r: dict) -> None:
    target = str(256 * scale)
    print(
        f"[{kind:11s}] s={scale} {label:9s} D={r['disturbance']:8.2f}  ppl@256={r['ppl']['256']:7.2f}  "
        f"ppl@{target}={r['ppl'][target]:8.2f}  passkey@{target}={r['passkey'][target]:.0%}",
        flush=True,
    )


def run_no_finetune(ref_dir, spec, grid, tokenizer, book, setting) -> dict:
    out: dict = {}
    for scale in setting["scales"]:
        row = out[str(scale)] = {}
        for label, (method, params) in grid.items():
            plan = ropekit.make_plan(spec, 256 * scale, method, **params)
            model = apply(load_model(str(ref_dir), dtype="float32"), plan)
            row[label] = {"disturbance": plan.disturbance, **evaluate(model, tokenizer, book, scale, setting["trials"])}
            report("no FT", scale, label, row[label])
    return out


def run_finetune(ref_dir, spec, grid, tokenizer, book, setting, *, pose: bool) -> dict:
    out: dict = {}
    data = training_data(ref.CACHE / "train-docs")
    scales = [4] if pose else setting["ft_scales"]
    methods = {k: grid[k] for k in setting["pose_methods"] if k in grid} if pose else grid
    for scale in scales:
        row = out[str(scale)] = {}
        for label, (method, params) in methods.items():
            if label == "none" and not pose:  # fine-tuning with no scaling is "train longer", outside the grid
                continue
            run_dir, seconds = finetuned_dir(ref_dir, data, label, method, params, scale, pose, setting)
            plan = ropekit.make_plan(spec, 256 * scale, method, **params)
            row[label] = {
                "disturbance": plan.disturbance,
                "train_seconds": seconds,
                **evaluate(load_model(str(run_dir), dtype="float32"), tokenizer, book, scale, setting["trials"]),
            }
            report("PoSE" if pose else "fine-tuned", scale, label, row[label])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller grid and fine-tunes (< 10 minutes)")
    parser.add_argument("--replot", action="store_true", help="redraw the plots from the saved results only")
    parser.add_argument(
        "--only-pose",
        action="store_true",
        help="re-run only the PoSE rows into the saved results (the reference model must be the one they record)",
    )
    args = parser.parse_args()
    name = "quick" if args.quick else "full"
    if args.replot:  # recompute the derived statistics and plots from the saved measurements
        results = json.loads((OUT / f"results_{name}.json").read_text())
        save(results, name)
        return
    if args.only_pose:
        rerun_pose_rows(name)
        return
    setting = SETTINGS[name]
    started = time.perf_counter()
    ref_dir = ref.reference_model(ref.RefConfig())
    tokenizer = load_tokenizer(str(ref_dir))
    book = load_book(ref_dir, tokenizer, setting["max_tokens"])
    spec = ropekit.RopeSpec.from_pretrained(str(ref_dir))
    grid = {k: v for k, v in method_grid(spec).items() if setting["methods"] is None or k in setting["methods"]}
    results: dict = {
        "setting": name,
        "settings": setting,
        "reference_model": json.loads((ref_dir / "metrics.json").read_text()),
        "critical_dimension": ropekit.critical_dimension(spec),
    }
    results["no_finetune"] = run_no_finetune(ref_dir, spec, grid, tokenizer, book, setting)
    results["finetune"] = run_finetune(ref_dir, spec, grid, tokenizer, book, setting, pose=False)
    results["pose"] = run_finetune(ref_dir, spec, grid, tokenizer, book, setting, pose=True)
    results["wall_seconds"] = time.perf_counter() - started
    save(results, name)
    print(f"wrote {OUT}/results_{name}.json and plots in {results['wall_seconds'] / 60:.1f} min")


def rerun_pose_rows(name: str) -> None:
    """Replace the PoSE rows of results_<name>.json, keeping every other row; refuses when the reference
    model (re)built here is not the one those rows were measured on."""
    results = json.loads((OUT / f"results_{name}.json").read_text())
    setting = results["settings"]
    started = time.perf_counter()
    ref_dir = ref.reference_model(ref.RefConfig())
    metrics = json.loads((ref_dir / "metrics.json").read_text())
    if metrics["val_perplexity"] != results["reference_model"]["val_perplexity"]:
        sys.exit(
            f"the reference model here (held-out perplexity {metrics['val_perplexity']!r}) is not the one the saved "
            f"rows used ({results['reference_model']['val_perplexity']!r}): re-run the whole grid instead"
        )
    tokenizer = load_tokenizer(str(ref_dir))
    book = load_book(ref_dir, tokenizer, setting["max_tokens"])
    spec = ropekit.RopeSpec.from_pretrained(str(ref_dir))
    grid = {k: v for k, v in method_grid(spec).items() if setting["methods"] is None or k in setting["methods"]}
    results["pose"] = run_finetune(ref_dir, spec, grid, tokenizer, book, setting, pose=True)
    results["pose_rerun_seconds"] = time.perf_counter() - started
    save(results, name)
    print(f"rewrote the PoSE rows of {OUT}/results_{name}.json in {results['pose_rerun_seconds'] / 60:.1f} min")


def save(results: dict, name: str) -> None:
    """Add the correlations (derived from the measurements), write results_<name>.json and draw the plots."""
    results["correlations"] = correlations(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"results_{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plots(results, name)


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


KIND_TITLES = {"no_finetune": "no fine-tuning", "finetune": "fine-tuned", "pose": "PoSE fine-tuned"}


def plots(results: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for kind in ("no_finetune", "finetune"):
        if results[kind]:
            plot_ppl(plt, results, kind, OUT / f"ppl_{kind}_{name}.png")
    plot_passkey(plt, results, OUT / f"passkey_{name}.png")
    plot_disturbance(plt, results, OUT / f"disturbance_vs_quality_{name}.png")


def plot_ppl(plt, results: dict, kind: str, path: Path) -> None:
    """Perplexity vs length, one panel per scale, one line per method (PoSE runs dashed)."""
    rows = results[kind]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 3.8), squeeze=False)
    for ax, (scale, row) in zip(axes[0], rows.items()):
        extra = results["pose"].get(scale, {}) if kind == "finetune" else {}
        for method, r, pose in [(m, r, False) for m, r in row.items()] + [(m, r, True) for m, r in extra.items()]:
            ax.plot(
                [int(n) for n in r["ppl"]],
                list(r["ppl"].values()),
                "--" if pose else "-",
                marker="o",
                ms=3,
                color=method_color(method),
                label=f"{method} (PoSE)" if pose else method,
            )
        if extra:
            ax.legend(fontsize=6, loc="center right")
        ax.axvline(256, color="grey", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            yscale="log",
            title=f"s = {scale} ({KIND_TITLES[kind]})",
            xlabel="context length (tokens)",
            ylabel="held-out book perplexity",
        )
        ax.set_xscale("log", base=2)
        plain_log_axes(ax)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_passkey(plt, results: dict, path: Path) -> None:
    """Heatmaps of passkey accuracy (method × length), one per (setting, scale)."""
    panels = [
        (kind, scale, row) for kind in ("no_finetune", "finetune", "pose") for scale, row in results[kind].items()
    ]
    cols = 3
    fig, axes = plt.subplots(
        -(-len(panels) // cols), cols, figsize=(4.4 * cols, 2.9 * -(-len(panels) // cols)), squeeze=False
    )
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (kind, scale, row) in zip(axes.flat, panels):
        methods = list(row)
        lengths = list(next(iter(row.values()))["passkey"])
        accuracy_heatmap(ax, np.array([[row[m]["passkey"][n] for n in lengths] for m in methods]), methods, lengths)
        ax.set_title(f"passkey, s = {scale}, {KIND_TITLES[kind]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_disturbance(plt, results: dict, path: Path) -> None:
    """Disturbance vs perplexity at the target length, without and with fine-tuning."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("no_finetune", "finetune")):
        for scale, row in results[kind].items():
            target = str(256 * int(scale))
            names = [m for m in row if m != "none"]
            ds, ps = [row[m]["disturbance"] for m in names], [row[m]["ppl"][target] for m in names]
            ax.scatter(ds, ps, label=f"s = {scale}")
            for m, d, p in zip(names, ds, ps):
                ax.annotate(m, (d, p), fontsize=7, xytext=(3, 2), textcoords="offset points")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="disturbance (1000 × mean KL; lower = closer to pre-training)",
            ylabel="perplexity at the target length",
            title=KIND_TITLES[kind],
        )
        plain_log_axes(ax)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
