"""One exception type for every user-facing mistake.

`RopekitError` subclasses `ValueError`, so Python callers can catch either.
The CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RopekitError(ValueError):
    """A bad input, with a message that names the fix."""

    exit_code = 2  # the CLI's exit status


class Interrupted(RopekitError):
    """The user interrupted the run (Ctrl-C, or SIGTERM); the message says what was kept.
    CLI exit 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, message: str, *, signal_number: int = 2) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would raise KeyboardInterrupt, so the same clean-up runs
    (partial files removed); the CLI exits 143."""

    exit_code = 143


def did_you_mean(kind: str, name: str, choices: Iterable[str]) -> RopekitError:
    """Build the error for an unknown `name` among `choices`, with a suggestion."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return RopekitError(f"unknown {kind} {name!r}{hint} Choose from: {', '.join(choices)}")
