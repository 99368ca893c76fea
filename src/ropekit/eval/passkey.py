"""Passkey retrieval over a grid of context length × needle depth (Mohtashami & Jaggi 2023),
following yarn's `eval/passkey.py` by default.

The prompts (styles "yarn", the default, and "compact") are built by
`ropekit.data.passkey_prompts`, shared with training's passkey mix.

Two scorers:
  * "generation" (default): greedy decoding of 10 new tokens; the trial succeeds if the first
    integer of the continuation is N.
  * "teacher-forced": one forward pass over prompt + answer; the trial succeeds if every
    answer token is the argmax at its position. Prefill dominates either way; the other scorer
    is run on every `agreement_every`-th trial and the share of agreement is recorded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ropekit.data.documents import decode_text
from ropekit.data.passkey_prompts import (
    FILLER,
    NEEDLE,
    QUESTION,
    STYLES,
    TASK_LINE,
    PasskeyPrompt,
    build_prompt,
    draw_passkey,
    largest_fill,
    read_task_line,
)
from ropekit.domains import POSITIVE_INTEGER, SEED, TOKEN_WINDOW, Domain
from ropekit.errors import RopekitError
from ropekit.eval.backend import Scorer, as_scorer, generate_greedy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


__all__ = [  # the prompt names are re-exported: eval code and users import them from here
    "FILLER",
    "NEEDLE",
    "QUESTION",
    "STYLES",
    "TASK_LINE",
    "PasskeyPrompt",
    "build_prompt",
    "draw_passkey",
    "largest_fill",
    "read_task_line",
    "generate_greedy",
    "generation_correct",
    "other_scorer",
    "collect_passkey",
    "passkey_cell",
    "passkey_grid",
    "task_line_for",
    "teacher_forced_correct",
]

SCORERS = ("generation", "teacher-forced")
DEPTH = Domain(0, 1)  # of the needle: 0 at the start of the filler, 1 at its end
PROTOCOL = "passkey/2"
FOLLOWS = "jquesnelle/yarn eval/passkey.py (Mohtashami & Jaggi 2023)"
GENERATED_TOKENS = 10  # yarn: max_new_tokens


def other_scorer(scorer: str) -> str:
    """The scorer that checks `scorer` (agreement is measured between the two)."""
    return next(name for name in SCORERS if name != scorer)


@torch.no_grad()
def teacher_forced_correct(model: Scorer | torch.nn.Module, p: PasskeyPrompt) -> bool:
    """Every answer token is the argmax after prompt + preceding answer tokens (one forward pass)."""
    k = len(p.answer_ids)
    predicted = as_scorer(model).next_token_argmax(p.prompt_ids + p.answer_ids, last=k + 1)[:-1]
    return predicted == list(p.answer_ids)  # the predictions for the k answer tokens


def generation_correct(model: Scorer | torch.nn.Module, tokenizer: PreTrainedTokenizerBase, p: PasskeyPrompt) -> bool:
    """The first integer in the greedy continuation equals the passkey."""
    generated = as_scorer(model).generate_greedy(p.prompt_ids, max(GENERATED_TOKENS, len(p.answer_ids)))
    match = re.search(r"\d+", decode_text(tokenizer, generated))
    return match is not None and int(match.group()) == p.passkey


@dataclass
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    trials: int
    seed: int
    scorer: str
    style: str = "yarn"
    task_line: str = "ropekit wording"  # source of the task line ("yarn" style)
    protocol: str = PROTOCOL
    follows: str = FOLLOWS
    accuracy: dict[str, float] = field(default_factory=dict)  # "length@depth" → share correct
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per trial
    agreement: float | None = None  # the two scorers on the sampled trials
    agreement_trials: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cell(self, length: int, depth: float) -> float:
        return self.accuracy[f"{length}@{depth:g}"]


def task_line_for(style: str, task_file: str | Path | None) -> tuple[str, str]:
    """(task line, where it came from) of a prompt style: the "yarn" style reads `task_file` (default: ropekit's
    wording); "compact" has none."""
    return read_task_line(task_file) if style == "yarn" else ("", "none (compact style)")


def check_grid(lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int) -> None:
    """Refuse, in one line, a grid without cells or a value outside its domain."""
    for name, values, domain in (("lengths", lengths, TOKEN_WINDOW), ("depths", depths, DEPTH)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise RopekitError(f"passkey_grid needs at least one of {name}, got {values!r}")
        for value in values:
            domain.check(f"each of {name}", value)
    POSITIVE_INTEGER.check("trials", trials)
    SEED.check("seed", seed)


def passkey_grid(
    model: Scorer | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int = 5,
    seed: int = 0,
    scorer: str = "generation",
    style: str = "yarn",
    task_file: str | Path | None = None,
    agreement_every: int = 4,
    progress: bool = False,
    label: str = "",
) -> PasskeyResult:
    """Accuracy per (length, depth) cell over `trials` seeded passkeys.

    Every `agreement_every`-th trial of the whole grid (trials counted length-major, then depth)
    is also scored by the other scorer, and the share of those where the two agree is recorded.
    """
    check_grid(lengths, depths, trials, seed)
    task_line, task_source = task_line_for(style, task_file)
    cells = [
        passkey_cell(
            model,
            tokenizer,
            length=n,
            depth=d,
            trials=trials,
            seed=seed,
            scorer=scorer,
            style=style,
            task_line=task_line,
            first_trial=index * trials,
            agreement_every=agreement_every,
            progress=progress,
            label=label,
        )
        for index, (n, d) in enumerate((n, d) for n in lengths for d in depths)
    ]
    return collect_passkey(
        cells,
        lengths=lengths,
        depths=depths,
        trials=trials,
        seed=seed,
        scorer=scorer,
        style=style,
        task_source=task_source,
    )


def passkey_cell(
    model: Scorer | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    length: int,
    depth: float,
    trials: int,
    seed: int = 0,
    scorer: str = "generation",
    style: str = "yarn",
    task_line: str = TASK_LINE,
    first_trial: int = 0,
    agreement_every: int = 4,
    progress: bool = False,
    label: str = "",
) -> dict[str, Any]:
    """One (length, depth) cell: {"rows": one per trial, "checked": trials also scored by the other scorer,
    "agreed": how many of those the two scorers agree on}.

    `first_trial` is the cell's first trial's index in its grid: trial t is checked when
    (first_trial + t) is a multiple of `agreement_every`.
    """
    if scorer not in SCORERS:
        raise RopekitError(f"passkey scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    runner = as_scorer(model)
    scorers = {
        "generation": lambda p: generation_correct(runner, tokenizer, p),
        "teacher-forced": lambda p: teacher_forced_correct(runner, p),
    }
    other = other_scorer(scorer)
    trial_numbers: Iterable[int] = range(trials)
    if progress:
        from tqdm.auto import tqdm

        where = f"passkey @ {length}, depth {depth:g}"
        trial_numbers = tqdm(trial_numbers, desc=f"{label + ' · ' if label else ''}{where}", unit="trial", leave=False)
    rows, agreed, checked = [], 0, 0
    for t in trial_numbers:
        key = draw_passkey(seed, length, depth, t, style)
        p = build_prompt(tokenizer, length, depth, key, style=style, task_line=task_line)
        ok = scorers[scorer](p)
        if agreement_every and (first_trial + t) % agreement_every == 0:
            checked += 1
            agreed += ok == scorers[other](p)
        rows.append(
            {
                "length": length,
                "depth": depth,
                "trial": t,
                "passkey": key,
                "prompt_tokens": len(p.prompt_ids),
                "correct": bool(ok),
            }
        )
    return {"rows": rows, "checked": checked, "agreed": agreed}


def collect_passkey(
    cells: Sequence[dict[str, Any]],
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int,
    scorer: str,
    style: str,
    task_source: str,
) -> PasskeyResult:
    """The grid's result from its `passkey_cell` values, in length-major, depth-minor order."""
    result = PasskeyResult(list(lengths), [float(d) for d in depths], trials, seed, scorer, style, task_source)
    for cell in cells:
        result.rows.extend(cell["rows"])
    for n in lengths:
        for d in depths:
            hits = [r["correct"] for r in result.rows if r["length"] == n and r["depth"] == float(d)]
            result.accuracy[f"{n}@{float(d):g}"] = sum(hits) / len(hits)
    checked = sum(cell["checked"] for cell in cells)
    if checked:
        result.agreement, result.agreement_trials = sum(cell["agreed"] for cell in cells) / checked, checked
    return result
