"""`ropekit tune` end to end on a tiny model whose best plan is known (`known_optimum`).

The search must move from a deliberately bad seed (PI) toward the plan X the documents were
sampled with; the report is measured on held-out documents only; a rerun measures nothing
again; an interrupted study continues without measuring any plan twice; two processes share
one study; the exported plan reloads in stock transformers (no ropekit) with the reported
held-out perplexity.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import known_optimum as ko
import pytest
import torch

import ropekit
from ropekit.apply.extend import load_model, load_tokenizer
from ropekit.choose import measure
from ropekit.choose.finish import paired_bootstrap
from ropekit.choose.tune import TuneConfig
from ropekit.errors import RopekitError
from ropekit.eval.position_nll import position_nll
from ropekit.eval.store import documents_fingerprint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def optimum(tmp_path_factory) -> ko.KnownOptimum:
    return ko.build(tmp_path_factory.mktemp("known-optimum"))


def config(k: ko.KnownOptimum, out: Path, **changes) -> TuneConfig:
    base = dict(
        model=str(k.model_dir),
        target_length=ko.TARGET,
        data=str(k.tuning),
        held_out=str(k.held_out),
        out=out,
        screen=["pi"],  # the deliberately bad seed (none is screened as the retention reference)
        seeds=1,
        trials=14,
        retention_tolerance=1.0,  # the constraint is tested on its own below
        report_methods=[],
        progress=False,
    )
    return TuneConfig(**(base | changes))


class PassCounter:
    """Wraps `position_nll` in ropekit.choose.measure: records each pass as (inv_freq, attention, length, documents)."""

    def __init__(self, monkeypatch, *, interrupt_at: int | None = None):
        self.calls: list[tuple] = []
        self.interrupt_at = interrupt_at
        real = measure.position_nll

        def counting(model, documents, **kwargs):
            if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
                raise KeyboardInterrupt  # Ctrl-C just before this pass
            rotary = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
            key = (
                rotary.inv_freq.numpy().tobytes(),
                float(rotary.attention_scaling),
                kwargs["length"],
                documents_fingerprint(documents),
            )
            self.calls.append(key)
            return real(model, documents, **kwargs)

        monkeypatch.setattr(measure, "position_nll", counting)


@pytest.fixture(scope="module")
def study(optimum, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tuned"
    results = ropekit.tune(config(optimum, out))
    return out, results


@pytest.mark.slow
def test_the_search_moves_from_a_bad_seed_toward_the_known_optimum(optimum, study):
    out, results = study
    trials = results["trials"]
    seed = next(t for t in trials if t.get("seed") == "pi")
    best = min(trials, key=lambda t: t["value"])
    assert seed["number"] == 0  # the enqueued seed runs first
    assert best["value"] < seed["value"] - 0.01  # nats beyond the trained length, tuning documents
    assert ko.distance_to_x(best["factors"], best["attention_factor"], optimum) < 0.5 * ko.distance_to_x(
        seed["factors"], seed["attention_factor"], optimum
    )
    # X is the optimum by construction: on the tuning documents it beats the seed and is not beaten by much
    model = load_model(str(optimum.model_dir), dtype="float32")
    spec = ropekit.RopeSpec.from_config(model.config)
    x = ropekit.make_plan(spec, ko.TARGET, "tuned", factors=optimum.x_factors, attention_factor=optimum.x_attention)
    ropekit.apply_plan(model, x, route="inv_freq")
    tok = load_tokenizer(str(optimum.model_dir))
    docs = [tok(p.read_text())["input_ids"][: ko.TARGET] for p in sorted(optimum.tuning.glob("*.txt"))]
    x_nll = position_nll(model, docs, length=ko.TARGET, trained_length=ko.TRAINED, prefixes=(16,))
    assert x_nll.nll_beyond < seed["value"] - 0.01
    assert best["value"] > x_nll.nll_beyond - 0.02


@pytest.mark.slow
def test_the_report_is_measured_on_held_out_documents_only(optimum, study):
    """Recompute the tuned plan's held-out numbers from scratch with a plain forward pass."""
    out, results = study
    tuned = next(r for r in results["held_out"] if r["label"] == "tuned")
    model = load_model(str(optimum.model_dir), dtype="float32")
    record = json.loads((out / "plan.json").read_text())["tuned"]
    spec = ropekit.RopeSpec.from_config(model.config)
    plan = ropekit.make_plan(spec, ko.TARGET, "tuned", study=record)
    ropekit.apply_plan(model, plan, route="inv_freq")
    tok = load_tokenizer(str(optimum.model_dir))
    held = [tok(p.read_text())["input_ids"][: ko.TARGET] for p in sorted(optimum.held_out.glob("*.txt"))]
    nll = []
    with torch.no_grad():
        for ids in held:
            logits = model(torch.tensor([ids])).logits[0].double()
            nll.append(-torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0])
    assert tuned["ppl"] == pytest.approx(math.exp(float(torch.cat(nll).mean())), rel=1e-5)
    provenance = results["provenance"]
    assert provenance["held_out_documents"]["source"] == [str(optimum.held_out)]
    assert provenance["tuning_documents"]["source"] == [str(optimum.tuning)]
    assert {r["label"] for r in results["held_out"]} == {"tuned", "pi", "none", "yarn"}
    assert [r["rank"] for r in results["held_out"]] == [1, 2, 3, 4]
    assert results["held_out"] == sorted(results["held_out"], key=lambda r: r["ppl"])
    for name in ("objective_by_trial.png", "factors.png", "nll_by_position.png", "report.md"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.slow
def test_a_rerun_measures_nothing_again(optimum, study, monkeypatch):
    out, results = study
    counter = PassCounter(monkeypatch)
    again = ropekit.tune(config(optimum, out))
    assert counter.calls == []
    assert again["tuned"]["factors"] == results["tuned"]["factors"]
    assert again["held_out"] == results["held_out"]


@pytest.mark.slow
def test_interrupt_and_rerun_continue_the_study_without_measuring_a_plan_twice(optimum, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    counter = PassCounter(monkeypatch, interrupt_at=7)  # during the search
    with pytest.raises(KeyboardInterrupt):
        ropekit.tune(config(optimum, out, trials=5))
    first = list(counter.calls)
    counter.interrupt_at = None
    results = ropekit.tune(config(optimum, out, trials=5))
    assert len(first) == 7 and len(counter.calls) > 7
    assert len(set(counter.calls)) == len(counter.calls)  # no (plan, window) measured twice over both runs
    assert len(results["trials"]) == 5


@pytest.mark.slow
def test_the_exported_plan_reloads_in_stock_transformers_with_the_reported_perplexity(optimum, study, tmp_path):
    """`ropekit extend --method tuned --from-study`, then a process that never imports ropekit."""
    out, results = study
    extended = tmp_path / "extended"
    run = subprocess.run(
        [sys.executable, "-m", "ropekit.cli.main", "extend", str(optimum.model_dir), "--method", "tuned",
         "--from-study", str(out), "--target-length", str(ko.TARGET), "--out", str(extended)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    held = sorted(str(p) for p in optimum.held_out.glob("*.txt"))
    script = f"""
import json, math, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(extended)!r}, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained({str(extended)!r})
total, count = 0.0, 0
with torch.no_grad():
    for path in {held!r}:
        ids = tok(open(path).read())["input_ids"][:{ko.TARGET}]
        logits = model(torch.tensor([ids])).logits[0].double()
        total += float(-torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None]).sum())
        count += len(ids) - 1
assert "ropekit" not in sys.modules
print(json.dumps({{"ppl": math.exp(total / count)}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    tuned = next(r for r in results["held_out"] if r["label"] == "tuned")
    assert json.loads(proc.stdout)["ppl"] == pytest.approx(tuned["ppl"], rel=1e-5)
    for name in ("transformers_v5.json", "transformers_v4.json", "vllm_hf_overrides.json", "llama_cpp_rope_freqs.json"):
        assert (out / name).is_file()
    exported = json.loads((out / "transformers_v5.json").read_text())["rope_parameters"]
    assert exported["long_factor"] == results["tuned"]["factors"]
    assert exported["attention_factor"] == results["tuned"]["attention_factor"]


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_study(optimum, tmp_path):
    """Two processes add trials to one SQLite study: the main one (screen, seeds, 4 trials, report), then a
    worker taking the study to 10 trials, then the main command again, which continues and reports all 10.
    In sequence, so the test does not depend on which process wins a race (on quiet cores the main
    process once ran every trial before a concurrent worker had started)."""
    out = tmp_path / "shared"
    args = [str(optimum.model_dir), "--target-length", str(ko.TARGET), "--data", str(optimum.tuning),
            "--held-out", str(optimum.held_out), "--out", str(out), "--screen", "pi", "--seeds", "1",
            "--retention-tolerance", "1", "--report-methods", ""]  # fmt: skip
    command = [sys.executable, "-m", "ropekit.cli.main", "tune", *args]

    def run(*extra: str) -> None:
        done = subprocess.run([*command, *extra], capture_output=True, text=True, check=False, timeout=600)
        assert done.returncode == 0, done.stderr

    run("--trials", "4")
    assert _screened(out)
    run("--trials", "10", "--worker", "--seed", "7")
    run("--trials", "10")
    results = json.loads((out / "results.json").read_text())
    workers = {t["worker"] for t in results["trials"]}
    assert len(workers) == 2  # both processes ran trials of the one study
    assert len(results["trials"]) >= 10
    assert len({t["number"] for t in results["trials"]}) == len(results["trials"])


def _screened(out: Path) -> bool:
    import optuna

    try:
        summaries = optuna.get_all_study_summaries(f"sqlite:///{out / 'study.sqlite'}")
    except Exception:  # noqa: BLE001 (the file is being created)
        return False
    return any(s.user_attrs.get("seeded") for s in summaries)


def test_paired_bootstrap_against_the_closed_form():
    a = {"per_document": [{"bucket_nll": [1.0, 2.0, None], "bucket_tokens": [3, 4, 0]}]}
    b = {"per_document": [{"bucket_nll": [1.5, 1.0, 2.0], "bucket_tokens": [3, 4, 2]}]}
    ratio, lo, hi = paired_bootstrap(a, b, seed=0)
    assert ratio == pytest.approx(math.exp((3 * -0.5 + 4 * 1.0) / 7))
    assert lo <= ratio <= hi
    same = paired_bootstrap(a, a, seed=0)
    assert same == (1.0, 1.0, 1.0)


def test_bad_settings_are_refused_before_any_model_loads(tmp_path):
    for changes, message in [
        ({"family": "spline"}, "--family must be one of"),
        ({"sampler": "grid"}, "--sampler must be one of"),
        ({"objective": "rouge"}, "--objective must be one of"),
        ({"trials": -1}, "--trials must be"),
        ({"retention_tolerance": -0.1}, "--retention-tolerance"),
    ]:
        cfg = TuneConfig(model="m", target_length=2, data="d", held_out="h", out=tmp_path / "x", **changes)
        with pytest.raises(RopekitError, match=message):
            cfg.validate()


@pytest.mark.slow
def test_a_spent_budget_stops_cleanly_and_still_reports(optimum, tmp_path):
    results = ropekit.tune(config(optimum, tmp_path / "budget", budget_minutes=1e-6))
    assert [r["label"] for r in results["screen"]] == ["none"]  # the retention reference, always screened
    assert results["trials"] == []
    assert results["tuned"]["factors"] == [1.0] * 8 and results["tuned"]["chosen_from"] == "screened none"
    assert {r["label"] for r in results["held_out"]} == {"tuned", "none", "yarn"}


@pytest.mark.slow
def test_a_directory_of_another_study_is_refused(optimum, study):
    out, _ = study
    with pytest.raises(RopekitError, match="holds a study with other settings .*retention_tolerance"):
        ropekit.tune(config(optimum, out, retention_tolerance=0.5))
