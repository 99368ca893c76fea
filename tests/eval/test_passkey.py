"""Passkey prompts and both scorers, checked with an oracle that retrieves by construction."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from ropekit.eval.passkey import (
    FILLER,
    QUESTION,
    build_prompt,
    generation_correct,
    passkey_grid,
    teacher_forced_correct,
)


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer):
    return llama_tokenizer


class InductionOracle(torch.nn.Module):
    """Predicts, at each position, the token that followed the longest earlier match of the
    current suffix: it copies the passkey after 'The pass key is' by construction."""

    def __init__(self, vocab: int, *, broken: bool = False, reach: int = 0):
        super().__init__()
        self.vocab, self.broken, self.reach = vocab, broken, reach  # reach: only look this far back (0: all)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def next_token(self, seq: list[int]) -> int:
        earliest = max(0, len(seq) - self.reach) if self.reach else 0
        for k in range(min(12, len(seq) - 1), 0, -1):
            suffix = seq[-k:]
            for start in range(len(seq) - k - 1, earliest - 1, -1):
                if seq[start : start + k] == suffix:
                    token = seq[start + k]
                    return (token + 1) % self.vocab if self.broken else token
        return 0

    def forward(self, input_ids, past_key_values=None, use_cache=False, logits_to_keep=0):
        seq = (past_key_values or []) + input_ids[0].tolist()
        positions = range(len(seq) - (logits_to_keep or len(seq)), len(seq))
        logits = torch.full((1, len(positions), self.vocab), -1e9)
        for row, pos in enumerate(positions):
            logits[0, row, self.next_token(seq[: pos + 1])] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=seq)


class RunOnDigitsOracle(InductionOracle):
    """Retrieves, but never ends a number: after a digit it says another digit. Every answer token is
    the argmax (teacher-forced: right) yet the generated integer is longer than the key (wrong)."""

    def __init__(self, vocab: int, digit_ids: set[int]):
        super().__init__(vocab)
        self.digit_ids, self.more = digit_ids, min(digit_ids)

    def next_token(self, seq: list[int]) -> int:
        token = super().next_token(seq)
        return self.more if seq[-1] in self.digit_ids and token not in self.digit_ids else token


def digit_ids(tokenizer) -> set[int]:
    return {i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().isdigit()}


@pytest.mark.parametrize("length", [256, 700])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_compact_prompt_fits_and_places_the_needle(tokenizer, length, depth):
    p = build_prompt(tokenizer, length, depth, 48213, style="compact")
    total = len(p.prompt_ids) + len(p.answer_ids)
    filler_tokens = len(tokenizer(FILLER)["input_ids"])
    assert length - filler_tokens - 2 <= total <= length
    assert tokenizer.decode(p.answer_ids).strip() == "48213"
    text = tokenizer.decode(p.prompt_ids, skip_special_tokens=True)
    assert text.endswith(QUESTION) and text.count("48213") == 2
    before, after = text.split("The pass key is 48213")
    n_before, n_after = before.count(FILLER), after.count(FILLER)
    assert abs(n_before / (n_before + n_after) - depth) <= 1 / (n_before + n_after)
    assert (
        tokenizer.decode(p.prompt_ids[p.needle_start :], skip_special_tokens=True).lstrip().startswith("The pass key")
    )


@pytest.mark.parametrize("length", [256, 700])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_yarn_prompt_is_the_five_newline_joined_lines(tokenizer, length, depth):
    """yarn's layout: task line, garbage prefix, needle, garbage suffix, question, joined by '\n';
    the garbage is a character prefix of the space-joined filler, split by depth."""
    p = build_prompt(tokenizer, length, depth, 4821, task_line="Find the key.")
    assert len(p.prompt_ids) + len(p.answer_ids) <= length
    text = tokenizer.decode(p.prompt_ids, skip_special_tokens=True)
    lines = text.split("\n")
    assert len(lines) == 5 and lines[0] == "Find the key." and lines[4] == QUESTION
    assert lines[2] == "The pass key is 4821. Remember it. 4821 is the pass key."
    endless = " ".join([FILLER] * 200)
    assert endless.startswith(lines[1]) and endless.startswith(lines[3])
    n = len(lines[1]) + len(lines[3])
    assert len(lines[1]) == round(depth * n)
    assert len(tokenizer(text + " 4821")["input_ids"]) > length - 8  # the filler fills the window


def test_scorers_on_an_oracle_that_retrieves(tokenizer):
    oracle = InductionOracle(len(tokenizer))
    p = build_prompt(tokenizer, 400, 0.3, 71829)
    assert teacher_forced_correct(oracle, p) and generation_correct(oracle, tokenizer, p)
    broken = InductionOracle(len(tokenizer), broken=True)
    assert not teacher_forced_correct(broken, p) and not generation_correct(broken, tokenizer, p)


def test_grid_records_accuracy_and_agreement(tokenizer):
    result = passkey_grid(
        InductionOracle(len(tokenizer)),
        tokenizer,
        lengths=[200, 300],
        depths=[0.0, 1.0],
        trials=2,
        agreement_every=1,
        style="compact",
        scorer="teacher-forced",
    )
    assert result.accuracy == {"200@0": 1.0, "200@1": 1.0, "300@0": 1.0, "300@1": 1.0}
    assert result.agreement == 1.0 and result.agreement_trials == 8
    keys = [r["passkey"] for r in result.rows]
    assert keys == [
        r["passkey"]
        for r in passkey_grid(
            InductionOracle(len(tokenizer)), tokenizer, lengths=[200, 300], depths=[0.0, 1.0], trials=2, style="compact"
        ).rows
    ]  # seeded
    assert all(re.fullmatch(r"\d{5}", str(k)) for k in keys)
    yarn = passkey_grid(InductionOracle(len(tokenizer)), tokenizer, lengths=[200], depths=[0.5], trials=3)
    assert yarn.scorer == "generation" and yarn.style == "yarn" and yarn.task_line == "ropekit wording"
    assert yarn.accuracy == {"200@0.5": 1.0} and all(1 <= r["passkey"] <= 50000 for r in yarn.rows)


def test_agreement_is_one_when_retrieval_depends_on_the_needle_position(tokenizer):
    """A model that sees only its last 120 tokens retrieves a needle near the end and misses one at
    the start: both outcomes occur, and the two scorers agree on every trial."""
    result = passkey_grid(
        InductionOracle(len(tokenizer), reach=120),
        tokenizer,
        lengths=[400],
        depths=[0.0, 1.0],
        trials=3,
        agreement_every=1,
        scorer="teacher-forced",
    )
    assert result.accuracy == {"400@0": 0.0, "400@1": 1.0}
    assert result.agreement == 1.0 and result.agreement_trials == 6


def test_agreement_is_zero_when_the_scorers_must_disagree(tokenizer):
    """Right answer tokens, wrong generated integer: teacher-forced says right, generation says wrong."""
    oracle = RunOnDigitsOracle(len(tokenizer), digit_ids(tokenizer))
    p = build_prompt(tokenizer, 300, 0.5, 52913)
    assert teacher_forced_correct(oracle, p) and not generation_correct(oracle, tokenizer, p)
    for scorer, accuracy in (("teacher-forced", 1.0), ("generation", 0.0)):
        result = passkey_grid(
            oracle, tokenizer, lengths=[300], depths=[0.5], trials=3, agreement_every=1, scorer=scorer
        )
        assert result.accuracy == {"300@0.5": accuracy}
        assert result.agreement == 0.0 and result.agreement_trials == 3
