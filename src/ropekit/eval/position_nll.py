"""Next-token NLL by position in one causal pass: quality beyond the trained length and retention within it.

One forward pass over the first `length` tokens of a document scores every position t = 1 … length − 1
(log p(x_t | x_<t)). Causal attention makes the first P positions of that pass exactly a P-token window,
so the same pass gives:

  * `nll_beyond`: mean NLL (nats) over positions t ≥ trained_length, the context the model never saw;
  * `nll_within`: mean NLL over positions 1 ≤ t < trained_length;
  * `prefix_ppl[P]`: the perplexity of the first P tokens as one window (positions 1 … P − 1), e.g.
    P = 2,048 as short-context retention: a plan that keeps short-context quality leaves it unchanged;
  * NLL by position bucket, per document (for plots, and for noise estimates: the spread across
    documents or a block bootstrap over buckets).

Means over several documents are token-weighted (every scored position counts once). NLL is in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ropekit.errors import RopekitError
from ropekit.eval.backend import Scorer, as_scorer

DEFAULT_BUCKET = 256  # tokens per position bucket
DEFAULT_PREFIXES = (2048,)  # retention windows P


@dataclass(frozen=True)
class PositionNLL:
    """The result of `position_nll` (see the module docstring). NLL in nats; perplexity = exp(NLL)."""

    length: int  # tokens per document window
    trained_length: int  # positions ≥ this are "beyond"
    bucket: int  # tokens per position bucket
    documents: int
    nll: float  # all scored positions
    nll_within: float  # 1 ≤ t < trained_length
    nll_beyond: float | None  # t ≥ trained_length (None if the window does not reach it)
    prefix_ppl: dict[str, float]  # P → perplexity of the first P tokens as one window
    per_document: list[dict[str, Any]]  # per document: nll, nll_within, nll_beyond, bucket_nll (list)

    @property
    def perplexity(self) -> float:
        """Perplexity of the whole window."""
        return math.exp(self.nll)

    def by_position(self) -> dict[int, float]:
        """Bucket start → mean NLL over every document (token-weighted)."""
        return dict(zip(*bucket_means(self.as_dict())))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def position_nll(
    model: Scorer | torch.nn.Module,
    documents: Sequence[Sequence[int] | np.ndarray | torch.Tensor],
    *,
    length: int,
    trained_length: int,
    bucket: int = DEFAULT_BUCKET,
    prefixes: Sequence[int] = DEFAULT_PREFIXES,
    loss_chunk: int = 512,
) -> PositionNLL:
    """NLL by position over the first `length` tokens of each document (one causal pass each).

    Every document must hold at least `length` tokens; `prefixes` are the retention windows P
    (each ≤ length) reported as perplexities.
    """
    check_window(documents, length=length, trained_length=trained_length, bucket=bucket, prefixes=prefixes)
    scorer = as_scorer(model, loss_chunk=loss_chunk)
    per_token = []
    for doc in documents:
        ids = torch.as_tensor(np.asarray(doc[:length]), dtype=torch.long)
        with torch.no_grad():
            per_token.append(-scorer.token_logprobs(ids).double())  # (length − 1,)
    return summarise(per_token, length=length, trained_length=trained_length, bucket=bucket, prefixes=prefixes)


def check_window(
    documents: Sequence[Any], *, length: int, trained_length: int, bucket: int, prefixes: Sequence[int]
) -> None:
    """Refuse windows that cannot give the quantities asked for, before any forward pass."""
    if not documents:
        raise RopekitError("position NLL needs at least one document")
    if length < 2:
        raise RopekitError(f"window length must be at least 2 tokens, got {length}")
    if trained_length < 2:
        raise RopekitError(f"trained length must be at least 2 tokens, got {trained_length}")
    if bucket < 1:
        raise RopekitError(f"position bucket must be at least 1 token, got {bucket}")
    short = [len(d) for d in documents if len(d) < length]
    if short:
        raise RopekitError(
            f"{len(short)} of {len(documents)} documents are shorter than the {length}-token window "
            f"(shortest {min(short)} tokens); use longer documents or a shorter window"
        )
    bad = [p for p in prefixes if not 2 <= p <= length]
    if bad:
        raise RopekitError(f"retention window {bad[0]} must be between 2 and the window length {length}")


def summarise(
    per_token: Sequence[torch.Tensor], *, length: int, trained_length: int, bucket: int, prefixes: Sequence[int]
) -> PositionNLL:
    """`PositionNLL` from per-document NLL tensors of shape (length − 1,) for positions 1 … length − 1."""
    nll = torch.stack(list(per_token))  # (documents, length − 1)
    positions = torch.arange(1, length)
    beyond = positions >= trained_length
    starts = range(0, length, bucket)
    per_document = []
    for row in nll:
        buckets = [(positions >= a) & (positions < a + bucket) for a in starts]
        per_document.append(
            {
                "nll": float(row.mean()),
                "nll_within": float(row[~beyond].mean()),
                "nll_beyond": float(row[beyond].mean()) if bool(beyond.any()) else None,
                "bucket_nll": [float(row[m].mean()) if bool(m.any()) else None for m in buckets],
                "bucket_tokens": [int(m.sum()) for m in buckets],
            }
        )
    return PositionNLL(
        length=length,
        trained_length=trained_length,
        bucket=bucket,
        documents=len(per_document),
        nll=float(nll.mean()),
        nll_within=float(nll[:, ~beyond].mean()),
        nll_beyond=float(nll[:, beyond].mean()) if bool(beyond.any()) else None,
        prefix_ppl={str(p): math.exp(float(nll[:, : p - 1].mean())) for p in prefixes},
        per_document=per_document,
    )


def bucket_means(result: dict[str, Any]) -> tuple[list[int], list[float]]:
    """(bucket starts, token-weighted mean NLL over the documents) of a `PositionNLL.as_dict()` (as stored and
    written to results.json); empty buckets are left out."""
    tokens = np.array([d["bucket_tokens"] for d in result["per_document"]], dtype=float)
    nll = np.array([[v or 0.0 for v in d["bucket_nll"]] for d in result["per_document"]], dtype=float)
    counts = tokens.sum(axis=0)
    kept = counts > 0
    starts = [i * result["bucket"] for i in range(len(counts)) if kept[i]]
    return starts, [float(v) for v in (nll * tokens).sum(axis=0)[kept] / counts[kept]]
