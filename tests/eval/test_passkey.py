"""Passkey prompts and both scorers, checked with an oracle that retrieves by construction."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from conftest import require_asset
from ropekit.apply.llama2c import read_tokenizer, to_transformers_tokenizer
from ropekit.eval.passkey import (
    FILLER,
    QUESTION,
    build_prompt,
    generation_correct,
    passkey_grid,
    teacher_forced_correct,
)


@pytest.fixture(scope="module")
def tokenizer():
    return to_transformers_tokenizer(*read_tokenizer(require_asset("stories260K/tok512.bin"), 512))


class InductionOracle(torch.nn.Module):
    """Predicts, at each position, the token that followed the longest earlier match of the
    current suffix: it copies the passkey after 'The pass key is' by construction."""

    def __init__(self, vocab: int, *, broken: bool = False):
        super().__init__()
        self.vocab, self.broken = vocab, broken
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def next_token(self, seq: list[int]) -> int:
        for k in range(min(12, len(seq) - 1), 0, -1):
            suffix = seq[-k:]
            for start in range(len(seq) - k - 1, -1, -1):
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
    oracle = InductionOracle(512)
    p = build_prompt(tokenizer, 400, 0.3, 71829)
    assert teacher_forced_correct(oracle, p) and generation_correct(oracle, tokenizer, p)
    broken = InductionOracle(512, broken=True)
    assert not teacher_forced_correct(broken, p) and not generation_correct(broken, tokenizer, p)


def test_grid_records_accuracy_and_agreement(tokenizer):
    result = passkey_grid(
        InductionOracle(512),
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
            InductionOracle(512), tokenizer, lengths=[200, 300], depths=[0.0, 1.0], trials=2, style="compact"
        ).rows
    ]  # seeded
    assert all(re.fullmatch(r"\d{5}", str(k)) for k in keys)
    yarn = passkey_grid(InductionOracle(512), tokenizer, lengths=[200], depths=[0.5], trials=3)
    assert yarn.scorer == "generation" and yarn.style == "yarn" and yarn.task_line == "ropekit wording"
    assert yarn.accuracy == {"200@0.5": 1.0} and all(1 <= r["passkey"] <= 50000 for r in yarn.rows)


def test_real_model_scorers_agree(tokenizer):
    """On the real stories260K (which cannot retrieve), both scorers run and mostly agree."""
    from ropekit.apply.llama2c import read_checkpoint, to_transformers

    model = to_transformers(*read_checkpoint(require_asset("stories260K/stories260K.bin")))
    result = passkey_grid(model, tokenizer, lengths=[256], depths=[0.0, 0.5, 1.0], trials=2, agreement_every=1)
    assert result.agreement is not None and result.agreement >= 0.8
