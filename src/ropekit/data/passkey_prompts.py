"""Passkey prompts (Mohtashami & Jaggi 2023), built as yarn's `eval/passkey.py` builds them by default.

Shared by evaluation (`ropekit.eval.passkey` scores them) and training (`ropekit.train.data` mixes
them into fine-tuning windows so that retrieval is trained rather than forgotten).

Prompt styles:
  * "yarn" (default): five lines joined by newlines — a task line, the first characters of the
    filler repeated (a share `depth` of the filler characters), the needle "The pass key is N.
    Remember it. N is the pass key.", the rest of the filler characters, and the question. N ~ U{1 … 50000}.
    The task line is read from a file when given, else ropekit's own wording.
  * "compact": ropekit's earlier prompt (whole filler sentences joined by spaces, no task line,
    N a 5-digit integer); the reference model in bench/ was trained on it.
The filler is sized to the longest prompt whose tokens (answer included) fit in `length`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ropekit.errors import RopekitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
TASK_LINE = (
    "Somewhere in the long text below one line carries a pass key. Read everything, keep that key in mind, "
    "and give it when asked at the end."
)  # ropekit's wording, used without --passkey-task-file
STYLES = ("yarn", "compact")


def read_task_line(path: str | Path | None) -> tuple[str, str]:
    """(task line, its source): the file's text (stripped), or ropekit's wording."""
    if path is None:
        return TASK_LINE, "ropekit wording"
    if not Path(path).is_file():
        where = "is a folder" if Path(path).is_dir() else "does not exist"
        raise RopekitError(f"the passkey task-line file {path} {where} (a UTF-8 text file holding the task line)")
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise RopekitError(f"{path}: cannot read the passkey task line (a UTF-8 text file)") from None
    if not text:
        raise RopekitError(f"{path}: the passkey task-line file is empty")
    return text, f"file: {path}"


def draw_passkey(seed: int, length: int, depth: float, trial: int, style: str) -> int:
    rng = random.Random(f"{seed}-{length}-{depth}-{trial}")
    return rng.randint(1, 50000) if style == "yarn" else rng.randint(10000, 99999)


@dataclass(frozen=True)
class PasskeyPrompt:
    prompt_ids: list[int]
    answer_ids: list[int]  # tokens of " N" as they follow the prompt
    passkey: int
    needle_start: int  # token index where the needle line begins
    depth: float  # requested needle depth in [0, 1]


def largest_fill(count_tokens: Callable[[int], int], length: int) -> int:
    """The largest n ≥ 0 with count_tokens(n) ≤ length (count_tokens must grow with n)."""
    if count_tokens(0) > length:
        raise RopekitError(f"the prompt needs more than {length} tokens even without filler")
    lo, hi = 0, 1
    while count_tokens(hi) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count_tokens(mid) <= length else (lo, mid)
    return lo


def _compact_text(depth: float, passkey: int, n_fill: int) -> tuple[str, str]:
    """(text before the needle, whole prompt) with n_fill whole filler sentences joined by spaces."""
    before = round(depth * n_fill)
    head = " ".join([FILLER] * before)
    body = " ".join(
        x for x in [head, NEEDLE.format(key=passkey), " ".join([FILLER] * (n_fill - before)), QUESTION] if x
    )
    return head, body


def _yarn_text(depth: float, passkey: int, n_chars: int, task_line: str) -> tuple[str, str]:
    """(text before the needle, whole prompt): newline-joined lines with n_chars filler characters."""
    garbage = " ".join([FILLER] * (n_chars // (len(FILLER) + 1) + 1))
    before = round(depth * n_chars)
    head = "\n".join([task_line, garbage[:before]]) + "\n"
    return head, head + "\n".join([NEEDLE.format(key=passkey), garbage[: n_chars - before], QUESTION])


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depth: float,
    passkey: int,
    *,
    style: str = "yarn",
    task_line: str = TASK_LINE,
) -> PasskeyPrompt:
    """The longest prompt of the style that fits in `length` tokens (answer included)."""
    if not 0.0 <= depth <= 1.0:
        raise RopekitError(f"needle depth must be in [0, 1], got {depth}")
    if style not in STYLES:
        raise RopekitError(f"passkey prompt style must be one of {', '.join(STYLES)}, got {style!r}")

    def text(n: int) -> tuple[str, str]:
        return _yarn_text(depth, passkey, n, task_line) if style == "yarn" else _compact_text(depth, passkey, n)

    n_fill = largest_fill(lambda n: len(tokenizer(text(n)[1] + f" {passkey}")["input_ids"]), length)
    head, body = text(n_fill)
    prompt_ids = tokenizer(body)["input_ids"]
    full_ids = tokenizer(body + f" {passkey}")["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise RopekitError("tokenizer merges the answer into the question; cannot separate the answer tokens")
    needle_start = len(tokenizer(head)["input_ids"]) if head else 1
    return PasskeyPrompt(prompt_ids, full_ids[len(prompt_ids) :], passkey, needle_start, depth)
