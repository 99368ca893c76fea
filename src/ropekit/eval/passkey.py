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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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
from ropekit.errors import RopekitError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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
    "passkey_grid",
    "teacher_forced_correct",
]

SCORERS = ("generation", "teacher-forced")
PROTOCOL = "passkey/2"
FOLLOWS = "jquesnelle/yarn eval/passkey.py (Mohtashami & Jaggi 2023)"
GENERATED_TOKENS = 10  # yarn: max_new_tokens


def other_scorer(scorer: str) -> str:
    """The scorer that checks `scorer` (agreement is measured between the two)."""
    return next(name for name in SCORERS if name != scorer)


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_forced_correct(model: PreTrainedModel, p: PasskeyPrompt) -> bool:
    """Every answer token is the argmax after prompt + preceding answer tokens (one forward pass)."""
    ids = torch.tensor([p.prompt_ids + p.answer_ids], device=_device(model))
    k = len(p.answer_ids)
    logits = model(input_ids=ids, logits_to_keep=k + 1).logits[0, :-1]  # predictions for the k answer tokens
    return bool((logits.argmax(-1).cpu() == torch.tensor(p.answer_ids)).all())


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    stop_ids: list[int] | tuple[int, ...] = (),
    no_stop_first: bool = False,
) -> list[int]:
    """Greedy continuation with the model's KV cache, as `model.generate(do_sample=False)`.

    Stops after emitting a token in `stop_ids` (that token is returned, as generate returns
    the EOS). `no_stop_first`: the first token may not be a stop token (its logits are masked,
    as generate's `min_length = prompt + 1` does).
    """
    ids = torch.tensor([prompt_ids], device=_device(model))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    generated: list[int] = []
    stops = set(stop_ids)
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1]
        if no_stop_first and not generated and stops:
            logits = logits.clone()
            logits[list(stops)] = -float("inf")
        token = int(logits.argmax())
        generated.append(token)
        if token in stops or len(generated) == max_new_tokens:
            break
        step = torch.tensor([[token]], device=ids.device)
        out = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return generated


def generation_correct(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, p: PasskeyPrompt) -> bool:
    """The first integer in the greedy continuation equals the passkey."""
    continuation = decode_text(
        tokenizer, generate_greedy(model, p.prompt_ids, max(GENERATED_TOKENS, len(p.answer_ids)))
    )
    match = re.search(r"\d+", continuation)
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
    rows: list[dict] = field(default_factory=list)  # one per trial
    agreement: float | None = None  # the two scorers on the sampled trials
    agreement_trials: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def cell(self, length: int, depth: float) -> float:
        return self.accuracy[f"{length}@{depth:g}"]


def passkey_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    lengths: list[int],
    depths: list[float],
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

    Every `agreement_every`-th trial is also scored by the other scorer, and the share of those
    where the two agree is recorded.
    """
    if scorer not in SCORERS:
        raise RopekitError(f"passkey scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    task_line, task_source = read_task_line(task_file) if style == "yarn" else ("", "none (compact style)")
    result = PasskeyResult(list(lengths), [float(d) for d in depths], trials, seed, scorer, style, task_source)
    cells = [(n, d, t) for n in lengths for d in depths for t in range(trials)]
    iterator = cells
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cells, desc=f"{label + ' · ' if label else ''}passkey", unit="trial", leave=False)
    scorers = {
        "generation": lambda p: generation_correct(model, tokenizer, p),
        "teacher-forced": lambda p: teacher_forced_correct(model, p),
    }
    other = other_scorer(scorer)
    agree = checked = 0
    for index, (n, d, t) in enumerate(iterator):
        key = draw_passkey(seed, n, d, t, style)
        p = build_prompt(tokenizer, n, d, key, style=style, task_line=task_line)
        ok = scorers[scorer](p)
        if agreement_every and index % agreement_every == 0:
            checked += 1
            agree += ok == scorers[other](p)
        result.rows.append(
            {
                "length": n,
                "depth": d,
                "trial": t,
                "passkey": key,
                "prompt_tokens": len(p.prompt_ids),
                "correct": bool(ok),
            }
        )
    for n in lengths:
        for d in depths:
            hits = [r["correct"] for r in result.rows if r["length"] == n and r["depth"] == float(d)]
            result.accuracy[f"{n}@{float(d):g}"] = sum(hits) / len(hits)
    if checked:
        result.agreement, result.agreement_trials = agree / checked, checked
    return result
