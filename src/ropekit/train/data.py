"""Training windows from long documents.

Documents are tokenised once (cached, see `ropekit.data.documents`) and packed into one stream,
**with an EOS token marking each document boundary**, then cut into consecutive windows of
the training length (the tail shorter than a window is dropped). Windows are visited in a
seeded permutation; the window for (step, micro-batch, rank) is a pure function of those
numbers, so resuming and changing the number of processes (at a fixed global batch) see the
same data.

A passkey mix (`mix_passkey`) appends passkey-retrieval examples, each one window of a yarn-style
prompt with its answer (see `ropekit.data.passkey_prompts`), so that they make a given share of all
windows; the seeded permutation then spreads them over training.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np

from ropekit.data.passkey_prompts import build_prompt
from ropekit.errors import RopekitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def pack_windows(documents: list[np.ndarray], window: int, *, eos_id: int | None) -> np.ndarray:
    """(num_windows, window) int64 token ids; documents joined with EOS between them."""
    pieces = []
    for doc in documents:
        pieces.append(np.asarray(doc, dtype=np.int64))
        if eos_id is not None:
            pieces.append(np.array([eos_id], dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    count = len(stream) // window
    if count == 0:
        raise RopekitError(
            f"the training text has {len(stream)} tokens, fewer than one window of {window}; "
            "add text or lower the training length"
        )
    return stream[: count * window].reshape(count, window)


def window_order(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded visiting order of the windows for one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


def window_indices(
    step: int, micro: int, rank: int, *, num_windows: int, micro_batch: int, world: int, accumulation: int, seed: int
) -> list[int]:
    """Windows that `rank` trains on at optimizer step `step`, micro-batch `micro` (all 0-based).

    Global position of a sample: step·B + (micro·world + rank)·micro_batch + j, with
    B = micro_batch · world · accumulation; epochs wrap with a fresh permutation.
    """
    global_batch = micro_batch * world * accumulation
    first = step * global_batch + (micro * world + rank) * micro_batch
    out = []
    for position in range(first, first + micro_batch):
        epoch, offset = divmod(position, num_windows)
        out.append(int(window_order(num_windows, seed, epoch)[offset]))
    return out


def passkey_windows(
    tokenizer: PreTrainedTokenizerBase, count: int, width: int, *, seed: int, eos_id: int | None
) -> np.ndarray:
    """(count, width) int64 token ids: passkey examples, each the longest yarn-style prompt whose
    prompt + answer (" N") + EOS fit in `width` tokens, then EOS up to `width`. Example k draws its
    needle depth ~ U[0, 1] and key N ~ U{1 … 50000} from (seed, k)."""
    if eos_id is None:
        raise RopekitError("a passkey mix needs a tokenizer with an EOS token (it ends each example)")
    out = np.full((count, width), eos_id, dtype=np.int64)
    for k in range(count):
        rng = random.Random(f"passkey-mix-{seed}-{k}")
        depth, key = rng.random(), rng.randint(1, 50000)
        try:
            prompt = build_prompt(tokenizer, width - 1, depth, key)
        except RopekitError:
            raise RopekitError(
                f"--passkey-mix: a passkey example does not fit in a training window of {width} tokens"
            ) from None
        ids = prompt.prompt_ids + prompt.answer_ids
        out[k, : len(ids)] = ids
    return out


def passkey_count(num_text_windows: int, share: float) -> int:
    """How many passkey windows make `share` of all windows beside `num_text_windows` text windows (≥ 1)."""
    return max(1, round(share / (1.0 - share) * num_text_windows))


def mix_passkey(
    windows: np.ndarray, share: float, tokenizer: PreTrainedTokenizerBase, *, seed: int, eos_id: int | None
) -> np.ndarray:
    """The text windows followed by passkey windows making `share` (0 ≤ share < 1) of the total."""
    if not 0.0 <= share < 1.0:
        raise RopekitError(f"--passkey-mix must be a share in [0, 1), got {share}")
    if share == 0.0:
        return windows
    count = passkey_count(len(windows), share)
    return np.concatenate([windows, passkey_windows(tokenizer, count, windows.shape[1], seed=seed, eos_id=eos_id)])
