"""Ctrl-C during fine-tuning: the first stops after the current step on every rank, the second aborts."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


class GracefulStop:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: abort at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None  # the SIGINT handler this one replaced

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if any rank asked to stop (one scalar all-reduce per step)."""
    if accelerator.num_processes == 1:
        return flag
    return float(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")) > 0
