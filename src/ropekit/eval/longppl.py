"""LongPPL (Fang et al. 2024, "What is Wrong with Perplexity for Long-context Language Modeling?"),
following PKU-ML/LongPPL `longppl/longppl.py`.

Perplexity over the *key tokens* only. The long context is a window of `length` tokens. Token t
of a window is key when, under the evaluator,
  * log p_long(t) − log p_short(t) > α   (the long-short difference, α = `threshold`, default 2), and
  * log p_long(t) > β                    (the long context predicts it well, β = `beta`, default −2).
Short contexts as the official code builds them: windows of `short_length` + `sliding_window`
tokens starting at 0, `sliding_window`, 2·`sliding_window`, …; each scores its last
`sliding_window` tokens, so token t ≥ short_length sees between short_length and
short_length + sliding_window − 1 tokens. Tokens before `short_length` are never key.
Official defaults: short_length 4096, sliding_window 1024.

Which tokens are scored (`coverage`):
  * "disjoint" (ropekit's default): disjoint windows of `length` tokens across each whole document;
  * "official": only each document's first `length` − 1 tokens, as the official script
    (`perplexity/perplexity.py`, `x[0:max_length-1]` with max_length = `length`) scores them.
Both pool every key token of every window into one mean (the official script's token-weighted
mean over documents is the same number).

The evaluator is the model under test unless another one is given (the paper's protocol uses a
stronger evaluator). A separate evaluator reads the window's decoded text with its own tokenizer
(special tokens added, as the official code calls it); its key tokens become character
intervals from that tokenizer's offset mapping (adjacent ones merged). The model's tokens get
character spans from its own tokenizer's offset mapping of the same text, encoded without
special tokens as the official `compute_longppl` does; a token is key when its span lies inside
an interval, found by the official `cal_overlap` walk. Where re-encoding the text does not give
back the window's tokens (a window that starts inside a word; special tokens), those tokens get
the span their decoded text adds (the official fallback when a tokenizer has no offsets), and
results.json counts the key-eligible ones (`offset_fallback_tokens`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ropekit.data.documents import decode_text
from ropekit.errors import RopekitError
from ropekit.eval.perplexity import token_logprobs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


PROTOCOL = "longppl/3"
FOLLOWS = "PKU-ML/LongPPL longppl/longppl.py (Fang et al. 2024)"
COVERAGES = {
    "disjoint": "disjoint windows of length tokens across each whole document (ropekit)",
    "official": "each document's first length − 1 tokens only (PKU-ML/LongPPL perplexity/perplexity.py)",
}
OFFSETS = (
    "character offsets from each tokenizer's offset mapping of the window text (official cal_overlap); "
    "decoded token widths where re-encoding does not reproduce a token"
)


@dataclass(frozen=True)
class Evaluator:
    """A separate key-token evaluator: a model and its tokenizer, and a name to record."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str


@dataclass(frozen=True)
class LongPPLResult:
    long_ppl: float | None  # exp(mean NLL over key tokens, long context); None when no token is key
    key_tokens: int
    tokens_considered: int
    threshold: float  # α, nats
    beta: float  # β, nats
    short_length: int
    sliding_window: int
    length: int
    evaluator: str  # "self (the model under test)" or the evaluator's name
    coverage: str = "disjoint"  # a key of COVERAGES
    scored: str = COVERAGES["disjoint"]
    offsets: str | None = None  # a separate evaluator: how token positions were matched (OFFSETS)
    offset_fallback_tokens: int = 0  # key-eligible tokens (past the short context) matched by decoded widths
    protocol: str = PROTOCOL
    follows: str = FOLLOWS

    def as_dict(self) -> dict:
        return asdict(self)


def short_context_logprobs(
    model: PreTrainedModel, ids: torch.Tensor, short_length: int, sliding_window: int
) -> torch.Tensor:
    """log p(ids[t] | short context) at index t − 1 for t ≥ short_length; NaN before (no short score)."""
    out = torch.full((len(ids) - 1,), math.nan)
    for start in range(0, len(ids) - short_length, sliding_window):
        end = min(start + short_length + sliding_window, len(ids))
        out[start + short_length - 1 : end - 1] = token_logprobs(model, ids[start:end], score_from=short_length)
    return out


def key_mask(long_lp: torch.Tensor, short_lp: torch.Tensor, *, threshold: float, beta: float) -> torch.Tensor:
    """Boolean per scored position: long − short > α and long > β (NaN short scores are never key)."""
    return ((long_lp - short_lp) > threshold) & (long_lp > beta)


def decoded_offsets(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in the decoded text, from the length each token adds after its predecessor."""
    spans, pointer = [], 0
    for i in range(len(ids)):
        if i == 0:
            width = len(tokenizer.decode(ids[:1], skip_special_tokens=True))
        else:
            width = len(tokenizer.decode(ids[i - 1 : i + 1], skip_special_tokens=True)) - len(
                tokenizer.decode(ids[i - 1 : i], skip_special_tokens=True)
            )
        spans.append((pointer, pointer + width))
        pointer += width
    return spans


def encode_with_offsets(
    tokenizer: PreTrainedTokenizerBase, text: str, *, add_special_tokens: bool = True
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character spans of `text`: the tokenizer's offset mapping, else decoded widths."""
    try:
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError):
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return ids, decoded_offsets(tokenizer, ids)


