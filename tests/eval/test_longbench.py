"""LongBench-E: metrics by hand, the loader, middle truncation, and an answering oracle end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_llama
from ropekit import RopekitError
from ropekit.eval.longbench import (
    DATASETS,
    EMPTY_BUCKETS,
    bucket_of,
    build_prompt_ids,
    default_max_length,
    load_longbench,
    load_prompt_config,
    run_longbench,
    scorer_e,
)
from ropekit.eval.longbench_metrics import classification, count, edit_sim, qa_f1, retrieval, rouge_l
from ropekit.eval.passkey import generate_greedy

FIXTURE = Path(__file__).parents[1] / "fixtures" / "longbench_e"


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer):
    return llama_tokenizer


def test_metrics_by_hand():
    assert qa_f1("The Eiffel Tower!", "eiffel tower") == 1.0
    assert qa_f1("Paris France", "Paris") == pytest.approx(2 / 3)
    assert qa_f1("London", "Paris") == 0.0
    assert count("There are 5 paragraphs, not 7", "5") == 0.5
    assert retrieval("Paragraph 3", "Paragraph 3") == 1.0 and retrieval("Paragraph 3 or 4", "Paragraph 3") == 0.5


def _summary_level_f(llcs: int, hyp_words: int, ref_words: int) -> float:
    """ROUGE-L F as the rouge package defines it: counts of *distinct* words, F = 2PR/(P+R+1e-8)."""
    r, p = llcs / ref_words, llcs / hyp_words
    return 2 * p * r / (p + r + 1e-8)


def test_rouge_l_is_the_rouge_packages_summary_level_score():
    # Case-sensitive whitespace words: "The" ≠ "the". Distinct words: hyp 6, ref 5 {the, cat, is, on, mat};
    # LCS = cat on the mat (4 distinct).
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(_summary_level_f(4, 6, 5))
    # Punctuation stays on the word: "mat," ≠ "mat". LCS = a b (2); distinct: hyp 3, ref 3.
    assert rouge_l("a b mat,", "a b mat") == pytest.approx(_summary_level_f(2, 3, 3))
    # Two hypothesis sentences (split at "."): union LCS with the reference "x y z w" is {x, y} ∪ {z, w} = 4.
    assert rouge_l("x y q. z w", "x y z w") == pytest.approx(_summary_level_f(4, 5, 4))
    assert rouge_l("", "anything") == 0.0  # the package raises on an empty hypothesis; LongBench scores 0


def test_code_similarity_skips_lines_containing_markers_and_rounds_like_fuzzywuzzy():
    # lines that *contain* a backtick, '#' or '//' are skipped, not only lines that start with one
    assert edit_sim("x = 1  # set x\ny = 2\n", "y = 2") == 1.0
    assert edit_sim("url = 'http://a'\nz = 3", "z = 3") == 1.0
    assert edit_sim("# only\n// comments", "x") == 0.0  # no line left: the empty string scores 0
    # fuzz.ratio = round(100 · difflib ratio) half-to-even: one matching char of 16 → 12.5 → 12
    assert edit_sim("abcdefgh", "aijklmno") == 0.12
    # difflib's matching blocks, not the edit distance: 'aaab' vs 'abaa' → 2·2/8 = 50 (Levenshtein-based: 75)
    assert edit_sim("aaab", "abaa") == 0.5
    assert edit_sim("return x + 1", "return x+1") == 0.91  # 2·10/22 = 90.9 → 91


def test_classification_reproduces_the_official_single_pass_removal():
    classes = ["Location", "Entity", "Human", "Human being"]
    assert classification("Location", "Location", classes) == 1.0
    assert classification("Entity or Location", "Location", classes) == 0.5
    assert classification("Human being", "Human being", classes) == 1.0  # "Human" is a strict substring: dropped
    # Nested names: matches [A, AB, ABC] for reference ABC. The official loop removes "A" and then
    # examines the list's next index, which now holds "ABC": "AB" is never examined and stays.
    assert classification("ABC", "ABC", ["A", "AB", "ABC"]) == 0.5
    assert classification("ABC", "ABC", ["AB", "X", "ABC"]) == 1.0  # nothing follows a removal but a non-match


def test_buckets():
    assert [bucket_of(n) for n in (0, 3999, 4000, 7999, 8000, 20000)] == ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]


def test_bucket_scores_round_as_scorer_e():
    """The issue's passage_count example: answer "1"; per-example counts 0, 0, 1/5, 3/8 → mean
    0.14375. eval.py rounds 100 · np.mean: 14.37 (the float lies just below the tie); the mean of
    ×100 scores is exactly 14.375 and rounds to 14.38."""
    predictions = ["2", "2", "1 2 3 4 5", "1 1 1 2 3 4 5 6"]
    scores = [count(p, "1") for p in predictions]
    assert scores == [0.0, 0.0, 0.2, 0.375]
    assert scorer_e(scores, [100, 200, 300, 3999]) == {"0-4k": 14.37}
    assert round(sum(100 * s for s in scores) / 4, 2) == 14.38  # the other order of operations
    assert scorer_e([1.0, 0.0, 0.5], [10, 9000, 9500]) == {"0-4k": 100.0, "8k+": 25.0}  # no 4-8k: left out


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


def test_middle_truncation_decodes_both_halves_and_re_encodes(tokenizer):
    example = load_longbench(FIXTURE)["hotpotqa"][0]
    long = type(example)(**{**example.__dict__, "context": "word " * 2000})
    prompt = DATASETS["hotpotqa"].template.format(context=long.context, input=long.input)
    full = tokenizer(prompt)["input_ids"]
    ids = build_prompt_ids(tokenizer, long, max_length=301)
    half = 150  # int(301 / 2) tokens from each end, as pred.py
    text = tokenizer.decode(full[:half], skip_special_tokens=True) + tokenizer.decode(
        full[-half:], skip_special_tokens=True
    )
    assert ids == tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("Answer the question")
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith("Answer:")
    short = build_prompt_ids(tokenizer, example, max_length=10_000)
    assert (
        short
        == tokenizer(DATASETS["hotpotqa"].template.format(context=example.context, input=example.input))["input_ids"]
    )
    assert default_max_length(4096) == 3500 and default_max_length(32768) == 31500  # model2maxlen.json's values
    assert default_max_length(16384) == 15500 and default_max_length(512) == 256


def test_official_prompt_files_are_read_and_recorded(tmp_path):
    data = tmp_path / "LongBench-E"
    data.mkdir()
    assert load_prompt_config(data).prompt_source == "ropekit wording"
    config = tmp_path / "config"
    config.mkdir()
    (config / "dataset2prompt.json").write_text(json.dumps({"hotpotqa": "CTX {context} Q {input} A"}))
    (config / "dataset2maxlen.json").write_text(json.dumps({"hotpotqa": 7}))
    loaded = load_prompt_config(data)
    assert loaded.prompt_source == f"official file: {config / 'dataset2prompt.json'}"
    assert loaded.templates["hotpotqa"] == "CTX {context} Q {input} A" and loaded.max_new_tokens["hotpotqa"] == 7
    assert loaded.templates["trec"] == DATASETS["trec"].template  # datasets the file lacks keep ropekit's wording
    (config / "dataset2maxlen.json").write_text("[1, 2]")
    with pytest.raises(RopekitError, match="dataset2maxlen.json: expected a JSON object"):
        load_prompt_config(data)


@pytest.mark.slow
def test_generation_stops_like_hf_generate():
    """generate_greedy with stop ids = transformers' generate(eos_token_id=…, min_length=prompt+1), greedy."""
    model = tiny_llama(40, seed=3)
    prompt = [1, 5, 9, 11, 4, 7]
    free = generate_greedy(model, prompt, 12)
    stop = free[3]  # a token the model emits, so stopping matters
    mine = generate_greedy(model, prompt, 12, stop_ids=[stop])
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=0)[
        0, len(prompt) :
    ].tolist()
    assert mine == ref and mine[-1] == stop and len(mine) <= 4
    first = free[0]  # samsum: the first token may not be a stop token
    mine = generate_greedy(model, prompt, 12, stop_ids=[first], no_stop_first=True)
    ref = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=[first],
        min_length=len(prompt) + 1,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    trimmed = ref[: ref.index(first, 1) + 1] if first in ref[1:] else ref
    assert mine == trimmed and mine[0] != first


