"""LongBench per-task metrics (Bai et al. 2023), following THUDM/LongBench `LongBench/metrics.py`.

Every metric maps (prediction, one reference, all_classes) to [0, 1]; a sample's score is
the maximum over its references (LongBench `eval.py`).
  * qa_f1:          token F1 after SQuAD normalisation (lowercase, no punctuation/articles).
  * rouge_l:        the `rouge` package's (1.0.1) summary-level ROUGE-L F, exactly as the
                    official code calls it: case-sensitive, text split into sentences at "."
                    and into words at white space; any exception the package raises (an
                    empty prediction, recursion on very long texts) scores 0.
  * classification: class names found (as substrings) in the prediction; names that are a
                    strict substring of the reference are then dropped in one pass over the
                    list *while it shrinks*, so a name right after a dropped one is not
                    examined (the official loop's behaviour, kept so scores match); the
                    score is 1/|list| if the reference is in the list, else 0.
  * count:          share of the integers in the prediction that equal the reference.
  * retrieval:      share of the integers in the prediction that equal the reference's
                    "Paragraph N" number.
  * edit_sim:       `fuzzywuzzy` fuzz.ratio / 100 (difflib ratio, rounded to a whole percent
                    half-to-even) of the first prediction line that *contains* none of
                    "`", "#", "//" (an empty string when every line does).
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Sequence

with warnings.catch_warnings():  # fuzzywuzzy warns when python-Levenshtein is absent; difflib is what LongBench used
    warnings.simplefilter("ignore")
    from fuzzywuzzy import fuzz
from rouge import Rouge

CODE_COMMENT_MARKS = ("`", "#", "//")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse white space."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1(prediction: str, reference: str, all_classes: Sequence[str] | None = None) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str, all_classes: Sequence[str] | None = None) -> float:
    try:
        return float(Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"])
    except Exception:  # noqa: BLE001 — the official metric scores every failure of the package as 0
        return 0.0


def _drop_nested_names(matches: list[str], reference: str) -> list[str]:
    """Remove names that are strict substrings of the reference, skipping the element after each removal."""
    kept, index = list(matches), 0
    while index < len(kept):
        name = kept[index]
        if name in reference and name != reference:
            kept.remove(name)  # the list shifts left: the next name now sits at `index` and is passed over
        index += 1
    return kept


def classification(prediction: str, reference: str, all_classes: Sequence[str] | None = None) -> float:
    matches = _drop_nested_names([c for c in (all_classes or []) if c in prediction], reference)
    return 1.0 / len(matches) if reference in matches else 0.0


def count(prediction: str, reference: str, all_classes: Sequence[str] | None = None) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, all_classes: Sequence[str] | None = None) -> float:
    target = re.findall(r"Paragraph (\d+)", reference)
    numbers = re.findall(r"\d+", prediction)
    if not target or not numbers:
        return 0.0
    return sum(n == target[0] for n in numbers) / len(numbers)


def first_code_line(prediction: str) -> str:
    """The first line (after leading newlines) containing no backtick, '#' or '//'; '' if none."""
    lines = prediction.lstrip("\n").split("\n")
    return next((ln for ln in lines if not any(mark in ln for mark in CODE_COMMENT_MARKS)), "")


def edit_sim(prediction: str, reference: str, all_classes: Sequence[str] | None = None) -> float:
    return fuzz.ratio(first_code_line(prediction), reference) / 100


def fuzz_backend() -> str:
    """Which matcher fuzzywuzzy uses here: difflib (as LongBench's requirements give) or python-Levenshtein."""
    return "python-Levenshtein" if "StringMatcher" in fuzz.SequenceMatcher.__module__ else "difflib"


METRICS = {
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "classification": classification,
    "count": count,
    "retrieval": retrieval,
    "edit_sim": edit_sim,
}


def score_sample(
    metric: str, prediction: str, references: list[str], all_classes: Sequence[str] | None = None
) -> float:
    """Max over references of the metric."""
    fn = METRICS[metric]
    return max((fn(prediction, ref, all_classes) for ref in references), default=0.0)
