"""Passkey retrieval over a grid of context length × needle depth.

Prompt (shared reference): the filler "The grass is green. The sky is blue. The sun is
yellow. Here we go. There and back again." repeated around the needle "The pass key is N.
Remember it. N is the pass key.", then "What is the pass key? The pass key is". N is a
random 5-digit integer drawn from a fixed seed per trial.

Two scorers:
  * "generation": greedy decoding; the trial succeeds if the first integer of the
    continuation is N.
  * "teacher-forced": one forward pass over prompt + answer; the trial succeeds if every
    answer token is the argmax at its position. Much faster; its agreement with generation is
    measured on a sample and reported.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

import torch

from ropekit.errors import RopekitError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
SCORERS = ("teacher-forced", "generation")


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


def build_prompt(tokenizer, length: int, depth: float, passkey: int) -> PasskeyPrompt:
    """The longest prompt of whole filler sentences that fits in `length` tokens (answer included)."""
    if not 0.0 <= depth <= 1.0:
        raise RopekitError(f"needle depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(key=passkey)

    def text(n_fill: int) -> tuple[str, str]:
        before = round(depth * n_fill)
        head = " ".join([FILLER] * before)
        body = " ".join(x for x in [head, needle, " ".join([FILLER] * (n_fill - before)), QUESTION] if x)
        return head, body

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
def generate_greedy(model, prompt_ids: list[int], max_new_tokens: int, *, stop_ids: list[int] | tuple[int, ...] = (),
                    no_stop_first: bool = False) -> list[int]:
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
    continuation = tokenizer.decode(generate_greedy(model, p.prompt_ids, len(p.answer_ids) + 4))
    match = re.search(r"\d+", continuation)
    return match is not None and int(match.group()) == p.passkey


@dataclass
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    trials: int
    seed: int
    scorer: str
    accuracy: dict[str, float] = field(default_factory=dict)  # "length@depth" → share correct
    rows: list[dict] = field(default_factory=list)  # one per trial
    agreement: float | None = None  # teacher-forced vs generation on the sampled trials
    agreement_trials: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def cell(self, length: int, depth: float) -> float:
        return self.accuracy[f"{length}@{depth:g}"]


def passkey_grid(model, tokenizer, *, lengths: list[int], depths: list[float], trials: int = 5, seed: int = 0,
                 scorer: str = "teacher-forced", agreement_every: int = 4, progress: bool = False) -> PasskeyResult:
    """Accuracy per (length, depth) cell over `trials` seeded passkeys.

    With the teacher-forced scorer, every `agreement_every`-th trial is also scored by
    generation, and the share of those where the two scorers agree is recorded.
    """
    if scorer not in SCORERS:
        raise RopekitError(f"passkey scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    result = PasskeyResult(list(lengths), [float(d) for d in depths], trials, seed, scorer)
    cells = [(n, d, t) for n in lengths for d in depths for t in range(trials)]
    iterator = cells
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cells, desc="passkey", unit="trial", leave=False)
    agree = checked = 0
    for index, (n, d, t) in enumerate(iterator):
        key = random.Random(f"{seed}-{n}-{d}-{t}").randint(10000, 99999)
        p = build_prompt(tokenizer, n, d, key)
        if scorer == "generation":
            ok = generation_correct(model, tokenizer, p)
        else:
            ok = teacher_forced_correct(model, p)
            if agreement_every and index % agreement_every == 0:
                checked += 1
                agree += ok == generation_correct(model, tokenizer, p)
        result.rows.append({"length": n, "depth": d, "trial": t, "passkey": key, "prompt_tokens": len(p.prompt_ids),
                            "correct": bool(ok)})
    for n in lengths:
        for d in depths:
            hits = [r["correct"] for r in result.rows if r["length"] == n and r["depth"] == float(d)]
            result.accuracy[f"{n}@{float(d):g}"] = sum(hits) / len(hits)
    if checked:
        result.agreement, result.agreement_trials = agree / checked, checked
    return result