def test_first_line_only_on_trec_triviaqa_samsum_lsht_not_code():
    assert {n for n, d in DATASETS.items() if d.first_line_only} == {"trec", "triviaqa", "samsum"}
    assert not DATASETS["lcc"].first_line_only and not DATASETS["repobench-p"].first_line_only
    assert not DATASETS["lcc"].uses_chat and DATASETS["hotpotqa"].uses_chat


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
    assert result.bucket_sizes["trec"]["4-8k"] == 0 and sum(result.bucket_sizes["trec"].values()) == len(data["trec"])
    record = result.as_dict()
    assert record["empty_buckets"] == EMPTY_BUCKETS and "NaN" in record["empty_buckets"]
    assert "scorer_e" in record["rounding"] and record["protocol"] == "longbench-e/3"


def test_chat_template_wraps_all_but_few_shot_and_code_tasks(tokenizer):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = "{% for m in messages %}[USER]{{ m['content'] }}[/USER]{% endfor %}[BOT]"
    data = load_longbench(FIXTURE)
    for name, wrapped in (("hotpotqa", True), ("trec", False), ("lcc", False)):
        example = data[name][0]
        plain = tokenizer.decode(build_prompt_ids(tokenizer, example, max_length=10_000), skip_special_tokens=True)
        ids = build_prompt_ids(chat_tokenizer, example, max_length=10_000, chat=True)
        text = chat_tokenizer.decode(ids, skip_special_tokens=True)
        assert text == (f"[USER]{plain}[/USER][BOT]" if wrapped else plain), name
    with pytest.raises(RopekitError, match="no chat template"):
        run_longbench(None, tokenizer, data, window=2048, chat="on")
