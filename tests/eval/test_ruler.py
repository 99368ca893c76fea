"""RULER-style tasks: construction, scoring, and an oracle that reads the prompt to answer."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from conftest import require_asset
from ropekit import RopekitError
from ropekit.apply.llama2c import read_tokenizer, to_transformers_tokenizer
from ropekit.eval.passkey import FILLER
from ropekit.eval.ruler import TASKS, get_task, make_sample, run_ruler, string_match_all


@pytest.fixture(scope="module")
def tokenizer():
    return to_transformers_tokenizer(*read_tokenizer(require_asset("stories260K/tok512.bin"), 512))


def solve(prompt: str, *, wrong_key: bool = False) -> str:
    """Answer a RULER prompt from its text alone (independent of ropekit's generator)."""
    vt = re.search(r"assigned the value (\d+) in the text above", prompt)
    if vt:
        holders, frontier = [], [vt.group(1)]
        while frontier:
            target = frontier.pop()
            pattern = rf"VAR ([A-Z]+) = {target}\." if target.isdigit() else rf"VAR ([A-Z]+) = VAR {target}\."
            for name in re.findall(pattern, prompt):
                holders.append(name)
                frontier.append(name)
        return " " + " ".join(holders)
    asked = re.findall(r"special magic numbers? for (\w+) mentioned", prompt)[-1]
    keys = re.findall(r"special magic numbers for (\w+) is:", prompt)
    key = next((k for k in keys if k != asked), asked) if wrong_key else asked
    return " " + ", ".join(re.findall(rf"special magic numbers for {key} is: (\d+)\.", prompt))


class ReaderOracle(torch.nn.Module):
    """Emits, token by token, the answer `solve` finds in the decoded prompt."""

    def __init__(self, tokenizer, *, wrong_key: bool = False):
        super().__init__()
        self.tokenizer, self.wrong_key = tokenizer, wrong_key
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=False, logits_to_keep=0):
        if past_key_values is None:  # the prompt: work out the answer once
            text = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
            answer = self.tokenizer(solve(text, wrong_key=self.wrong_key), add_special_tokens=False)["input_ids"]
            state = {"answer": answer + [2] * 64, "step": 0}
        else:
            state = past_key_values
        logits = torch.full((1, 1, len(self.tokenizer)), -1e9)
        logits[0, 0, state["answer"][state["step"]]] = 0.0
        state["step"] += 1
        return SimpleNamespace(logits=logits, past_key_values=state)


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("length", [300, 900])
def test_samples_fit_and_hide_the_statements(tokenizer, name, length):
    task = get_task(name)
    sample = make_sample(task, tokenizer, length, seed=1)
    assert len(sample.prompt_ids) + task.max_new_tokens <= length
    filler_tokens = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    assert len(sample.prompt_ids) + task.max_new_tokens > length - filler_tokens - 2  # filled up to the budget
    text = tokenizer.decode(sample.prompt_ids, skip_special_tokens=True)
    positions = [text.index(s) for s in sample.statements]
    assert positions == sorted(positions) or name.startswith("niah")
    assert all(a in text for a in sample.answers)
    assert make_sample(task, tokenizer, length, seed=1) == sample
    assert make_sample(task, tokenizer, length, seed=2).answers != sample.answers


def test_multikey_has_distractors(tokenizer):
    sample = make_sample(get_task("niah_multikey"), tokenizer, 600, seed=0)
    keys = {re.search(r"for (\w+) is", s).group(1) for s in sample.statements}
    assert len(keys) == 4 and len(sample.answers) == 1


def test_string_match_all():
    assert string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("only 123", ["123", "456"]) == 0.5
    assert string_match_all("VARS: abcde", ["ABCDE"]) == 1.0
    assert string_match_all("", ["1"]) == 0.0


def test_reader_oracle_scores_perfectly_and_wrong_key_scores_zero(tokenizer):
    tasks = list(TASKS)
    right = run_ruler(ReaderOracle(tokenizer), tokenizer, tasks=tasks, lengths=[400, 800], samples=2)
    assert set(right.score.values()) == {1.0}, right.score
    wrong = run_ruler(ReaderOracle(tokenizer, wrong_key=True), tokenizer, tasks=["niah_multikey"], lengths=[400], samples=3)
    assert wrong.score == {"niah_multikey@400": 0.0}


def test_unknown_task(tokenizer):
    with pytest.raises(RopekitError, match="did you mean 'niah_single'"):
        get_task("niah_singel")
