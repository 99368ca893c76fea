"""RULER's synthetic tasks (Hsieh et al. 2024), generated here with the per-task settings of
NVIDIA/RULER `scripts/synthetic.yaml` and the constructions of `scripts/data/synthetic/*.py`.

Tasks (13): niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe,
fwe, qa_1, qa_2.
  * niah: needles "…special magic {numbers|words|uuids} for KEY is: VALUE." hidden in a haystack:
    noise (the passkey filler repeated, newline-joined), essay (words of a long text the user
    gives, needles inserted between sentences at depths drawn from 40 evenly spaced
    percentages, space-joined) or needle (distractor needles, newline-joined). Keys are
    words (adjective-noun pairs from ropekit's word lists) or uuids; values 7-digit numbers,
    words or uuids. num_needle_k = max(k, q); the query names q keys; the answers are all
    values of the queried keys. 128 generated tokens.
  * vt: one chain of num_hops + 1 variables (hops = 4 → 5 variables, 5-letter names), the first
    assigned a 5-digit value, inserted into the noise haystack; a one-shot example (3-letter
    names, value 12345) precedes the task. 30 generated tokens.
  * cwe: a numbered list of words; 10 common words repeated 30 times, the others 3 times
    (6 and 1 below 4096 tokens), with a one-shot example. 120 generated tokens.
  * fwe: coded 6-letter words drawn with Zipf counts num_words·k^−α/ζ(α) (α = 2), the most
    frequent one written as dots; the answer is the next three. 50 generated tokens.
  * qa_1 / qa_2: SQuAD / HotpotQA files the user provides (`ropekit.eval.ruler_qa`); without
    them they are skipped and the result says so. 32 generated tokens, string_match_part.
The haystack is sized by binary search to the longest that fits `length` − generation budget.
Prompt wording is ropekit's own (results.json: "prompts: ropekit wording"). Scoring follows
RULER's evaluate.py: predictions are stripped, control characters (\\x00-\\x1f) replaced by
newlines; string_match_all = mean over samples of the share of answers found (case-insensitive),
×100; string_match_part = share of samples where any answer is found, ×100.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ropekit.data.documents import decode_text
from ropekit.errors import RopekitError, did_you_mean
from ropekit.eval.passkey import FILLER, generate_greedy, largest_fill
from ropekit.eval.ruler_qa import QaData, load_qa, qa_documents

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


PROTOCOL = "ruler/2"
FOLLOWS = "NVIDIA/RULER scripts/synthetic.yaml, scripts/data/synthetic/*.py, scripts/eval/synthetic/constants.py"
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: 40 evenly spaced depth percentages
ADJECTIVES = (
    "amber",
    "brisk",
    "calm",
    "dusky",
    "eager",
    "faint",
    "gentle",
    "hollow",
    "icy",
    "jolly",
    "keen",
    "lush",
    "mellow",
    "narrow",
    "olive",
    "proud",
    "quiet",
    "rusty",
    "silent",
    "tidy",
    "urban",
    "vivid",
    "woolly",
    "young",
)
NOUNS = (
    "apple",
    "river",
    "candle",
    "garden",
    "silver",
    "thunder",
    "meadow",
    "lantern",
    "harbor",
    "pepper",
    "violet",
    "marble",
    "falcon",
    "copper",
    "willow",
    "ember",
    "glacier",
    "orchid",
    "saddle",
    "quartz",
    "badger",
    "cellar",
    "dune",
    "fiddle",
    "goblet",
    "hammock",
    "island",
    "jigsaw",
    "kettle",
    "ladder",
    "mitten",
    "nectar",
)


@dataclass(frozen=True)
class RulerTask:
    name: str
    kind: str  # niah, vt, cwe, fwe, qa
    max_new_tokens: int
    haystack: str = "noise"  # niah/vt: noise, essay, needle
    key_type: str = "words"
    value_type: str = "numbers"
    keys: int = 1
    values: int = 1
    queries: int = 1
    hops: int = 4
    dataset: str = ""  # qa: squad or hotpotqa

    @property
    def metric(self) -> str:
        return "string_match_part" if self.kind == "qa" else "string_match_all"


def _niah(name, haystack, key_type="words", value_type="numbers", keys=1, values=1, queries=1):
    return RulerTask(name, "niah", 128, haystack, key_type, value_type, keys, values, queries)


TASKS: dict[str, RulerTask] = {
    t.name: t
    for t in [
        _niah("niah_single_1", "noise"),
        _niah("niah_single_2", "essay"),
        _niah("niah_single_3", "essay", value_type="uuids"),
        _niah("niah_multikey_1", "essay", keys=4),
        _niah("niah_multikey_2", "needle"),
        _niah("niah_multikey_3", "needle", key_type="uuids", value_type="uuids"),
        _niah("niah_multivalue", "essay", values=4),
        _niah("niah_multiquery", "essay", queries=4),
        RulerTask("vt", "vt", 30, "noise", hops=4),
        RulerTask("cwe", "cwe", 120),
        RulerTask("fwe", "fwe", 50),
        RulerTask("qa_1", "qa", 32, dataset="squad"),
        RulerTask("qa_2", "qa", 32, dataset="hotpotqa"),
    ]
}
ESSAY_TASKS = tuple(t.name for t in TASKS.values() if t.haystack == "essay")
QA_TASKS = ("qa_1", "qa_2")


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]
    answers: list[str]  # every string the continuation should contain
    statements: list[str]  # needles / assignments hidden in the haystack


def get_task(name: str) -> RulerTask:
    if name not in TASKS:
        raise did_you_mean("RULER task", name, TASKS)
    return TASKS[name]


def random_item(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def essay_words(text: str) -> list[str]:
    return re.sub(r"\s+", " ", text).strip().split(" ")


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def insert_into_haystack(
    task: RulerTask, statements: list[str], size: int, rng: random.Random, essay: list[str] | None, make_distractor
) -> str:
    """The haystack of `size` units (sentences or essay words) with the statements inserted."""
    if task.haystack == "essay":
        if not essay:
            raise RopekitError(f"RULER task {task.name} needs an essay haystack (--ruler-essay)")
        words = (essay * (size // len(essay) + 1))[:size]
        sents = _sentences(" ".join(words))
        cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(statements))) + [len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
            if i - 1 < len(statements):
                parts.append(statements[i - 1])
        return " ".join(p for p in parts if p)
    sentences = [make_distractor() for _ in range(size)] if task.haystack == "needle" else [FILLER] * size
    slots = range(size + 1)
    positions = sorted(
        rng.sample(slots, len(statements)) if len(slots) >= len(statements) else rng.choices(slots, k=len(statements))
    )
    for j, (index, statement) in enumerate(zip(positions, statements)):  # in order: a vt chain stays in order
        sentences.insert(index + j, statement)
    return "\n".join(sentences)


def _needle(value_type: str, key: str, value: str) -> str:
    return f"One of the special magic {value_type} for {key} is: {value}."


def niah_parts(task: RulerTask, rng: random.Random) -> tuple[list[str], list[str], str]:
    """(needles, answers, question) for one niah sample."""
    num_keys = max(task.keys, task.queries)
    keys = [random_item(task.key_type, rng) for _ in range(num_keys)]
    values = [[random_item(task.value_type, rng) for _ in range(task.values)] for _ in keys]
    needles = [_needle(task.value_type, k, v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(num_keys), task.queries)
    answers = [v for i in asked for v in values[i]]
    names = [keys[i] for i in asked]
    query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
    noun = task.value_type if len(answers) > 1 else task.value_type[:-1]
    question = (
        f"Which special magic {noun} {'are' if len(answers) > 1 else 'is'} given for {query} in the text? "
        f"The special magic {noun} for {query} {'are' if len(answers) > 1 else 'is'}"
    )
    return needles, answers, f"\n{question}"


def vt_chain(hops: int, rng: random.Random, *, example: bool = False) -> tuple[list[str], list[str], str]:
    """(assignments, variable names, value): hops + 1 variables, RULER's num_hops counting."""
    width = 3 if example else 5
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=width))
        if name not in names:
            names.append(name)
    value = "12345" if example else str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]
    return chain, names, value


