"""The `ropekit` command line: JSON contract, files written, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import ropekit
from conftest import plot_pixels
from ropekit.cli.main import app

runner = CliRunner()
REQUIRED_KEYS = {
    "method",
    "head_dim",
    "rope_theta",
    "original_length",
    "target_length",
    "scale",
    "factors",
    "inv_freq",
    "attention_factor",
    "disturbance",
    "interpolated_pairs",
    "critical_dimension",
}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The installed entry point, as a user runs it (the one subprocess smoke test; the rest run in-process)."""
    return subprocess.run(
        [sys.executable, "-m", "ropekit.cli.main", *args], capture_output=True, text=True, check=False
    )


@pytest.mark.slow
@pytest.mark.parametrize("target", [8192, 16384])
def test_plan_json_matches_api(target, tmp_path, run_main):
    code, stdout, stderr = run_main(
        "plan",
        "--preset",
        "llama2-7b",
        "--target-length",
        str(target),
        "--method",
        "dprope",
        "--json",
        "--out",
        str(tmp_path),
    )
    assert code == 0, stderr
    data = json.loads(stdout)
    assert set(data) >= REQUIRED_KEYS
    plan = ropekit.make_plan(ropekit.RopeSpec.from_preset("llama2-7b"), target, "dprope")
    assert data["factors"] == list(plan.factors)
    assert data["interpolated_pairs"] == plan.interpolated_pairs
    assert data["disturbance"] == plan.disturbance
    assert data["inv_freq"] == plan.inv_freq.tolist()
    assert data["critical_dimension"] == 92 and data["scale"] == target / 4096
    assert json.loads((tmp_path / "plan.json").read_text())["factors"] == data["factors"]


