"""RULER's qa_1 (SQuAD) and qa_2 (HotpotQA) from files the user provides, following NVIDIA/RULER
`scripts/data/synthetic/qa.py`.

`--ruler-qa-dir` holds `squad.json` (SQuAD 2.0 format: data → paragraphs → context, qas with
question, answers, is_impossible) and/or `hotpotqa.json` (HotpotQA's distractor format: a list of
{question, answer, context: [[title, [sentences]]]}). Unanswerable SQuAD questions are dropped.
Documents are deduplicated and sorted; a sample shows its gold document(s), then the other
paragraphs of the same SQuAD article, then random other documents, shuffled, as
"Document i:\\n…" blocks joined by blank lines; the number of documents is sized to the window.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ropekit.errors import RopekitError

QA_FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}


@dataclass(frozen=True)
class Question:
    query: str
    answers: list[str]
    gold: list[int]  # document indices holding the answer
    related: list[int]  # other paragraphs of the same article (SQuAD)


@dataclass(frozen=True)
class QaData:
    questions: list[Question]
    documents: list[str]
    source: str


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise RopekitError(f"{path}: not a readable JSON file") from None


def read_squad(path: Path) -> QaData:
    data = _load(path)
    try:
        articles = [[p["context"] for p in article["paragraphs"]] for article in data["data"]]
        docs = sorted({c for article in articles for c in article})
        index = {c: i for i, c in enumerate(docs)}
        questions = []
        for article in data["data"]:
            siblings = [index[p["context"]] for p in article["paragraphs"]]
            for p in article["paragraphs"]:
                for qa in p["qas"]:
                    if not qa.get("is_impossible", False):
                        here = index[p["context"]]
                        questions.append(
                            Question(
                                qa["question"],
                                [a["text"] for a in qa["answers"]],
                                [here],
                                [i for i in siblings if i != here],
                            )
                        )
    except (KeyError, TypeError):
        raise RopekitError(f"{path}: not in SQuAD's format (data → paragraphs → context, qas)") from None
    return QaData(questions, docs, str(path))


def read_hotpotqa(path: Path) -> QaData:
    data = _load(path)
    try:

        def text(title: str, sentences: list[str]) -> str:
            return f"{title}\n{''.join(sentences)}"

        docs = sorted({text(t, s) for item in data for t, s in item["context"]})
        index = {d: i for i, d in enumerate(docs)}
        questions = [
            Question(item["question"], [item["answer"]], [index[text(t, s)] for t, s in item["context"]], [])
            for item in data
        ]
    except (KeyError, TypeError, ValueError):
        raise RopekitError(
            f"{path}: not in HotpotQA's format (question, answer, context: [[title, sentences]])"
        ) from None
    return QaData(questions, docs, str(path))


def load_qa(qa_dir: str | Path | None, dataset: str) -> QaData:
    if qa_dir is None:
        raise RopekitError(f"RULER's {dataset} task needs question-answer files: give --ruler-qa-dir")
    path = Path(qa_dir) / QA_FILES[dataset]
    if not path.is_file():
        raise RopekitError(f"{qa_dir}: no {QA_FILES[dataset]} for RULER's {dataset} task")
    data = read_squad(path) if dataset == "squad" else read_hotpotqa(path)
    if not data.questions:
        raise RopekitError(f"{path}: no answerable questions")
    return data


def qa_documents(data: QaData, question: Question, count: int, rng: random.Random) -> list[str]:
    """`count` documents: gold first, then related, then random others (repeated when too few), shuffled."""
    if count < len(data.documents):
        if count - len(question.gold) > len(question.related):
            others = [i for i in range(len(data.documents)) if i not in question.gold + question.related]
            chosen = (
                question.gold
                + question.related
                + rng.sample(others, max(0, count - len(question.gold) - len(question.related)))
            )
        else:
            chosen = question.gold + rng.sample(question.related, max(0, count - len(question.gold)))
        docs = [data.documents[i] for i in chosen]
    else:
        docs = (data.documents * (count // len(data.documents) + 1))[:count]
    rng.shuffle(docs)
    return docs
