"""LongBench-E: metrics by hand, the loader, middle truncation, and an answering oracle end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import require_asset
from ropekit import RopekitError
from ropekit.apply.llama2c import read_tokenizer, to_transformers_tokenizer
from ropekit.eval.longbench import DATASETS, bucket_of, build_prompt_ids, load_longbench, run_longbench
from ropekit.eval.longbench_metrics import classification, count, edit_sim, qa_f1, retrieval, rouge_l

FIXTURE = Path(__file__).parents[1] / "fixtures" / "longbench_e"


@pytest.fixture(scope="module")
def tokenizer():
    return to_transformers_tokenizer(*read_tokenizer(require_asset("stories260K/tok512.bin"), 512))


def test_metrics_by_hand():
    assert qa_f1("The Eiffel Tower!", "eiffel tower") == 1.0
    assert qa_f1("Paris France", "Paris") == pytest.approx(2 / 3)
    assert qa_f1("London", "Paris") == 0.0
    # LCS(the cat sat on the mat, the cat is on the mat) = 5 of 6 words each way
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    classes = ["Location", "Entity", "Human", "Human being"]
    assert classification("Location", "Location", classes) == 1.0
    assert classification("Entity or Location", "Location", classes) == 0.5
    assert classification("Human being", "Human being", classes) == 1.0  # "Human" is a strict substring: dropped
    assert count("There are 5 paragraphs, not 7", "5") == 0.5
    assert retrieval("Paragraph 3", "Paragraph 3") == 1.0 and retrieval("Paragraph 3 or 4", "Paragraph 3") == 0.5
    assert edit_sim("# comment\nx = 1\n", "x = 1") == 1.0
    assert 0 < edit_sim("x = 2", "x = 1") < 1


def test_buckets():
    assert [bucket_of(n) for n in (0, 3999, 4000, 7999, 8000, 20000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]


def test_loader_reads_the_fixture_and_refuses_bad_files(tmp_path):
    data = load_longbench(FIXTURE)
    assert set(data) == {"hotpotqa", "trec", "passage_count", "passage_retrieval_en", "samsum", "lcc"}
    assert data["passage_count"][0].answers == ["3"]
    (tmp_path / "hotpotqa_e.jsonl").write_text(json.dumps({"input": "q", "context": "c", "length": 5}) + "\n")
    with pytest.raises(RopekitError, match=r"hotpotqa_e.jsonl:1: .*missing answers"):
        load_longbench(tmp_path)
    with pytest.raises(RopekitError, match="did you mean 'hotpotqa'"):
        load_longbench(FIXTURE, ["hotpotqa2"])
    with pytest.raises(RopekitError, match="no LongBench-E files"):
        load_longbench(_empty(tmp_path))


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_middle_truncation_keeps_head_and_tail(tokenizer):
    example = load_longbench(FIXTURE)["hotpotqa"][0]
    long = type(example)(**{**example.__dict__, "context": "word " * 2000})
    full = tokenizer(DATASETS["hotpotqa"].template.format(context=long.context, input=long.input))["input_ids"]
    ids = build_prompt_ids(tokenizer, long, window=300)
    budget = 300 - DATASETS["hotpotqa"].max_new_tokens
    assert len(ids) == budget
    assert ids[: budget // 2] == full[: budget // 2] and ids[budget // 2 :] == full[-(budget - budget // 2) :]


class AnsweringOracle(torch.nn.Module):
    """Recognises each fixture example by its context head and emits its first reference answer."""

    def __init__(self, tokenizer, examples):
        super().__init__()
        self.tokenizer, self.examples = tokenizer, examples
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=False, logits_to_keep=0):
        if past_key_values is None:
            prompt = self.tokenizer.decode(input_ids[0], skip_special_tokens=True)
            example = next(e for e in self.examples if e.context[:25] in prompt)
            lead = "" if DATASETS[example.dataset].metric == "edit_sim" else " "  # code lines start at column 0
            answer = self.tokenizer(lead + example.answers[0] + "\n", add_special_tokens=False)["input_ids"]
            past_key_values = {"answer": answer + [2] * 600, "step": 0}
        logits = torch.full((1, 1, len(self.tokenizer)), -1e9)
        logits[0, 0, past_key_values["answer"][past_key_values["step"]]] = 0.0
        past_key_values["step"] += 1
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_answering_oracle_scores_100_in_every_bucket(tokenizer):
    data = load_longbench(FIXTURE)
    oracle = AnsweringOracle(tokenizer, [e for group in data.values() for e in group])
    result = run_longbench(oracle, tokenizer, data, window=2048)
    assert all(r["score"] == pytest.approx(100.0) for r in result.rows), result.rows
    assert result.average == pytest.approx({"0-4k": 100.0, "4-8k": 100.0, "8k+": 100.0})
    assert result.scores["trec"] == pytest.approx({"0-4k": 100.0, "8k+": 100.0})
