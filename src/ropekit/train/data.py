"""Training windows from long documents.

Documents are tokenised once (cached, see `ropekit.data.documents`) and packed into one stream,
**with an EOS token marking each document boundary**, then cut into consecutive windows of
the training length (the tail shorter than a window is dropped). Windows are visited in a
seeded permutation; the window for (step, micro-batch, rank) is a pure function of those
numbers, so resuming and changing the number of processes (at a fixed global batch) see the
same data.
"""

from __future__ import annotations

import numpy as np

from ropekit.errors import RopekitError


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
