"""Ctrl-C or SIGTERM during fine-tuning: the first stops after the current step on every rank, the second aborts."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

from ropekit.errors import Terminated

if TYPE_CHECKING:
    from accelerate import Accelerator


class GracefulStop:
    """First Ctrl-C or SIGTERM: finish the current step, checkpoint, stop. A second: abort at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_number = int(signal.SIGINT)  # the first stop signal received (for the exit status)
        self._previous: dict[int, Any] = {}  # the handlers this one replaced

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.requested, self.signal_number = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{name}: stopping after this step (again to abort)", file=sys.stderr, flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {int(s): signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if any rank asked to stop (one scalar all-reduce per step)."""
    if accelerator.num_processes == 1:
        return flag
    return float(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum")) > 0
