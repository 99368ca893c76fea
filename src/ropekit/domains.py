"""The valid range of a numeric option, declared once with the option.

A `Domain` is attached to a method parameter (`ropekit.plan.methods.record.Param.domain`), a
fine-tuning setting (`TrainConfig` field metadata) or a geometry number (`ropekit.plan.geometry`);
the Python API checks it (`Domain.check`, one `RopekitError` line) and the CLI's --help states it
(`Domain.describe`), so the two never disagree. Upper bounds that exist for memory say so in `why`.

>>> BINS = Domain(1, 36_000, integer=True, why="memory")
>>> BINS.describe()
'an integer in [1, 36000]'
>>> BINS.check("--bins", 0)
Traceback (most recent call last):
...
ropekit.errors.RopekitError: --bins must be an integer in [1, 36000] (memory), got 0
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from ropekit.errors import RopekitError


@dataclass(frozen=True)
class Domain:
    """Numbers in [low, high] (either end open or absent); finite always; whole numbers with `integer`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded (e.g. a learning rate > 0)
    high_open: bool = False
    integer: bool = False
    why: str = ""  # why the bound is what it is (shown after the range), e.g. "memory"

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if not isinstance(value, numbers.Integral) and not math.isfinite(float(value)):
            return False
        x = int(value) if isinstance(value, numbers.Integral) else float(value)  # exact for big integers
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        return not (self.high is not None and (x > self.high or (self.high_open and x == self.high)))

    def check(self, name: str, value: Any) -> Any:
        """`value` if it is in the domain, else one `RopekitError` naming `name`, the range and the value."""
        if not self.contains(value):
            reason = f" ({self.why})" if self.why else ""
            raise RopekitError(f"{name} must be {self.describe()}{reason}, got {value!r}")
        return value

    def describe(self) -> str:
        """The range in words: 'a number > 0', 'an integer in [1, 36000]', 'a number in [0, 1)'."""
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '≥'} {_num(self.low)}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '≤'} {_num(self.high)}"
        return f"a finite {kind.split()[-1]}"

    def help(self) -> str:
        """The range as --help shows it after the option's own text, e.g. '(valid: an integer in [1, 36000])'."""
        return f"(valid: {self.describe()})"


def _num(x: float) -> str:
    if float(x).is_integer() and abs(x) < 1e10:
        return str(int(x))
    return f"{x:g}"


POSITIVE = Domain(0, low_open=True)  # a finite number > 0
NON_NEGATIVE = Domain(0)  # a finite number ≥ 0
SEED = Domain(0, 2**32 - 1, integer=True, why="numpy and torch seeds are unsigned 32-bit")
POSITIVE_INTEGER = Domain(1, integer=True)
TOKEN_WINDOW = Domain(2, integer=True)  # tokens of a window: at least a context and the token it predicts
