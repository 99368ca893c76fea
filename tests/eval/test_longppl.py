"""LongPPL key-token selection against a naive per-window reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from ropekit import RopekitError
from ropekit.eval.longppl import long_ppl, short_context_logprobs


@pytest.fixture(scope="module")
def model():
    return tiny_llama(50)


@pytest.fixture(scope="module")
def documents():
    g = np.random.default_rng(3)
    base = g.integers(0, 50, size=120)
    return [np.concatenate([base, base, base]).astype(np.int32)]  # repeats make long context pay off


def naive_logprob(model, ids, t, start):
    """log p(ids[t] | ids[start:t]) from a fresh forward pass and a full log-softmax."""
    with torch.no_grad():
        logits = model(ids[start:t][None]).logits[0, -1]
    return float(torch.log_softmax(logits.double(), -1)[ids[t]])


def test_short_context_logprobs_match_naive_windows(model, documents):
    ids = torch.as_tensor(documents[0][:200], dtype=torch.long)
    short = short_context_logprobs(model, ids, 64)
    for t in (1, 31, 32, 63, 64, 95, 96, 150, 199):
        window_start = max(0, ((t - 64) // 32 + 1) * 32) if t >= 64 else 0
        assert short[t - 1] == pytest.approx(naive_logprob(model, ids, t, window_start), abs=1e-4)


def test_threshold_extremes(model, documents):
    everything = long_ppl(model, documents, length=360, short_length=64, threshold=-math.inf)
    assert everything.key_tokens == everything.tokens_considered == 360 - 64
    nothing = long_ppl(model, documents, length=360, short_length=64, threshold=math.inf)
    assert nothing.long_ppl is None and nothing.key_tokens == 0 and nothing.tokens_considered == 296
    with pytest.raises(RopekitError, match="longer than the short context"):
        long_ppl(model, [documents[0][:50]], length=360, short_length=64)


def test_every_disjoint_window_counts(model, documents):
    whole = long_ppl(model, documents, length=120, short_length=64, threshold=-math.inf)
    assert whole.tokens_considered == 3 * (120 - 64)


def test_key_tokens_are_those_the_long_context_helps(model, documents):
    ids = torch.as_tensor(documents[0][:360], dtype=torch.long)
    short = short_context_logprobs(model, ids, 64)
    full = torch.tensor([naive_logprob(model, ids, t, 0) for t in range(1, 360)])
    expected = [(t, float(full[t - 1])) for t in range(64, 360) if full[t - 1] - short[t - 1] > 0.05]
    result = long_ppl(model, documents, length=360, short_length=64, threshold=0.05)
    assert result.key_tokens == len(expected)
    assert result.long_ppl == pytest.approx(math.exp(-sum(v for _, v in expected) / len(expected)), rel=1e-4)