def test_plan_compare_lists_every_method(tmp_path):
    result = runner.invoke(
        app,
        [
            "plan",
            "--preset",
            "llama2-7b",
            "--target-length",
            "16384",
            "--method",
            "dprope",
            "--json",
            "--compare",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["disturbance_by_method"]
    assert {"pi", "yarn", "dprope", "ntk", "none", "llama3", "base", "resonance", "dynamic-ntk"} <= set(scores)
    assert scores["dprope"] < scores["pi"] < scores["none"]
    spec = ropekit.RopeSpec.from_preset("llama2-7b")
    assert scores["yarn"] == ropekit.make_plan(spec, 16384, "yarn").disturbance


def test_plan_table_and_exports(tmp_path):
    result = runner.invoke(app, ["plan", "--preset", "llama2-7b", "--target-length", "16384", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "disturbance by method" in result.stdout and "critical dimension 92" in result.stdout
    block = json.loads((tmp_path / "transformers_v5.json").read_text())
    assert block["max_position_embeddings"] == 16384
    assert block["rope_parameters"]["rope_type"] == "longrope"


def test_plan_from_model_config_and_explicit_geometry(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 4096,
                "num_attention_heads": 32,
                "rope_theta": 10000.0,
                "max_position_embeddings": 4096,
            }
        )
    )
    from_model = runner.invoke(
        app, ["plan", "--model", str(tmp_path), "--target-length", "8192", "--json", "--no-write"]
    )
    explicit = runner.invoke(
        app,
        [
            "plan",
            "--head-dim",
            "128",
            "--rope-theta",
            "10000",
            "--original-length",
            "4096",
            "--target-length",
            "8192",
            "--json",
            "--no-write",
        ],
    )
    assert from_model.exit_code == explicit.exit_code == 0, from_model.output + explicit.output
    assert json.loads(from_model.stdout)["factors"] == json.loads(explicit.stdout)["factors"]


def test_longrope_factors_file(tmp_path):
    factors = [1.0 + i / 10 for i in range(64)]
    (tmp_path / "f.json").write_text(json.dumps({"rope_scaling": {"long_factor": factors}}))
    result = runner.invoke(
        app,
        [
            "plan",
            "--preset",
            "llama2-7b",
            "--target-length",
            "8192",
            "--method",
            "longrope",
            "--factors-file",
            str(tmp_path / "f.json"),
            "--json",
            "--no-write",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["factors"] == factors


def bad_inputs(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768, "n_head": 12}))
    (tmp_path / "short.json").write_text(json.dumps([1.0] * 10))
    geometry = ["--preset", "llama2-7b"]
    return {
        "unknown preset": (["--preset", "llama9", "--target-length", "8192"], "did you mean"),
        "unknown method": ([*geometry, "--target-length", "8192", "--method", "yarm"], "did you mean 'yarn'"),
        "target not above original": ([*geometry, "--target-length", "4096"], "must exceed"),
        "odd head_dim": (
            ["--head-dim", "127", "--rope-theta", "10000", "--original-length", "4096", "--target-length", "8192"],
            "even",
        ),
        "nan base": (
            ["--head-dim", "128", "--rope-theta", "nan", "--original-length", "4096", "--target-length", "8192"],
            "finite",
        ),
        "inf threshold": ([*geometry, "--target-length", "8192", "--threshold", "inf"], "finite"),
        "alpha below one": ([*geometry, "--target-length", "8192", "--method", "ntk", "--alpha", "0.5"], "in [1, "),
        "wrong-length factors": (
            [
                *geometry,
                "--target-length",
                "8192",
                "--method",
                "longrope",
                "--factors-file",
                str(tmp_path / "short.json"),
            ],
            "64 rotary pairs",
        ),
        "missing factors file": (
            [
                *geometry,
                "--target-length",
                "8192",
                "--method",
                "longrope",
                "--factors-file",
                str(tmp_path / "nope.json"),
            ],
            "not found",
        ),
        "config without rope": (["--model", str(tmp_path / "gpt2"), "--target-length", "8192"], "no RoPE"),
        "missing model dir": (["--model", str(tmp_path / "absent"), "--target-length", "8192"], "no such file"),
        "two geometries": ([*geometry, "--head-dim", "128", "--target-length", "8192"], "exactly one geometry"),
        "option of another method": (
            [*geometry, "--target-length", "8192", "--method", "pi", "--bins", "90", "--beta-fast", "8"],
            "does not apply",
        ),
    }


def test_bad_input_gives_one_line_and_exit_2(tmp_path):
    for case, (args, expected) in bad_inputs(tmp_path).items():
        result = runner.invoke(app, ["plan", *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, (case, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (case, result.stderr)
        assert not (tmp_path / "o").exists(), case


def analyze(out, methods: str, target: str = "16384"):
    args = ["analyze", "--preset", "llama2-7b", "--target-length", target, "--out", str(out)]
    result = runner.invoke(app, [*args, "--methods", methods, "--pairs", "0,45,46"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_analyze_writes_plots_and_csv(tmp_path):
    out = analyze(tmp_path / "a", "none,pi,yarn,dprope")
    other = analyze(tmp_path / "b", "none,ntk", target="65536")
    for name in ("disturbance_per_pair.png", "factors_per_pair.png", "angles_pair045.png", "angles_pair046.png"):
        image, different = plot_pixels(out / name), plot_pixels(other / name)
        # another plan draws another picture (same canvas size, different pixels)
        assert image.shape != different.shape or abs(image - different).mean() > 1e-3, name
    rows = (out / "per_pair.csv").read_text().strip().splitlines()
    assert len(rows) == 65 and "disturbance_dprope" in rows[0]


@pytest.mark.slow
def test_real_entry_point_error_exit_code():
    proc = run_cli("plan", "--preset", "llama2-7b", "--target-length", "100")
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,expected",
    [
        (["plan", "--preset", "llama2-7b"], "Missing option '--target-length'"),
        (["plan", "--preset", "llama2-7b", "--target-length", "abc"], "Invalid value for '--target-length'"),
        (["plan", "--preset", "llama2-7b", "--target-length", "8192", "--bogus"], "No such option: --bogus"),
    ],
)
def test_usage_mistakes_are_one_line_too(args, expected, run_main):
    code, _, stderr = run_main(*args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]
