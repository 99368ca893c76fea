"""LongPPL key-token selection against a naive per-window reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import generated_stories, tiny_llama, trained_tokenizer
from ropekit import RopekitError
from ropekit.eval.longppl import (
    COVERAGES,
    Evaluator,
    decoded_offsets,
    long_ppl,
    merge_adjacent,
    scored_windows,
    short_context_logprobs,
    tokens_inside,
    window_offsets,
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

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
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


def word_level_tokenizer(words: int = 50):
    """A real word-level tokenizer (tokenizers' WordLevel, white-space split): "w0 w1 w2" → 3 tokens whose
    offsets leave the spaces out, and decoding joins tokens with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)} | {"[UNK]": words}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_the_issues_word_level_example_finds_index_0():
    """Text "w0 w1 w2", key interval (3, 5): the official cal_overlap finds token 1, loss index [0]. Spans
    from decoded widths put the leading space in w1's span, (2, 5), and found nothing."""
    tok = word_level_tokenizer()
    ids = tok("w0 w1 w2")["input_ids"]
    spans, own = window_offsets(tok, ids, "w0 w1 w2")
    assert spans == [(0, 2), (3, 5), (6, 8)] and own == 0
    assert [t - 1 for t in tokens_inside(spans, [(3, 5)])] == [0]
    assert tokens_inside(decoded_offsets(tok, ids), [(3, 5)]) == []  # the earlier spans: no key token


def test_a_window_cut_inside_a_word_uses_offsets_after_its_first_tokens():
    tok = trained_tokenizer(generated_stories(80))
    text = "Once upon a time, Lily and Ben played with the shiny kite. Mia saw a big red boat."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    window = ids[3:]  # starts mid-sentence, perhaps mid-word
    window_text = tok.decode(window, skip_special_tokens=True)
    spans, own = window_offsets(tok, window, window_text)
    assert own <= 2 and len(spans) == len(window)
    assert all(window_text[a:b] == tok.decode([t]) for t, (a, b) in zip(window[own:], spans[own:]))
    bos_first = [tok.bos_token_id, *ids]  # a special token gets the (empty) span its decoded text adds
    spans, own = window_offsets(tok, bos_first, tok.decode(bos_first, skip_special_tokens=True))
    assert own == 1 and spans[0] == (0, 0)


def test_cal_overlap_walk_by_hand():
    # tokens (0,2) (2,5) (5,9) (9,10) over intervals (2,6) (8,10): (2,5) inside the first; (5,9) runs past
    # it and starts before the second; (9,10) inside the second. Zero-width tokens count when inside.
    assert tokens_inside([(0, 2), (2, 5), (5, 9), (9, 10)], [(2, 6), (8, 10)]) == [1, 3]
    assert tokens_inside([(3, 3), (4, 6)], [(2, 6)]) == [0, 1]


def test_official_coverage_scores_only_the_first_length_minus_one_tokens(model):
    docs = [np.arange(300) % 50, np.arange(130) % 50]
    assert [len(w) for w in scored_windows(docs, 120, "official")] == [119, 119]
    assert [len(w) for w in scored_windows(docs, 120, "disjoint")] == [120, 120, 60, 120, 10]
    with pytest.raises(RopekitError, match="coverage must be one of disjoint, official"):
        scored_windows(docs, 120, "first")
    result = long_ppl(
        model, docs, length=120, short_length=64, threshold=-math.inf, beta=-math.inf, coverage="official"
    )
    assert result.tokens_considered == result.key_tokens == 2 * (119 - 64)
    assert result.as_dict()["coverage"] == "official" and result.scored == COVERAGES["official"]


@pytest.mark.slow
def test_a_word_level_evaluator_finds_the_self_evaluators_key_tokens(model, documents):
    """The model as its own 'separate' evaluator through a word-level tokenizer: key tokens by offsets are the
    self-evaluator's; by decoded widths (leading spaces inside the spans) none were found (LongPPL None)."""
    tok = word_level_tokenizer()
    kwargs = dict(length=200, short_length=64, sliding_window=32, threshold=0.05, beta=-math.inf)
    direct = long_ppl(model, documents, **kwargs)
    mapped = long_ppl(model, documents, evaluator=Evaluator(model, tok, "word-level"), tokenizer=tok, **kwargs)
    assert mapped.key_tokens == direct.key_tokens > 0 and mapped.long_ppl == pytest.approx(direct.long_ppl)
    assert mapped.offset_fallback_tokens == 0 and "offset mapping" in mapped.offsets
