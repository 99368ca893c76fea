"""LongBench per-task metrics (Bai et al. 2023), written from their definitions.

Every metric maps (prediction, one reference, all_classes) to [0, 1]; a sample's score is
the maximum over its references.
  * qa_f1:          token F1 after SQuAD normalisation (lowercase, no punctuation/articles).
  * rouge_l:        ROUGE-L F1 (LCS) over lowercase word tokens.
  * classification: 1/|matches| if the reference is among the class names found in the
                    prediction (names that are strict substrings of the reference dropped).
  * count:          share of the integers in the prediction that equal the reference.
  * retrieval:      share of the integers in the prediction that equal the reference's
                    "Paragraph N" number.
  * edit_sim:       difflib similarity ratio of the first code line of the prediction.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1(prediction: str, reference: str, all_classes=None) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str, all_classes=None) -> float:
    pred, ref = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", reference.lower())
    if not pred or not ref:
        return 0.0
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def classification(prediction: str, reference: str, all_classes=None) -> float:
    matches = [c for c in (all_classes or []) if c in prediction]
    matches = [m for m in matches if not (m in reference and m != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def count(prediction: str, reference: str, all_classes=None) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, all_classes=None) -> float:
    target = re.findall(r"Paragraph (\d+)", reference)
    numbers = re.findall(r"\d+", prediction)
    if not target or not numbers:
        return 0.0
    return sum(n == target[0] for n in numbers) / len(numbers)


def edit_sim(prediction: str, reference: str, all_classes=None) -> float:
    lines = [ln for ln in prediction.lstrip("\n").split("\n") if not ln.strip().startswith(("`", "#", "//"))]
    first = lines[0] if lines else ""
    return difflib.SequenceMatcher(None, first, reference).ratio()


METRICS = {"qa_f1": qa_f1, "rouge_l": rouge_l, "classification": classification, "count": count,
           "retrieval": retrieval, "edit_sim": edit_sim}


def score_sample(metric: str, prediction: str, references: list[str], all_classes=None) -> float:
    """Max over references of the metric."""
    fn = METRICS[metric]
    return max((fn(prediction, ref, all_classes) for ref in references), default=0.0)
