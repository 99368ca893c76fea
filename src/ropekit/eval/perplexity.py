"""Perplexity over long documents, with the convention named and recorded.

Conventions (shared reference, "Evaluation conventions"):
  * "strided": sliding window of L tokens moved by stride S; each window scores only the
    tokens no earlier window scored (the first window scores all but its first token).
  * "disjoint": consecutive non-overlapping windows of L tokens, each scoring all but its first.
  * "truncated": one window per document, its first L tokens.
Aggregation is token-weighted: exp(Σ NLL / Σ scored tokens) over all windows and documents.

Memory: the decoder runs once per window (SDPA attention); the LM head and the loss are
applied to `loss_chunk` positions at a time, so full-length float32 logits (L × vocab) are
never materialised. The model may be any `ropekit.eval.backend.Scorer` (e.g. llama.cpp's).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ropekit.errors import RopekitError
from ropekit.eval.backend import Scorer, as_scorer, final_logits, token_logprobs

__all__ = [
    "CONVENTIONS",
    "PerplexityResult",
    "Window",
    "final_logits",
    "perplexity",
    "scored_windows",
    "token_logprobs",
    "window_nll",
    "windows",
]


CONVENTIONS = ("strided", "disjoint", "truncated")


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window in the document
    end: int  # one past the last token
    score_from: int  # first position (document index) whose prediction is scored; > start


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float  # nats
    tokens_scored: int
    windows: int
    documents: int
    length: int  # window L, tokens
    stride: int | None  # S for "strided"
    convention: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_sums(
        cls, nll: float, count: int, *, windows: int, documents: int, length: int, stride: int, convention: str
    ) -> PerplexityResult:
        """exp(mean NLL) from a summed NLL (nats) over `count` scored tokens; `stride` is kept for "strided" only."""
        return cls(
            perplexity=math.exp(nll / count),
            nll_sum=nll,
            tokens_scored=count,
            windows=windows,
            documents=documents,
            length=length,
            stride=stride if convention == "strided" else None,
            convention=convention,
        )


def scored_windows(
    documents: Sequence[Sequence[int] | np.ndarray], length: int, *, convention: str, stride: int
) -> list[tuple[int, Window]]:
    """(document index, window) for every window of every document; refuses documents with nothing to score."""
    plan = [
        (d, w)
        for d, doc in enumerate(documents)
        for w in windows(len(doc), length, convention=convention, stride=stride)
    ]
    if not plan:
        raise RopekitError("no document has at least 2 tokens to score")
    return plan


def windows(num_tokens: int, length: int, *, convention: str = "strided", stride: int = 256) -> Iterator[Window]:
    """The windows and scored spans of one document under a convention."""
    if convention not in CONVENTIONS:
        raise RopekitError(f"perplexity convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if num_tokens < 2:
        return
    if convention == "truncated":
        yield Window(0, min(length, num_tokens), 1)
    elif convention == "disjoint":
        for start in range(0, num_tokens - 1, length):
            end = min(start + length, num_tokens)
            if end - start >= 2:
                yield Window(start, end, start + 1)
    else:
        if not 0 < stride <= length:
            raise RopekitError(f"stride must be in [1, window length {length}], got {stride}")
        scored_until = 1  # token 0 has no prediction
        for start in range(0, num_tokens, stride):
            end = min(start + length, num_tokens)
            if end > scored_until:
                yield Window(start, end, max(scored_until, start + 1))
                scored_until = end
            if end == num_tokens:
                break


def window_nll(
    model: Scorer | torch.nn.Module, ids: torch.Tensor, *, score_from: int, loss_chunk: int = 512
) -> tuple[float, int]:
    """Σ NLL (nats) of predicting ids[t] for t ≥ score_from (window-relative), and the count."""
    logprobs = as_scorer(model, loss_chunk=loss_chunk).token_logprobs(ids, score_from=score_from)
    return float(-logprobs.double().sum()), logprobs.numel()


def perplexity(
    model: Scorer | torch.nn.Module,
    documents: Sequence[Sequence[int] | np.ndarray],
    *,
    length: int,
    convention: str = "strided",
    stride: int = 256,
    loss_chunk: int = 512,
    progress: bool = False,
    label: str = "",
) -> PerplexityResult:
    """Token-weighted perplexity of `model` over tokenised documents at window length `length`.

    `label` (e.g. the method) prefixes the progress bar: "dprope · perplexity @ 512".
    """
    if length < 2:
        raise RopekitError(f"window length must be ≥ 2, got {length}")
    plan = scored_windows(documents, length, convention=convention, stride=stride)
    iterator = plan
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(
            plan,
            desc=f"{label + ' · ' if label else ''}perplexity @ {length} ({convention})",
            unit="window",
            leave=False,
        )
    scorer = as_scorer(model, loss_chunk=loss_chunk)
    nll, count = 0.0, 0
    for d, w in iterator:
        ids = torch.as_tensor(np.asarray(documents[d][w.start : w.end]), dtype=torch.long)
        part, n = window_nll(scorer, ids, score_from=w.score_from - w.start)
        nll, count = nll + part, count + n
    return PerplexityResult.from_sums(
        nll, count, windows=len(plan), documents=len(documents), length=length, stride=stride, convention=convention
    )
