"""Perplexity conventions against a naive reference, and the document loader's refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from ropekit import RopekitError
from ropekit.data.documents import read_documents, tokenize_documents
from ropekit.eval.perplexity import perplexity, windows


@pytest.fixture(scope="module")
def model():
    return tiny_llama(300)


def docs(*lengths, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(0, 300, size=n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("n,length,stride", [(700, 256, 100), (256, 256, 256), (1000, 128, 127), (50, 256, 64)])
def test_strided_windows_score_every_token_once(n, length, stride):
    scored = [t for w in windows(n, length, stride=stride) for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    assert all(w.end - w.start <= length and w.score_from > w.start for w in windows(n, length, stride=stride))


def test_stride_equal_to_length_is_disjoint():
    # each window's first token has no context inside the window, so it is not scored (as in the HF recipe)
    assert list(windows(1000, 128, stride=128)) == list(windows(1000, 128, convention="disjoint"))


def test_disjoint_and_truncated_windows():
    assert [(w.start, w.end, w.score_from) for w in windows(600, 256, convention="disjoint")] == [
        (0, 256, 1),
        (256, 512, 257),
        (512, 600, 513),
    ]
    assert [(w.start, w.end) for w in windows(600, 256, convention="truncated")] == [(0, 256)]


def naive_strided_nll(model, doc, length, stride):
    """The usual recipe: recompute each window, mask already-scored labels with -100, use HF's loss."""
    ids = torch.as_tensor(doc, dtype=torch.long)
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + length, len(ids))
        target_len = end - prev_end
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + float(loss) * scored, count + scored, end
        if end == len(ids):
            break
    return nll, count


@pytest.mark.parametrize(
    "length,stride",
    [(256, 100), pytest.param(128, 128, marks=pytest.mark.slow), pytest.param(200, 37, marks=pytest.mark.slow)],
)
def test_strided_equals_naive_full_recompute(model, length, stride):
    documents = docs(700, 333)
    result = perplexity(model, documents, length=length, stride=stride, loss_chunk=50)
    nll, count = map(sum, zip(*(naive_strided_nll(model, d, length, stride) for d in documents)))
    assert result.tokens_scored == count
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


@pytest.mark.slow
def test_chunk_size_does_not_change_the_value(model):
    documents = docs(400)
    a = perplexity(model, documents, length=400, loss_chunk=7).perplexity
    b = perplexity(model, documents, length=400, loss_chunk=4096).perplexity
    assert a == pytest.approx(b, rel=1e-6)


def test_result_records_the_convention(model):
    r = perplexity(model, docs(300), length=128, convention="disjoint")
    assert (r.convention, r.stride, r.windows, r.tokens_scored) == ("disjoint", None, 3, 127 + 127 + 43)


def test_bad_perplexity_inputs(model):
    with pytest.raises(RopekitError, match="convention"):
        perplexity(model, docs(300), length=128, convention="sliding")
    with pytest.raises(RopekitError, match="stride"):
        perplexity(model, docs(300), length=128, stride=500)
    with pytest.raises(RopekitError, match="at least 2 tokens"):
        perplexity(model, docs(1), length=128)


def test_document_loader(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert [name for name, _ in read_documents(tmp_path)] == ["a.txt", "b.jsonl:1", "b.jsonl:3"]
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    garbled = tmp_path / "g.txt"
    garbled.write_bytes(b"\xff\xfe\x00bad")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    for path, message in [
        (tmp_path / "empty", "no .txt or .jsonl"),
        (bad, "field 'text'"),
        (garbled, "not UTF-8"),
        (blank, "empty"),
        (tmp_path / "nope", "no such file"),
    ]:
        with pytest.raises(RopekitError, match=message):
            read_documents(path)


def test_tokenisation_is_cached(tmp_path, llama_tokenizer):
    tok = llama_tokenizer
    documents = [("d", "Once upon a time there was a cat.")]
    first = tokenize_documents(documents, tok, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    second = tokenize_documents(documents, tok, cache_dir=tmp_path)
    assert np.array_equal(first[0], second[0]) and first[0][0] == 1


def test_default_tokenisation_cache_is_the_user_cache_not_the_working_directory(tmp_path, monkeypatch, llama_tokenizer):
    tok = llama_tokenizer
    monkeypatch.setenv("ROPEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    tokenize_documents([("d", "A dog ran.")], tok)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
