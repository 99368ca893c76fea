"""Fine-tuning stories260K for real: loss goes down, stock reload, exact resume, 2 processes, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import ropekit
from ropekit.cli.main import app
from ropekit.train.loop import latest_checkpoint, loss_curve

runner = CliRunner()
pytestmark = pytest.mark.slow  # real fine-tuning runs (subprocesses, torchrun)


@pytest.fixture(scope="module")
def s260k(llama_model_dir):
    """stories260K converted, or a random-weight model of its shape without ../shared."""
    return str(llama_model_dir)


@pytest.fixture(scope="module")
def text(story_text):
    return str(story_text)


def run(s260k, text, out, *extra):
    args = [
        "finetune",
        s260k,
        "--data",
        text,
        "--out",
        str(out),
        "--target-length",
        "2048",
        "--lr",
        "2e-3",
        "--max-tokens",
        "40000",
        "--report-to",
        "none",
        *extra,
    ]
    return runner.invoke(app, args)


def weights(out):
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("extra", [[], ["--pose", "--train-length", "512"]], ids=["full-length", "pose"])
def test_loss_goes_down_and_stock_transformers_loads_the_result(s260k, text, tmp_path, extra):
    out = tmp_path / "run"
    result = run(s260k, text, out, "--steps", "10", "--global-batch", "2", "--save-every", "5", *extra)
    assert result.exit_code == 0, result.output
    losses = loss_curve(out)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # the loss falls clearly: by 15% (stories260K) or, from a random-weight stand-in's ~ln V start
    # with its noisier PoSE batches, by at least 0.3 nats
    assert len(losses) == 10 and (last < 0.85 * first or last < first - 0.3), losses
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    plan = ropekit.make_plan(ropekit.RopeSpec.from_pretrained(s260k), 2048, "dprope")
    assert model.config.max_position_embeddings == 2048
    assert torch.equal(model.model.rotary_emb.inv_freq, plan.inv_freq)
    record = json.loads((out / "ropekit.json").read_text())
    assert record["training"]["completed"] and record["training"]["config"]["pose"] == bool(extra)
    assert (out / "logs" / "loss_curve.csv").read_text().count("\n") == 11


def test_resume_continues_the_same_run(s260k, text, tmp_path):
    common = ["--steps", "6", "--global-batch", "2", "--save-every", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(s260k, text, whole, *common).exit_code == 0
    first = run(s260k, text, parts, *common, "--stop-after-steps", "3")
    assert first.exit_code == 0, first.output
    assert latest_checkpoint(parts).name == "step-000003" and not (parts / "model.safetensors").exists()
    (parts / "checkpoints" / ".step-000004.partial").mkdir()  # debris of a crash mid-save is ignored
    second = run(s260k, text, parts, *common, "--resume")
    assert second.exit_code == 0, second.output
    assert loss_curve(parts) == pytest.approx(loss_curve(whole), abs=1e-6)
    a, b = weights(whole), weights(parts)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_two_processes_match_one_with_the_same_global_batch(s260k, text, tmp_path):
    common = [
        "--data",
        text,
        "--target-length",
        "2048",
        "--lr",
        "2e-3",
        "--max-tokens",
        "40000",
        "--report-to",
        "none",
        "--steps",
        "3",
        "--global-batch",
        "2",
        "--save-every",
        "3",
        "--warmup-steps",
        "2",
    ]
    single, double = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "ropekit.cli.main", "finetune", s260k, "--out", str(single), *common],
        check=True,
        capture_output=True,
        env=env,
    )
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]  # --standalone: a free port
    proc = subprocess.run(
        [*torchrun, "-m", "ropekit.cli.main", "finetune", s260k, "--out", str(double), *common],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((double / "ropekit.json").read_text())["training"]
    assert record["processes"] == 2 and record["gradient_accumulation"] == 1
    ranks = [
        [json.loads(ln)["windows"] for ln in (double / "logs" / f"data_rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    one = [json.loads(ln)["windows"] for ln in (single / "logs" / "data_rank0.jsonl").read_text().splitlines()]
    for step in range(3):
        assert not set(ranks[0][step]) & set(ranks[1][step])  # the two ranks saw different data
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(one[step])
    a, b = weights(single), weights(double)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert loss_curve(double) == pytest.approx(loss_curve(single), abs=1e-5)


def test_bad_runs_are_refused_cleanly(s260k, text, tmp_path):
    (tmp_path / "empty").mkdir()
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    done = tmp_path / "done"
    assert run(s260k, text, done, "--steps", "1", "--global-batch", "1").exit_code == 0
    cases = {
        "empty folder": (["--data", str(tmp_path / "empty")], "no .txt or .jsonl"),
        "text shorter than a window": (["--data", str(short)], "fewer than one window"),
        "missing data": (["--data", str(tmp_path / "nope")], "no such file"),
        "train length above target": (["--train-length", "4096"], "exceeds the target"),
        "pose without train length": (["--pose"], "--pose needs --train-length"),
        "target not above original": (["--target-length", "512"], "must exceed"),
        "resume with nothing": (["--resume"], "no complete checkpoint"),
        "batch not divisible": (["--global-batch", "3", "--micro-batch", "2"], "not a multiple"),
        "unknown recipe": (["--recipe", "dprope-llama2-32k"], "did you mean"),
    }
    for case, (extra, expected) in cases.items():
        out = tmp_path / f"out-{case.replace(' ', '_')}"
        result = runner.invoke(
            app,
            [
                "finetune",
                s260k,
                "--data",
                text,
                "--out",
                str(out),
                "--target-length",
                "2048",
                "--steps",
                "1",
                "--global-batch",
                "1",
                "--report-to",
                "none",
                *extra,
            ],
        )
        assert result.exit_code == 2, (case, result.output)
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, (case, result.stderr)
        assert not (out / "model.safetensors").exists(), case
    again = run(s260k, text, done, "--steps", "1", "--global-batch", "1")
    assert again.exit_code == 2 and "already holds a run" in again.stderr
    different = run(s260k, text, done, "--steps", "2", "--global-batch", "1", "--seed", "5", "--resume")
    assert different.exit_code == 2 and "cannot resume" in different.stderr


# `ropekit finetune` exactly as `python -m ropekit.cli.main` runs it, with a real SIGINT sent to the process
# as a chosen step ends: the first Ctrl-C lands at a known step, never in a race with the end of training.
CTRL_C_AT_STEP = """
import signal, sys
import ropekit.train.loop as loop
from ropekit.cli.main import main