def window_offsets(tokenizer: PreTrainedTokenizerBase, ids: list[int], text: str) -> tuple[list[tuple[int, int]], int]:
    """Character span of each of the window's tokens in `text` (its decoding without special tokens),
    and the index of the first token whose span is the tokenizer's own.

    The text is encoded without special tokens with offsets (the official `compute_longppl`);
    matching from the end, the tokens it gives back take their offsets; the tokens before (a
    window cut inside a word re-encodes differently at its start; special tokens) take the span
    their decoded text adds."""
    encoded, offsets = encode_with_offsets(tokenizer, text, add_special_tokens=False)
    matched = 0  # tokens at the end that the re-encoding gives back
    while matched < min(len(ids), len(encoded)) and ids[-1 - matched] == encoded[-1 - matched]:
        matched += 1
    own = len(ids) - matched
    return decoded_offsets(tokenizer, ids[:own]) + offsets[len(offsets) - matched :], own


def merge_adjacent(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join intervals where one ends exactly where the next starts (sorted input)."""
    merged: list[tuple[int, int]] = []
    for start, end in intervals:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def tokens_inside(spans: list[tuple[int, int]], intervals: list[tuple[int, int]]) -> list[int]:
    """The official `cal_overlap` walk over token spans and sorted, disjoint key intervals: a token
    inside the current interval is key (its index is returned); one that starts before it is
    passed; any other moves on to the next interval."""
    found, i, j = [], 0, 0
    while i < len(spans) and j < len(intervals):
        (a_start, a_end), (b_start, b_end) = spans[i], intervals[j]
        if a_start >= b_start and a_end <= b_end:
            found.append(i)
            i += 1
        elif a_start < b_start:
            i += 1
        else:
            j += 1
    return found


def evaluator_key_positions(
    evaluator: Evaluator,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    *,
    short_length: int,
    sliding_window: int,
    threshold: float,
    beta: float,
) -> tuple[torch.Tensor, int]:
    """Key mask over the window's scored positions (index t − 1), found by a separate evaluator,
    and how many tokens past the short context were matched by decoded widths."""
    text_ids = ids.tolist()
    text = decode_text(tokenizer, text_ids, skip_special_tokens=True)
    judge_ids, judge_spans = encode_with_offsets(evaluator.tokenizer, text)
    judge_ids_t = torch.as_tensor(judge_ids, dtype=torch.long)
    judged = torch.zeros(len(judge_ids) - 1, dtype=torch.bool)
    if len(judge_ids) > short_length:
        long_lp = token_logprobs(evaluator.model, judge_ids_t)
        short_lp = short_context_logprobs(evaluator.model, judge_ids_t, short_length, sliding_window)
        judged = key_mask(long_lp, short_lp, threshold=threshold, beta=beta)
    intervals = merge_adjacent([judge_spans[t] for t in range(1, len(judge_ids)) if judged[t - 1]])
    spans, own = window_offsets(tokenizer, text_ids, text)
    mask = torch.zeros(len(text_ids) - 1, dtype=torch.bool)
    for t in tokens_inside(spans, intervals):
        if t >= 1:  # (the official would read index −1 for token 0: never key, it precedes the short context)
            mask[t - 1] = True
    return mask, max(0, own - short_length)


def scored_windows(documents: list[np.ndarray], length: int, coverage: str) -> list[np.ndarray]:
    """The token windows LongPPL scores under `coverage` (see COVERAGES)."""
    if coverage not in COVERAGES:
        raise RopekitError(f"LongPPL coverage must be one of {', '.join(COVERAGES)}, got {coverage!r}")
    if coverage == "official":
        return [doc[: length - 1] for doc in documents]
    return [doc[start : start + length] for doc in documents for start in range(0, len(doc), length)]


def long_ppl(
    model: PreTrainedModel,
    documents: list[np.ndarray],
    *,
    length: int,
    short_length: int = 4096,
    sliding_window: int = 1024,
    threshold: float = 2.0,
    beta: float = -2.0,
    evaluator: Evaluator | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    coverage: str = "disjoint",
) -> LongPPLResult:
    """LongPPL of `model` over windows of `length` tokens: disjoint windows covering each document
    (`coverage="disjoint"`), or each document's first `length` − 1 tokens as the official script
    scores them (`coverage="official"`).

    With an `evaluator`, `tokenizer` (the model's) is needed to turn windows into text.
    """
    if not 2 <= short_length < length:
        raise RopekitError(f"the LongPPL short context must be in [2, length {length}), got {short_length}")
    if sliding_window < 1:
        raise RopekitError(f"the LongPPL sliding window must be ≥ 1 token, got {sliding_window}")
    if evaluator is not None and tokenizer is None:
        raise RopekitError("a separate LongPPL evaluator needs the model's tokenizer to share text with it")
    nll, keys, considered, fallback = 0.0, 0, 0, 0
    for window in scored_windows(documents, length, coverage):
        ids = torch.as_tensor(window, dtype=torch.long)
        if len(ids) <= short_length:
            continue
        long_lp = token_logprobs(model, ids)
        if evaluator is None or tokenizer is None:  # (a tokenizer comes with every evaluator: checked above)
            mask = key_mask(
                long_lp,
                short_context_logprobs(model, ids, short_length, sliding_window),
                threshold=threshold,
                beta=beta,
            )
        else:
            mask, unmatched = evaluator_key_positions(
                evaluator,
                tokenizer,
                ids,
                short_length=short_length,
                sliding_window=sliding_window,
                threshold=threshold,
                beta=beta,
            )
            fallback += unmatched
        nll += float(-long_lp[mask].double().sum())
        keys += int(mask.sum())
        considered += len(ids) - short_length
    if considered == 0:
        raise RopekitError(f"no document is longer than the short context ({short_length} tokens)")
    value = math.exp(nll / keys) if keys else None  # no key token: the long context never helped enough
    return LongPPLResult(
        value,
        keys,
        considered,
        threshold,
        beta,
        short_length,
        sliding_window,
        length,
        "self (the model under test)" if evaluator is None else evaluator.name,
        coverage,
        COVERAGES[coverage],
        None if evaluator is None else OFFSETS,
        fallback,
    )
