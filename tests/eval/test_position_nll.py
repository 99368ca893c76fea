"""NLL by position from one causal pass, against separate windows and a literal log-softmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from ropekit.errors import RopekitError
from ropekit.eval.position_nll import position_nll


def _naive_nll(model, ids: np.ndarray) -> torch.Tensor:
    """−log p(x_t | x_<t) for t = 1 … T − 1 from the full logits, float64."""
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return -logp[:-1].gather(1, torch.as_tensor(ids[1:], dtype=torch.long)[:, None])[:, 0]


def test_one_pass_gives_beyond_within_and_the_retention_window():
    model = tiny_llama(96, seed=3).eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 96, 700), rng.integers(0, 96, 650)]
    r = position_nll(model, docs, length=600, trained_length=512, bucket=100, prefixes=(128, 600))
    naive = torch.stack([_naive_nll(model, d[:600]) for d in docs])  # (2, 599)
    positions = torch.arange(1, 600)
    assert r.nll == pytest.approx(float(naive.mean()), abs=1e-5)
    assert r.nll_beyond == pytest.approx(float(naive[:, positions >= 512].mean()), abs=1e-5)
    assert r.nll_within == pytest.approx(float(naive[:, positions < 512].mean()), abs=1e-5)
    # the retention window is a separate 128-token pass, by causality
    short = torch.stack([_naive_nll(model, d[:128]) for d in docs])
    assert r.prefix_ppl["128"] == pytest.approx(math.exp(float(short.mean())), rel=1e-5)
    assert r.prefix_ppl["600"] == pytest.approx(r.perplexity, rel=1e-9)
    # buckets: 100-token buckets over positions 1 … 599, the first holds 99 tokens
    assert r.per_document[0]["bucket_tokens"] == [99, 100, 100, 100, 100, 100]
    assert r.per_document[1]["bucket_nll"][5] == pytest.approx(float(naive[1, 499:].mean()), abs=1e-5)
    by_pos = r.by_position()
    assert by_pos[200] == pytest.approx(float(naive[:, 199:299].mean()), abs=1e-5)


def test_windows_that_cannot_answer_are_refused_before_any_pass():
    model = tiny_llama(32)
    with pytest.raises(RopekitError, match="shorter than the 600-token window"):
        position_nll(model, [np.arange(500) % 32], length=600, trained_length=512)
    with pytest.raises(RopekitError, match="retention window 2048"):
        position_nll(model, [np.arange(700) % 32], length=600, trained_length=512)
    with pytest.raises(RopekitError, match="at least one document"):
        position_nll(model, [], length=600, trained_length=512)