def vt_question(value: str, count: int) -> str:
    return (
        f"\nQuestion: which variables end up holding the value {value}? Answer: following the assignments, "
        f"{count} variables hold {value}; they are:"
    )


def coded_words(count: int, width: int, rng: random.Random) -> list[str]:
    vocab: set[str] = set()
    while len(vocab) < count:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=width)))
    words = sorted(vocab)
    rng.shuffle(words)
    return words


def cwe_list(num_words: int, common: int, uncommon: int, rng: random.Random) -> tuple[str, list[str]]:
    """A numbered word list: the first 10 words `common` times, the rest `uncommon` times, shuffled."""
    words = coded_words(num_words, 6, rng)
    listed = [w for w in words[:10] for _ in range(common)] + [w for w in words[10:] for _ in range(uncommon)]
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), words[:10]


def zeta(alpha: float, terms: int = 100_000) -> float:
    """Riemann ζ(α) for α > 1: partial sum plus the integral tail."""
    return sum(k**-alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1)


def fwe_text(num_words: int, rng: random.Random, alpha: float = 2.0) -> tuple[str, list[str]]:
    """Zipf-distributed coded words; the most frequent is written '....'; answers: ranks 2-4."""
    vocab = coded_words(2000, 6, rng)
    z = zeta(alpha)
    counts = [int(num_words * (k**-alpha) / z) for k in range(1, len(vocab) + 1)]
    words = [("...." if i == 0 else w) for i, (w, c) in enumerate(zip(vocab, counts)) for _ in range(c)]
    rng.shuffle(words)
    return " ".join(words), vocab[1:4]


