"""LongPPL (Fang et al. 2024, "What is Wrong with Perplexity for Long-context Language Modeling?").

Perplexity over the *key tokens* only. A token is key when its log-probability with the long
context exceeds its log-probability with a short context by more than `threshold` nats
(the paper's long-short difference, LSD; its default 2). The long context is the whole
window of `length` tokens. The short context is `short_length` tokens, evaluated with
strided windows of that length and stride short_length/2, so every token after the first
short window sees between short_length/2 and short_length tokens of context.

The paper identifies key tokens with a separate evaluator model. Here the model under test
is its own evaluator unless `evaluator` is given; both are recorded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ropekit.errors import RopekitError
from ropekit.eval.perplexity import token_logprobs, windows


@dataclass(frozen=True)
class LongPPLResult:
    long_ppl: float | None  # exp(mean NLL over key tokens, long context); None when no token is key
    key_tokens: int
    tokens_considered: int
    threshold: float  # nats
    short_length: int
    length: int
    evaluator: str  # "self" or a description of the evaluator model

    def as_dict(self) -> dict:
        return asdict(self)


def short_context_logprobs(model, ids: torch.Tensor, short_length: int) -> torch.Tensor:
    """log p(ids[t] | ≤ short_length previous tokens) for t = 1 … T−1 (strided, stride short_length/2)."""
    out = torch.empty(len(ids) - 1)
    for w in windows(len(ids), short_length, convention="strided", stride=max(short_length // 2, 1)):
        part = token_logprobs(model, ids[w.start : w.end], score_from=w.score_from - w.start)
        out[w.score_from - 1 : w.end - 1] = part
    return out


def long_ppl(model, documents: list[np.ndarray], *, length: int, short_length: int = 256, threshold: float = 2.0,
             evaluator=None) -> LongPPLResult:
    """LongPPL of `model` over disjoint windows of `length` tokens covering each document."""
    if not 2 <= short_length < length:
        raise RopekitError(f"short_length must be in [2, length {length}), got {short_length}")
    judge = evaluator if evaluator is not None else model
    nll, keys, considered = 0.0, 0, 0
    spans = [doc[start : start + length] for doc in documents for start in range(0, len(doc), length)]
    for span in spans:
        ids = torch.as_tensor(span, dtype=torch.long)
        if len(ids) <= short_length:
            continue
        long_lp = token_logprobs(model, ids)
        judge_long = long_lp if judge is model else token_logprobs(judge, ids)
        judge_short = short_context_logprobs(judge, ids, short_length)
        mask = torch.zeros(len(ids) - 1, dtype=torch.bool)
        mask[short_length - 1 :] = (judge_long - judge_short)[short_length - 1 :] > threshold
        nll += float(-long_lp[mask].double().sum())
        keys += int(mask.sum())
        considered += len(ids) - short_length
    if considered == 0:
        raise RopekitError(f"no document is longer than the short context ({short_length} tokens)")
    value = math.exp(nll / keys) if keys else None  # no key token: the long context never helped enough
    return LongPPLResult(value, keys, considered, threshold, short_length, length,
                         "self" if evaluator is None else type(evaluator).__name__)
