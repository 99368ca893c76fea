"""Passkey retrieval over a grid of context length × needle depth (Mohtashami & Jaggi 2023),
following yarn's `eval/passkey.py` by default.

Prompt styles:
  * "yarn" (default): five lines joined by newlines — a task line, the first characters of the
    filler "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back
    again." repeated (a share `depth` of the filler characters), the needle "The pass key is N.
    Remember it. N is the pass key.", the rest of the filler characters, and "What is the pass
    key? The pass key is". N ~ U{1 … 50000}. The task line is read from `task_file` when given,
    else ropekit's own wording (results.json says which).
  * "compact": ropekit's earlier prompt (whole filler sentences joined by spaces, no task line,
    N a 5-digit integer); the reference model in bench/ was trained on it.
The filler is sized to the longest prompt whose tokens (answer included) fit in `length`.

Two scorers:
  * "generation" (default): greedy decoding of 10 new tokens; the trial succeeds if the first
    integer of the continuation is N.
  * "teacher-forced": one forward pass over prompt + answer; the trial succeeds if every
    answer token is the argmax at its position. Prefill dominates either way; the other scorer
    is run on every `agreement_every`-th trial and the share of agreement is recorded.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ropekit.errors import RopekitError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
TASK_LINE = (
    "Somewhere in the long text below one line carries a pass key. Read everything, keep that key in mind, "
    "and give it when asked at the end."
)  # ropekit's wording, used without --passkey-task-file
SCORERS = ("generation", "teacher-forced")
STYLES = ("yarn", "compact")
PROTOCOL = "passkey/2"
FOLLOWS = "jquesnelle/yarn eval/passkey.py (Mohtashami & Jaggi 2023)"
GENERATED_TOKENS = 10  # yarn: max_new_tokens


def read_task_line(path: str | Path | None) -> tuple[str, str]:
    """(task line, its source): the file's text (stripped), or ropekit's wording."""
    if path is None:
        return TASK_LINE, "ropekit wording"
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


def largest_fill(count_tokens, length: int) -> int:
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
    tokenizer, length: int, depth: float, passkey: int, *, style: str = "yarn", task_line: str = TASK_LINE
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


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_forced_correct(model, p: PasskeyPrompt) -> bool:
    """Every answer token is the argmax after prompt + preceding answer tokens (one forward pass)."""
    ids = torch.tensor([p.prompt_ids + p.answer_ids], device=_device(model))
    k = len(p.answer_ids)
    logits = model(input_ids=ids, logits_to_keep=k + 1).logits[0, :-1]  # predictions for the k answer tokens
    return bool((logits.argmax(-1).cpu() == torch.tensor(p.answer_ids)).all())


@torch.no_grad()
def generate_greedy(
    model,
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


def generation_correct(model, tokenizer, p: PasskeyPrompt) -> bool:
    """The first integer in the greedy continuation equals the passkey."""
    continuation = tokenizer.decode(generate_greedy(model, p.prompt_ids, max(GENERATED_TOKENS, len(p.answer_ids))))
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
    model,
    tokenizer,
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
    other = next(name for name in SCORERS if name != scorer)
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
