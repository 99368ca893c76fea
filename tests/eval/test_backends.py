"""The two backends behind one interface: llama.cpp gives the tasks what transformers gives (log-probabilities,
argmax, greedy generation) on the same F32 weights, and `ropekit eval` writes the same results.json through
either. The llama.cpp tests need llama-cpp-python (`ROPEKIT_LLAMACPP=1 bash scripts/setup.sh`; CI builds it)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama
from gguf_fixtures import require_llama_cpp, vocabulary, write_llama_gguf
from ropekit.cli.main import app
from ropekit.eval.backend import TransformersScorer

runner = CliRunner()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama(len(vocabulary()), seed=3)


@pytest.fixture(scope="module")
def gguf(tmp_path_factory, model):
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "doc.txt"
    path.write_text(" the cat sat on the mat and the dog ran after a ball." * 60)
    return path


def key_paths(value: Any, prefix: str = "") -> set[str]:
    """Every key path of a JSON value (lists: the paths of their first element, marked [])."""
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in {f"{prefix}/{k}"} | key_paths(v, f"{prefix}/{k}")}
    if isinstance(value, list) and value:
        return key_paths(value[0], prefix + "[]")
    return set()


def eval_args(gguf, text, out, backend: str) -> list[str]:
    args = ["eval", str(gguf), "--backend", backend, "--tasks", "ppl,nll,passkey", "--lengths", "256,512"]
    args += ["--method", "yarn", "--target-length", "1024", "--data", str(text), "--trials", "1", "--depths", "0.5"]
    return [*args, "--retention", "128", "--trained-length", "256", "--out", str(out)]


@pytest.mark.slow
def test_llama_cpp_eval_writes_the_transformers_results_and_overwrites_its_own(gguf, text, tmp_path):
    require_llama_cpp()
    results = {}
    for backend in ("llama.cpp", "transformers"):
        out = tmp_path / backend
        first = runner.invoke(app, eval_args(gguf, text, out, backend))
        assert first.exit_code == 0, first.output
        again = runner.invoke(app, [*eval_args(gguf, text, out, backend), "--overwrite"])  # the same --out, again
        assert again.exit_code == 0, again.output
        results[backend] = json.loads((out / "results.json").read_text())
    cpp, tf = results["llama.cpp"], results["transformers"]
    assert key_paths(cpp) == key_paths(tf)
    assert cpp["trained_length"] == tf["trained_length"] == 512 and cpp["warnings"] == tf["warnings"] == []
    assert cpp["backend"]["name"] == "llama.cpp" and tf["backend"]["weights"].startswith("the GGUF dequantised")
    assert cpp["methods"]["yarn"]["plan"] == tf["methods"]["yarn"]["plan"]
    for n in ("256", "512"):
        c, t = cpp["methods"]["yarn"], tf["methods"]["yarn"]
        assert c["ppl"][n]["tokens_scored"] == t["ppl"][n]["tokens_scored"]
        assert c["ppl"][n]["perplexity"] == pytest.approx(t["ppl"][n]["perplexity"], rel=1e-5)
        assert c["nll"][n]["nll_beyond"] == pytest.approx(t["nll"][n]["nll_beyond"], abs=1e-5)
        assert c["nll"][n]["prefix_ppl"]["128"] == pytest.approx(t["nll"][n]["prefix_ppl"]["128"], rel=1e-5)
    assert [r["passkey"] for r in cpp["methods"]["yarn"]["passkey"]["rows"]] == [
        r["passkey"] for r in tf["methods"]["yarn"]["passkey"]["rows"]
    ]


@pytest.mark.slow
def test_llama_cpp_scorer_gives_what_the_transformers_scorer_gives(gguf, model):
    """On F32 weights: log-probabilities, the argmax at the last positions, and greedy continuations."""
    require_llama_cpp()
    from ropekit.eval.llamacpp import LlamaCppScorer

    ids = torch.randint(0, len(vocabulary()), (300,), generator=torch.Generator().manual_seed(1)).tolist()
    reference = TransformersScorer(model)
    scorer = LlamaCppScorer(gguf)
    try:
        assert torch.allclose(
            scorer.token_logprobs(ids, score_from=5), reference.token_logprobs(ids, score_from=5), atol=1e-4
        )
        assert scorer.next_token_argmax(ids, last=40) == reference.next_token_argmax(ids, last=40)
        assert scorer.generate_greedy(ids[:100], 12) == reference.generate_greedy(ids[:100], 12)
        stop = reference.generate_greedy(ids[:100], 12)[3]
        assert scorer.generate_greedy(ids[:100], 12, stop_ids=[stop]) == reference.generate_greedy(
            ids[:100], 12, stop_ids=[stop]
        )
    finally:
        scorer.close()


def test_the_llama_cpp_backend_refuses_what_it_cannot_run(tmp_path):
    base = ["eval", str(tmp_path), "--data", str(tmp_path), "--lengths", "64"]  # refused before any file is read
    directory = runner.invoke(app, [*base, "--backend", "llama.cpp"])
    assert directory.exit_code == 2 and "--backend llama.cpp runs a .gguf MODEL" in directory.stderr
    ruler = runner.invoke(app, ["eval", "x.gguf", "--backend", "llama.cpp", "--tasks", "ruler", "--lengths", "64"])
    assert ruler.exit_code == 2 and "task ruler needs transformers, which the llama.cpp backend" in ruler.stderr
    unknown = runner.invoke(app, [*base, "--backend", "vllm"])
    assert unknown.exit_code == 2 and "--backend must be one of transformers, llama.cpp" in unknown.stderr