at_step = int(sys.argv.pop(1))  # the command line after it is ropekit's
log_step = loop._log_step

def log_step_then_ctrl_c(run, step, *args):
    log_step(run, step, *args)
    if step == at_step:
        signal.raise_signal(signal.SIGINT)  # handled here, before the step's checkpoint and stop checks

loop._log_step = log_step_then_ctrl_c
main()
"""


def test_ctrl_c_saves_the_last_completed_step_and_resume_finishes_the_same_run(s260k, text, tmp_path):
    args = [
        "--data",
        text,
        "--target-length",
        "2048",
        "--lr",
        "2e-3",
        "--max-tokens",
        "40000",
        "--report-to",
        "none",
        "--steps",
        "8",
        "--global-batch",
        "2",
        "--save-every",
        "100",
    ]
    interrupted, whole = tmp_path / "interrupted", tmp_path / "whole"
    proc = subprocess.run(
        [sys.executable, "-c", CTRL_C_AT_STEP, "2", "finetune", s260k, "--out", str(interrupted), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 130, proc.stderr[-2000:]  # 130: an interrupt
    assert "stopping after this step" in proc.stderr and "error: interrupted after step 2;" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert latest_checkpoint(interrupted).name == "step-000002"
    assert len((interrupted / "logs" / "loss_curve.csv").read_text().splitlines()) == 1 + 2
    assert not (interrupted / "model.safetensors").exists()
    assert runner.invoke(app, ["finetune", s260k, "--out", str(interrupted), *args, "--resume"]).exit_code == 0
    assert runner.invoke(app, ["finetune", s260k, "--out", str(whole), *args]).exit_code == 0
    assert loss_curve(interrupted) == pytest.approx(loss_curve(whole), abs=1e-6)


def test_passkey_mix_trains_on_passkey_windows_and_is_recorded(s260k, text, tmp_path):
    out = tmp_path / "run"
    result = run(s260k, text, out, "--steps", "4", "--global-batch", "2", "--save-every", "4", "--passkey-mix", "0.5")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "ropekit.json").read_text())
    assert record["training"]["config"]["passkey_mix"] == 0.5
    seen = [
        w for line in (out / "logs" / "data_rank0.jsonl").read_text().splitlines() for w in json.loads(line)["windows"]
    ]
    windows = record["training"]["windows"]
    assert windows["passkey"] == round(0.5 / (1 - 0.5) * windows["text"])
    assert any(w >= windows["text"] for w in seen)  # passkey windows come after the text windows
    refused = run(s260k, text, tmp_path / "bad", "--passkey-mix", "1")
    assert refused.exit_code == 2 and "--passkey-mix" in refused.output and "Traceback" not in refused.output
