"""Adding a method takes one function, one record and one registration (the README's example).

The record's parameter becomes a CLI option of `ropekit plan` (and extend, finetune, eval), and its
native form an export that stock transformers reloads to the plan's frequencies.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from typer.testing import CliRunner

import ropekit
from ropekit.cli.main import app
from ropekit.plan.registry import Method, NativeForm, Param


# --- README "Adding a method" (keep the two in step) ---
def uniform(spec: ropekit.RopeSpec, target_length: int, *, scale: float | None = None) -> ropekit.Scaling:
    """θ'_i = θ_i / s for every pair (default s = L'/L), a = 1."""
    s = target_length / spec.context_length if scale is None else scale
    return ropekit.Scaling(inv_freq=spec.inv_freq() / s, factors=(float(s),) * spec.num_pairs)


def uniform_block(plan: ropekit.Plan) -> dict:
    """transformers' `linear` rope_type computes the same frequencies."""
    return {"rope_type": "linear", "factor": plan.factors[0]}


UNIFORM = Method(
    "uniform",
    uniform,
    "every frequency divided by one factor",
    "README example",
    params=(Param("scale", float, "divisor s of every frequency", default="L'/L", flag="--uniform-scale"),),
    native=NativeForm("linear", uniform_block),
)
# ropekit.register_method(UNIFORM)
# plan = ropekit.make_plan(ropekit.RopeSpec(head_dim=64, base=10000.0, context_length=256), 1024, "uniform", scale=5.0)
# --- end of the README example ---

SPEC = ropekit.RopeSpec(head_dim=64, base=10000.0, context_length=256)
GEOMETRY = ["--head-dim", "64", "--rope-theta", "10000", "--original-length", "256", "--target-length", "1024"]
runner = CliRunner()


@pytest.fixture
def registered():
    ropekit.register_method(UNIFORM)
    try:
        yield UNIFORM
    finally:
        ropekit.unregister_method("uniform")


def reloaded_inv_freq(block: dict) -> torch.Tensor:
    """The inv_freq stock transformers computes from an exported RoPE block."""
    config = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, rope_parameters=block)
    inv_freq, _ = ROPE_INIT_FUNCTIONS[block["rope_type"]](config, "cpu", seq_len=1024)
    return inv_freq


def test_a_registered_method_plans_through_the_api(registered):
    plan = ropekit.make_plan(SPEC, 1024, "uniform", scale=5.0)
    assert plan.method == "uniform" and plan.factors == (5.0,) * 32 and plan.params == {"scale": 5.0}
    assert torch.equal(plan.inv_freq, SPEC.inv_freq() / 5.0)
    assert ropekit.get_method("uniform").parameters == ("scale",)
    with pytest.raises(ropekit.RopekitError, match="does not take 'alpha'"):
        ropekit.make_plan(SPEC, 1024, "uniform", alpha=2.0)


def test_its_option_reaches_the_cli_and_its_exports_reload_in_transformers(registered, tmp_path):
    assert "--uniform-scale" in runner.invoke(app, ["plan", "--help"], terminal_width=200).output
    out = tmp_path / "plan"
    result = runner.invoke(
        app, ["plan", *GEOMETRY, "--method", "uniform", "--uniform-scale", "5", "--json", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "uniform" and summary["params"] == {"scale": 5.0}
    plan = ropekit.make_plan(SPEC, 1024, "uniform", scale=5.0)
    native = json.loads((out / "transformers_v5_native.json").read_text())["rope_parameters"]
    assert native == {"rope_type": "linear", "factor": 5.0, "rope_theta": 10000.0}
    assert torch.equal(reloaded_inv_freq(native), plan.inv_freq)
    longrope = json.loads((out / "transformers_v5.json").read_text())["rope_parameters"]
    assert torch.allclose(reloaded_inv_freq(longrope), plan.inv_freq, rtol=3e-7, atol=0)
    wrong = runner.invoke(app, ["plan", *GEOMETRY, "--method", "pi", "--uniform-scale", "5", "--no-write"])
    assert wrong.exit_code == 2 and "--uniform-scale does not apply to method 'pi'" in wrong.stderr


def test_unregistering_removes_the_method_and_its_option():
    ropekit.register_method(UNIFORM)
    ropekit.unregister_method("uniform")
    assert "uniform" not in ropekit.METHODS
    with pytest.raises(ropekit.RopekitError, match="unknown method"):
        ropekit.make_plan(SPEC, 1024, "uniform")
    result = runner.invoke(app, ["plan", *GEOMETRY, "--method", "pi", "--uniform-scale", "5", "--no-write"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_the_readme_shows_this_example():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("### Adding a method", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    here = Path(__file__).read_text().split("# --- README", 1)[1].split("# --- end", 1)[0]
    example = [line.removeprefix("# ") for line in here.splitlines()[1:]]
    shown = [line for line in block.splitlines() if not line.startswith(("import ", "from "))]
    assert [line for line in example if line.strip()] == [line for line in shown if line.strip()]