def _prompt_text(
    task: RulerTask, size: int, seed_text: str, essay: list[str] | None, qa: QaData | None = None
) -> tuple[str, list[str], list[str]]:
    """(prompt text, answers, hidden statements) for a haystack of `size` units; deterministic in seed_text."""
    rng = random.Random(seed_text)
    if task.kind == "niah":
        needles, answers, question = niah_parts(task, rng)
        distractor = lambda: _needle(
            task.value_type, random_item(task.key_type, rng), random_item(task.value_type, rng)
        )
        context = insert_into_haystack(task, needles, size, rng, essay, distractor)
        head = f"Special magic {task.value_type} are hidden in the text below; remember them, you will be asked about them."
        return f"{head}\n{context}{question}", answers, needles
    if task.kind == "vt":
        ex_chain, ex_names, ex_value = vt_chain(task.hops, rng, example=True)
        example = insert_into_haystack(task, ex_chain, 5, rng, essay, None)
        chain, names, value = vt_chain(task.hops, rng)
        context = insert_into_haystack(task, chain, size, rng, essay, None)
        head = "Keep track of the variable assignments hidden in the text below.\n\n"
        shot = f"{head}{example}{vt_question(ex_value, len(ex_names))} {' '.join(ex_names)}\n"
        return f"{shot}{head}{context}{vt_question(value, len(names))}", names, chain
    if task.kind == "cwe":
        text, answer = cwe_text(size, rng, small=False)
        return text, answer, []
    if task.kind == "fwe":
        text, answer = fwe_text(size, rng)
        return (
            (
                f"Count how often each coded word occurs in the text below. {text}\nQuestion: ignoring the dots "
                "'....', which three coded words occur most often? Answer: the three most frequent coded words are:"
            ),
            answer,
            [],
        )
    if qa is None:
        raise RopekitError(f"RULER task {task.name} needs question-answer files (--ruler-qa-dir)")
    picked = qa.questions[rng.randrange(len(qa.questions))]
    docs = qa_documents(qa, picked, max(size, len(picked.gold)), rng)
    context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    ask = "Answer the question from the documents; give only the answer."
    return f"{ask}\n\n{context}\n\n{ask}\n\nQuestion: {picked.query} Answer:", picked.answers, []


def make_sample(
    task: RulerTask,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    seed: int,
    *,
    essay: list[str] | None = None,
    qa: QaData | None = None,
) -> Sample:
    """One sample that fits in `length` tokens with room for the task's generation budget."""
    seed_text = f"{task.name}-{length}-{seed}"
    budget = length - task.max_new_tokens
    if task.kind == "cwe" and length < 4096:  # RULER: lower repetition counts below 4096 tokens
        size = largest_fill(
            lambda n: len(tokenizer(cwe_text(n, random.Random(seed_text), small=True)[0])["input_ids"]), budget
        )
        text, answers = cwe_text(size, random.Random(seed_text), small=True)
        return Sample(tokenizer(text)["input_ids"], answers, [])
    minimum = 1 if task.kind in ("niah", "vt") else 0
    size = largest_fill(
        lambda n: len(tokenizer(_prompt_text(task, n + minimum, seed_text, essay, qa)[0])["input_ids"]), budget
    )
    text, answers, statements = _prompt_text(task, size + minimum, seed_text, essay, qa)
    if len(tokenizer(text)["input_ids"]) > budget:
        raise RopekitError(f"RULER task {task.name} does not fit in {length} tokens")
    return Sample(tokenizer(text)["input_ids"], answers, statements)


