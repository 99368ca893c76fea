"""LongPPL (Fang et al. 2024, "What is Wrong with Perplexity for Long-context Language Modeling?"),
following PKU-ML/LongPPL `longppl/longppl.py`.

Perplexity over the *key tokens* only. The long context is a window of `length` tokens
(disjoint windows cover each document). Token t of a window is key when, under the evaluator,
  * log p_long(t) − log p_short(t) > α   (the long-short difference, α = `threshold`, default 2), and
  * log p_long(t) > β                    (the long context predicts it well, β = `beta`, default −2).
Short contexts as the official code builds them: windows of `short_length` + `sliding_window`
tokens starting at 0, `sliding_window`, 2·`sliding_window`, …; each scores its last
`sliding_window` tokens, so token t ≥ short_length sees between short_length and
short_length + sliding_window − 1 tokens. Tokens before `short_length` are never key.
Official defaults: short_length 4096, sliding_window 1024.

The evaluator is the model under test unless another one is given (the paper's protocol uses a
stronger evaluator). A separate evaluator reads the window's decoded text with its own
tokenizer; its key tokens become character intervals (adjacent ones merged), and a token of
the model under test is key when its characters lie inside one interval. Character offsets
come from the tokenizer's offset mapping when it has one, else from decoding token pairs.
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


PROTOCOL = "longppl/2"
FOLLOWS = "PKU-ML/LongPPL longppl/longppl.py (Fang et al. 2024)"


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


def encode_with_offsets(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        encoded = tokenizer(text, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError):
        ids = tokenizer(text)["input_ids"]
        return ids, decoded_offsets(tokenizer, ids)


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
    """Indices of the spans that lie inside one of the (sorted, disjoint) intervals."""
    return [i for i, (a, b) in enumerate(spans) if any(lo <= a and b <= hi for lo, hi in intervals) and b > a]


def evaluator_key_positions(
    evaluator: Evaluator,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    *,
    short_length: int,
    sliding_window: int,
    threshold: float,
    beta: float,
) -> torch.Tensor:
    """Key mask over the window's scored positions (index t − 1), found by a separate evaluator."""
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
    mask = torch.zeros(len(text_ids) - 1, dtype=torch.bool)
    for t in tokens_inside(decoded_offsets(tokenizer, text_ids), intervals):
        if t >= 1:
            mask[t - 1] = True
    return mask


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
) -> LongPPLResult:
    """LongPPL of `model` over disjoint windows of `length` tokens covering each document.

    With an `evaluator`, `tokenizer` (the model's) is needed to turn windows into text.
    """
    if not 2 <= short_length < length:
        raise RopekitError(f"the LongPPL short context must be in [2, length {length}), got {short_length}")
    if sliding_window < 1:
        raise RopekitError(f"the LongPPL sliding window must be ≥ 1 token, got {sliding_window}")
    if evaluator is not None and tokenizer is None:
        raise RopekitError("a separate LongPPL evaluator needs the model's tokenizer to share text with it")
    nll, keys, considered = 0.0, 0, 0
    spans = [doc[start : start + length] for doc in documents for start in range(0, len(doc), length)]
    for span in spans:
        ids = torch.as_tensor(span, dtype=torch.long)
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
            mask = evaluator_key_positions(
                evaluator,
                tokenizer,
                ids,
                short_length=short_length,
                sliding_window=sliding_window,
                threshold=threshold,
                beta=beta,
            )
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
    )
