"""RULER-style synthetic tasks (Hsieh et al. 2024), generated here, no downloads.

The haystack is RULER's "noise" essay: the passkey filler repeated. Needles and queries
follow RULER's templates. Tasks are data: one `RulerTask` record per variant.
  * niah_single:     one needle "One of the special magic numbers for KEY is: VALUE."
  * niah_multikey:   four needles with different keys; the query asks for one key.
  * niah_multivalue: four values under the same key; the query asks for all of them.
  * vt:              variable tracking: "VAR A = 12345", then hops "VAR B = VAR A", …; the
                     query asks for every variable holding the value.
Scoring is RULER's string match: the share of expected answers found in the greedy
continuation (case-insensitive), averaged over samples.
"""

from __future__ import annotations

import random
import string
from dataclasses import asdict, dataclass, field

from ropekit.errors import RopekitError, did_you_mean
from ropekit.eval.passkey import FILLER, generate_greedy, largest_fill

KEYS = ("apple", "river", "candle", "garden", "silver", "thunder", "meadow", "lantern", "harbor", "pepper",
        "violet", "marble", "falcon", "copper", "willow", "ember", "glacier", "orchid", "saddle", "quartz")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUERY_ONE = ("What is the special magic number for {key} mentioned in the provided text? "
             "The special magic number for {key} mentioned in the provided text is")
QUERY_ALL = ("What are all the special magic numbers for {key} mentioned in the provided text? "
             "The special magic numbers for {key} mentioned in the provided text are")
VT_QUERY = ("Question: Find all variables that are assigned the value {value} in the text above. Answer: According "
            "to the chain(s) of variable assignment in the text above, {n} variables are assigned the value {value}, "
            "they are:")


@dataclass(frozen=True)
class RulerTask:
    name: str
    kind: str  # "niah" or "vt"
    keys: int = 1  # distinct keys hidden in the haystack (niah)
    values_per_key: int = 1  # values under the queried key (niah)
    hops: int = 4  # variables in the chain (vt)
    max_new_tokens: int = 24  # greedy continuation length


TASKS: dict[str, RulerTask] = {t.name: t for t in [
    RulerTask("niah_single", "niah"),
    RulerTask("niah_multikey", "niah", keys=4),
    RulerTask("niah_multivalue", "niah", values_per_key=4, max_new_tokens=48),
    RulerTask("vt", "vt", hops=4, max_new_tokens=40),
]}


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]
    answers: list[str]  # every string the continuation should contain
    statements: list[str]  # needles / assignments hidden in the haystack


def get_task(name: str) -> RulerTask:
    if name not in TASKS:
        raise did_you_mean("RULER task", name, TASKS)
    return TASKS[name]


def _statements(task: RulerTask, rng: random.Random) -> tuple[list[str], list[str], str]:
    """(hidden statements, expected answers, query) for one sample."""
    if task.kind == "vt":
        value = str(rng.randint(10000, 99999))
        names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(task.hops)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return chain, names, VT_QUERY.format(value=value, n=task.hops)
    keys = rng.sample(KEYS, task.keys)
    values = {k: [str(rng.randint(1_000_000, 9_999_999)) for _ in range(task.values_per_key)] for k in keys}
    needles = [NEEDLE.format(key=k, value=v) for k in keys for v in values[k]]
    rng.shuffle(needles)
    asked = keys[0]
    query = (QUERY_ALL if task.values_per_key > 1 else QUERY_ONE).format(key=asked)
    return needles, values[asked], query


def make_sample(task: RulerTask, tokenizer, length: int, seed: int) -> Sample:
    """One sample that fits in `length` tokens with room for the continuation."""
    rng = random.Random(f"{task.name}-{length}-{seed}")
    statements, answers, query = _statements(task, rng)
    slots = sorted(rng.random() for _ in statements)  # relative positions in the haystack, in order

    def text(n_fill: int) -> str:
        parts, placed = [], 0
        for i in range(n_fill + 1):
            while placed < len(statements) and slots[placed] * n_fill <= i:
                parts.append(statements[placed])
                placed += 1
            if i < n_fill:
                parts.append(FILLER)
        return " ".join(parts + [query])

    budget = length - task.max_new_tokens
    n_fill = largest_fill(lambda n: len(tokenizer(text(n))["input_ids"]), budget)
    return Sample(tokenizer(text(n_fill))["input_ids"], answers, statements)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Share of the expected answers that occur in the prediction (case-insensitive)."""
    lowered = prediction.lower()
    return sum(a.lower() in lowered for a in answers) / len(answers)


@dataclass
class RulerResult:
    tasks: list[str]
    lengths: list[int]
    samples: int
    seed: int
    score: dict[str, float] = field(default_factory=dict)  # "task@length" → mean string-match score
    rows: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def run_ruler(model, tokenizer, *, tasks: list[str], lengths: list[int], samples: int = 5, seed: int = 0,
              progress: bool = False, label: str = "") -> RulerResult:
    """Greedy-decode every sample and score it by string match."""
    specs = [get_task(t) for t in tasks]
    result = RulerResult([t.name for t in specs], list(lengths), samples, seed)
    cells = [(t, n, i) for t in specs for n in lengths for i in range(samples)]
    if progress:
        from tqdm.auto import tqdm

        cells = tqdm(cells, desc=f"{label + ' · ' if label else ''}ruler", unit="sample", leave=False)
    for task, n, i in cells:
        sample = make_sample(task, tokenizer, n, seed * 100_003 + i)
        prediction = tokenizer.decode(generate_greedy(model, sample.prompt_ids, task.max_new_tokens),
                                      skip_special_tokens=True)
        result.rows.append({"task": task.name, "length": n, "sample": i, "answers": sample.answers,
                            "prediction": prediction, "score": string_match_all(prediction, sample.answers)})
    for task in specs:
        for n in lengths:
            scores = [r["score"] for r in result.rows if r["task"] == task.name and r["length"] == n]
            result.score[f"{task.name}@{n}"] = sum(scores) / len(scores)
    if not result.rows:
        raise RopekitError("no RULER samples were run")
    return result