def cwe_text(size: int, rng: random.Random, *, small: bool) -> tuple[str, list[str]]:
    """One-shot example then the task: 10 + size words (RULER's counts; `small` below 4096 tokens)."""
    common, uncommon, ex_common, ex_uncommon, ex_words = (6, 1, 3, 1, 20) if small else (30, 3, 10, 3, 40)
    ex_list, ex_answer = cwe_list(ex_words, ex_common, ex_uncommon, rng)
    listed, answer = cwe_list(size + 10, common, uncommon, rng)
    question = "\nQuestion: which 10 words occur most often in the list above? Answer: the 10 most frequent words are:"
    head = "Here is a numbered list of words, some repeated more than others; remember the most frequent ones.\n"
    shot = f"{head}{ex_list}{question} " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
    return f"{shot}\n{head}{listed}{question}", answer


CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's evaluate.py: strip, control characters → newline, strip."""
    return CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers: list[str]) -> float:
    """×100 share of the expected answers that occur in the prediction (case-insensitive)."""
    lowered = prediction.lower()
    return 100 * sum(a.lower() in lowered for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """×100 if any expected answer occurs in the prediction (case-insensitive), else 0."""
    lowered = prediction.lower()
    return 100.0 * max(a.lower() in lowered for a in answers)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


@dataclass
class RulerResult:
    tasks: list[str]
    lengths: list[int]
    samples: int
    seed: int
    protocol: str = PROTOCOL
    follows: str = FOLLOWS
    prompts: str = "ropekit wording"
    essay: str | None = None  # source of the essay haystack
    skipped: dict[str, str] = field(default_factory=dict)  # task → why
    score: dict[str, float] = field(default_factory=dict)  # "task@length" → mean score, 0-100
    rows: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def runnable_tasks(
    tasks: list[str], *, essay: list[str] | None, qa_dir: str | None
) -> tuple[list[RulerTask], dict[str, str]]:
    """The tasks that can run, and why each other one is skipped."""
    specs, skipped = [], {}
    for name in tasks:
        task = get_task(name)
        if task.kind == "qa" and qa_dir is None:
            skipped[name] = "needs SQuAD / HotpotQA files: give --ruler-qa-dir"
        elif task.haystack == "essay" and not essay:
            skipped[name] = "needs an essay haystack: give --ruler-essay (a text file or folder)"
        else:
            specs.append(task)
    return specs, skipped


def read_essay(path: str | Path | None) -> list[str] | None:
    if path is None:
        return None
    from ropekit.data.documents import read_documents

    words = essay_words(" ".join(text for _, text in read_documents(path)))
    if len(words) < 100:
        raise RopekitError(f"{path}: the essay haystack needs at least 100 words")
    return words


def run_ruler(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    tasks: list[str],
    lengths: list[int],
    samples: int = 5,
    seed: int = 0,
    essay_path: str | Path | None = None,
    qa_dir: str | None = None,
    progress: bool = False,
    label: str = "",
) -> RulerResult:
    """Greedy-decode every sample and score it with the task's metric (0-100)."""
    essay = read_essay(essay_path)
    specs, skipped = runnable_tasks(tasks, essay=essay, qa_dir=qa_dir)
    qa = {t.dataset: load_qa(qa_dir, t.dataset) for t in specs if t.kind == "qa"}
    result = RulerResult(
        [t.name for t in specs],
        list(lengths),
        samples,
        seed,
        essay=None if essay_path is None else str(essay_path),
        skipped=skipped,
    )
    cells = [(t, n, i) for t in specs for n in lengths for i in range(samples)]
    if progress:
        from tqdm.auto import tqdm

        cells = tqdm(cells, desc=f"{label + ' · ' if label else ''}ruler", unit="sample", leave=False)
    for task, n, i in cells:
        sample = make_sample(task, tokenizer, n, seed * 100_003 + i, essay=essay, qa=qa.get(task.dataset))
        raw = decode_text(
            tokenizer, generate_greedy(model, sample.prompt_ids, task.max_new_tokens), skip_special_tokens=True
        )
        prediction = postprocess(raw)
        result.rows.append(
            {
                "task": task.name,
                "length": n,
                "sample": i,
                "answers": sample.answers,
                "prediction": prediction,
                "score": METRICS[task.metric](prediction, sample.answers),
            }
        )
    for task in specs:
        for n in lengths:
            scores = [r["score"] for r in result.rows if r["task"] == task.name and r["length"] == n]
            result.score[f"{task.name}@{n}"] = round(sum(scores) / len(scores), 2)
    if not result.rows:
        raise RopekitError("no RULER task could run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return result
