"""LongPPL key-token selection against a naive per-window reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from ropekit import RopekitError
from ropekit.eval.longppl import (
    Evaluator,
    decoded_offsets,
    long_ppl,
    merge_adjacent,
    short_context_logprobs,
    tokens_inside,
)


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


@pytest.mark.slow
def test_short_context_logprobs_match_naive_windows(model, documents):
    """Official short contexts: windows [kW, kW + S + W) score tokens kW + S … kW + S + W − 1."""
    ids = torch.as_tensor(documents[0][:200], dtype=torch.long)
    short = short_context_logprobs(model, ids, 64, 32)
    assert torch.isnan(short[:63]).all()  # tokens before S have no short score
    for t in (64, 95, 96, 127, 128, 150, 199):
        start = (t - 64) // 32 * 32
        assert short[t - 1] == pytest.approx(naive_logprob(model, ids, t, start), abs=1e-4)


@pytest.mark.slow
def test_threshold_extremes(model, documents):
    everything = long_ppl(
        model, documents, length=360, short_length=64, sliding_window=32, threshold=-math.inf, beta=-math.inf
    )
    assert everything.key_tokens == everything.tokens_considered == 360 - 64
    nothing = long_ppl(model, documents, length=360, short_length=64, sliding_window=32, threshold=math.inf)
    assert nothing.long_ppl is None and nothing.key_tokens == 0 and nothing.tokens_considered == 296
    with pytest.raises(RopekitError, match="longer than the short context"):
        long_ppl(model, [documents[0][:50]], length=360, short_length=64)


def test_official_defaults_are_4096_and_1024():
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(long_ppl).parameters.items()}
    assert (defaults["short_length"], defaults["sliding_window"], defaults["threshold"], defaults["beta"]) == (
        4096,
        1024,
        2.0,
        -2.0,
    )


@pytest.mark.slow
def test_every_disjoint_window_counts(model, documents):
    whole = long_ppl(model, documents, length=120, short_length=64, threshold=-math.inf, beta=-math.inf)
    assert whole.tokens_considered == 3 * (120 - 64)


@pytest.fixture(scope="module")
def naive_scores(model, documents):
    """(long, short) log-probs of tokens 64 … 199 of the first 200-token window, one forward pass each."""
    ids = torch.as_tensor(documents[0][:200], dtype=torch.long)
    return {
        t: (naive_logprob(model, ids, t, 0), naive_logprob(model, ids, t, (t - 64) // 32 * 32)) for t in range(64, 200)
    }


@pytest.mark.slow
@pytest.mark.parametrize("alpha,beta", [(0.05, -math.inf), (0.05, -3.9), (-math.inf, -3.9)])
def test_key_tokens_need_both_the_difference_and_the_long_context_floor(model, naive_scores, alpha, beta):
    doc = [np.asarray(_first_window(model), dtype=np.int32)]
    expected = [lp for lp, short in naive_scores.values() if lp - short > alpha and lp > beta]
    result = long_ppl(model, doc, length=200, short_length=64, sliding_window=32, threshold=alpha, beta=beta)
    assert 0 < result.key_tokens == len(expected) < 136
    assert result.long_ppl == pytest.approx(math.exp(-sum(expected) / len(expected)), rel=1e-4)


def _first_window(model):
    g = np.random.default_rng(3)
    base = g.integers(0, 50, size=120)
    return np.concatenate([base, base, base])[:200]


class CharTokenizer:
    """One character per token id (id i ↔ chr(65 + i)); offsets are character positions."""

    def __call__(self, text, return_offsets_mapping=False):
        out = {"input_ids": [ord(c) - 65 for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i)) for i in ids)


@pytest.mark.slow
def test_a_separate_evaluator_maps_key_tokens_by_characters(model, documents):
    """The model as its own 'separate' evaluator through text and offsets gives the self-evaluator's answer."""
    tok = CharTokenizer()
    kwargs = dict(length=200, short_length=64, sliding_window=32, threshold=0.05, beta=-math.inf)
    direct = long_ppl(model, documents, **kwargs)
    mapped = long_ppl(model, documents, evaluator=Evaluator(model, tok, "char-model"), tokenizer=tok, **kwargs)
    assert mapped.key_tokens == direct.key_tokens > 0 and mapped.long_ppl == pytest.approx(direct.long_ppl)
    assert mapped.evaluator == "char-model" and direct.evaluator.startswith("self")


def test_interval_merging_and_containment_by_hand():
    assert merge_adjacent([(0, 2), (2, 5), (7, 9), (9, 10), (11, 12)]) == [(0, 5), (7, 10), (11, 12)]
    # model tokens: "ab" "cde" "fg" "h" over key characters [0, 5) and [7, 8)
    spans = [(0, 2), (2, 5), (5, 7), (7, 8)]
    assert tokens_inside(spans, [(0, 5), (7, 8)]) == [0, 1, 3]
    assert tokens_inside(spans, [(1, 5)]) == [1]  # "ab" straddles the interval's start: not key
    assert decoded_offsets(CharTokenizer(), [0, 1, 2]) == [(0, 1), (1, 2), (2, 3)]
