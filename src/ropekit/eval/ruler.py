"""RULER's synthetic tasks (Hsieh et al. 2024), generated as NVIDIA/RULER's generator makes them:
the per-task settings of `scripts/synthetic.yaml` and the constructions of
`scripts/data/synthetic/*.py`, with the libraries they use (`ropekit.eval.ruler_text`:
wonderwords' word lists, nltk's Punkt sentence splitter).

Tasks (13): niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe,
fwe, qa_1, qa_2.
  * niah: needles "One of the special magic {numbers|words|uuids} for KEY is: VALUE." hidden in a
    haystack: noise (the passkey filler sentence repeated), needle (distractor needles with
    random keys and values), both newline-joined, the needles inserted before distinct filler
    lines (never after the last one); or essay (the first n words of a text the user gives,
    split into sentences by Punkt, each needle inserted between sentences at depth
    int(#sentences · (d / 100)) for d drawn without replacement from RULER's 40 depths,
    0 … 100; depth 100 follows the last sentence). Keys are adjective-noun pairs from
    wonderwords' lists or uuids; values 7-digit numbers, such words or uuids.
    num_needle_k = max(k, q); the query names q keys; the answers are every value of the
    queried keys. 128 generated tokens.
  * vt: one chain of num_hops + 1 variables (hops = 4 → 5 variables, 5-letter names), the first
    assigned a 5-digit value (10000 … 99998), inserted in order before distinct filler lines.
    A one-shot example precedes the task: a chain of 3-letter names over as many filler lines
    as keep the example's prompt within 500 tokens (RULER builds it for max_seq_length 500),
    its names and value drawn per sample (RULER's `randomize_icl`). 30 generated tokens.
  * cwe: a numbered list of distinct wonderwords words (nouns, adjectives, verbs): 10 common
    words repeated 30 times, the others 3 times, shuffled; one-shot example of 40 words (10 / 3
    repetitions). Below 4096 tokens: 6 / 1 repetitions and an example of 20 words (3 / 1).
    120 generated tokens.
  * fwe: coded 6-letter words with Zipf counts int(n · k^−α / ζ(α)) (α = 2) over a vocabulary
    of (length − 50) // 50 words; the most frequent one is written "..." (three dots) while the
    question speaks of '....' (four), as the official code does; the answer is ranks 2-4.
    50 generated tokens.
  * qa_1 / qa_2: SQuAD / HotpotQA files the user provides (`ropekit.eval.ruler_qa`); sample
    seed s asks question s mod the number of questions (RULER: the first questions in order).
    Without the files they are skipped and the result says so. 32 generated tokens,
    string_match_part.
Sizing as RULER's generator: one search per task and length finds the largest haystack whose
prompt fits in `length` − the generation budget, with the first sample's draw (binary search;
fwe: RULER's steps of budget // 32 words from budget // 6); a sample that does not fit at that
size gives back RULER's increment until it does (essay 500 words; noise and needle 25 lines,
5 below 4096 tokens; vt 10 lines, 5 below 4096; cwe 10 words; qa 10 documents).
Deliberate differences (results.json lists them): prompt wording is ropekit's own; distractor
keys never repeat a needle's key, and a sample's keys are distinct (RULER's independent draws
make about 2 in 10,000 niah_multikey_2 samples ambiguous); every shuffle uses the sample's own
generator (RULER re-seeds some shuffles with its run seed, so every sample of a run shares
one needle order, cwe and fwe word order and qa document order); the vt example's chain
positions are drawn per sample (RULER: once per run). Scoring follows RULER's evaluate.py:
predictions are stripped, control characters (\\x00-\\x1f) replaced by newlines;
string_match_all = mean over samples of the share of answers found (case-insensitive), ×100;
string_match_part = share of samples where any answer is found, ×100; rounded to 2 places
after the mean, as RULER's metric functions.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ropekit.data.documents import decode_text
from ropekit.errors import RopekitError, did_you_mean
from ropekit.eval.passkey import FILLER, generate_greedy
from ropekit.eval.ruler_qa import QaData, load_qa, qa_documents
from ropekit.eval.ruler_text import Essay, common_words, random_key, splitter_record, words_record

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


PROTOCOL = "ruler/3"
FOLLOWS = "NVIDIA/RULER scripts/synthetic.yaml, scripts/data/synthetic/*.py, scripts/eval/synthetic/constants.py"
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40)), no ties
SMALL_WINDOW = 4096  # RULER: below this max_seq_length, cwe repeats less and noise haystacks grow by 5
VT_EXAMPLE_TOKENS = 500  # RULER builds vt's one-shot example for max_seq_length 500
DEVIATIONS = (
    "prompt wording is ropekit's own",
    "niah: distractor keys never repeat a needle's key and a sample's keys are distinct "
    "(RULER's independent draws make about 2 in 10,000 niah_multikey_2 samples ambiguous)",
    "every shuffle uses the sample's own generator (RULER re-seeds the needle, cwe/fwe word and "
    "qa document shuffles with its run seed, so the samples of a run share those orders)",
    "vt: the one-shot example's chain positions are drawn per sample (RULER: once per run)",
    "cwe: beyond wonderwords' 8,169 words RULER draws from its english_words.json; ropekit refuses",
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

    @property
    def needles(self) -> int:
        """niah: statements hidden in the haystack (num_needle_k = max(k, q) keys × v values)."""
        return max(self.keys, self.queries) * self.values

    def minimum(self) -> int:
        """The smallest haystack a prompt can have: lines for every statement, 10 cwe words, one unit else."""
        if self.kind == "niah" and self.haystack != "essay":
            return self.needles
        return {"vt": self.hops + 1, "cwe": 10}.get(self.kind, 1)

    def increment(self, length: int) -> int:
        """RULER's step down when a sample does not fit at the searched size."""
        small = length < SMALL_WINDOW
        if self.kind == "niah":
            return 500 if self.haystack == "essay" else 5 if small else 25
        if self.kind == "vt":
            return 5 if small else 10
        if self.kind == "fwe":
            return max(1, (length - self.max_new_tokens) // 32)
        return 10  # cwe words, qa documents


def largest_fit(count: Callable[[int], int], budget: int, low: int) -> int:
    """The largest n ≥ low with count(n) ≤ budget, for a count that grows with n (about linearly).

    Secant steps from count(low) estimate the answer; steps doubling from the estimate bracket
    it; bisection ends it: about a dozen counts, all near the answer, where a doubling search
    from 1 makes twice as many, up to twice as long. RopekitError when count(low) exceeds the
    budget."""
    base = count(low)
    if base > budget:
        raise RopekitError(f"the prompt needs more than {budget} tokens even at its smallest")
    fits, over = low, 0  # count(fits) ≤ budget < count(over); over 0: none known yet

    def check(n: int) -> int:
        nonlocal fits, over
        tokens = count(n)
        if tokens <= budget:
            fits = max(fits, n)
        else:
            over = min(over, n) if over else n
        return tokens

    def inside(n: int) -> int:
        return min(max(n, fits + 1), over - 1) if over else max(n, fits + 1)

    previous, tokens, n = low, base, 2 * low + 1
    for _ in range(3):  # secant steps toward count(n) = budget
        n = inside(n)
        if over and over - fits <= 1:
            return fits
        now = check(n)
        rise, run = now - tokens, n - previous
        slope = rise / run if rise * run > 0 else max(now - base, 1) / max(n - low, 1)
        previous, tokens, n = n, now, n + math.floor((budget - now) / slope)
    n, step = inside(n), max(1, n // 512)
    if not over or over - fits > 1:
        if check(n) <= budget:  # gallop up from the estimate until a size does not fit
            while (not over or fits + step < over) and check(fits + step) <= budget:
                step *= 2
        else:  # gallop down until one fits
            while over - step > fits and check(over - step) > budget:
                step *= 2
    while over - fits > 1:
        check((fits + over) // 2)
    return fits


def _niah(
    name: str,
    haystack: str,
    key_type: str = "words",
    value_type: str = "numbers",
    keys: int = 1,
    values: int = 1,
    queries: int = 1,
) -> RulerTask:
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
    size: int = 0  # haystack units: filler or distractor lines, essay words, cwe words, fwe n, qa documents


def get_task(name: str) -> RulerTask:
    if name not in TASKS:
        raise did_you_mean("RULER task", name, TASKS)
    return TASKS[name]


def random_item(kind: str, rng: random.Random) -> str:
    """RULER's generate_random: a 7-digit number, an adjective-noun key or a version-4 uuid."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return random_key(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def distinct_items(
    kind: str, count: int, rng: random.Random, *, avoid: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """`count` draws of `kind`, each redrawn until it differs from the others and from `avoid`."""
    out: list[str] = []
    while len(out) < count:
        item = random_item(kind, rng)
        if item not in avoid and item not in out:
            out.append(item)
    return out


def essay_words(text: str) -> list[str]:
    """RULER's essay haystack: white space collapsed to single spaces, split into words."""
    return re.sub(r"\s+", " ", text).strip().split(" ")


def insert_before_lines(lines: list[str], statements: list[str], rng: random.Random) -> list[str]:
    """niah (noise, needle): each statement before a distinct line, drawn from range(len(lines)),
    inserted from the last position back (RULER: the first statement goes to the largest index)."""
    out = list(lines)
    for index, statement in zip(sorted(rng.sample(range(len(lines)), len(statements)), reverse=True), statements):
        out.insert(index, statement)
    return out


def insert_chain(lines: list[str], chain: list[str], rng: random.Random) -> list[str]:
    """vt: the chain in order, link j before line p_j of sorted distinct positions p drawn from range(len(lines))."""
    out = list(lines)
    for j, position in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
        out.insert(position + j, chain[j])
    return out


def insert_by_depth(sentences: list[str], statements: list[str], rng: random.Random) -> str:
    """niah (essay): statement i after the first int(#sentences · (d_i / 100)) sentences, depths drawn
    from DEPTHS without replacement and sorted; the pieces joined by spaces (empty pieces included)."""
    cuts = sorted(int(len(sentences) * (depth / 100)) for depth in rng.sample(DEPTHS, len(statements)))
    bounds = [0, *cuts, len(sentences)]
    pieces: list[str] = []
    for i in range(1, len(bounds)):
        pieces.append(" ".join(sentences[bounds[i - 1] : bounds[i]]))
        if i - 1 < len(statements):
            pieces.append(statements[i - 1])
    return " ".join(pieces)


def _needle(value_type: str, key: str, value: str) -> str:
    return f"One of the special magic {value_type} for {key} is: {value}."


def niah_parts(task: RulerTask, rng: random.Random) -> tuple[list[str], list[str], list[str], str]:
    """(needles, keys, answers, question) for one niah sample."""
    keys = distinct_items(task.key_type, max(task.keys, task.queries), rng)
    values = [[random_item(task.value_type, rng) for _ in range(task.values)] for _ in keys]
    needles = [_needle(task.value_type, k, v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(len(keys)), task.queries)
    answers = [v for i in asked for v in values[i]]
    names = [keys[i] for i in asked]
    query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
    noun = task.value_type if len(answers) > 1 else task.value_type[:-1]
    question = (
        f"Which special magic {noun} {'are' if len(answers) > 1 else 'is'} given for {query} in the text? "
        f"The special magic {noun} for {query} {'are' if len(answers) > 1 else 'is'}"
    )
    return needles, keys, answers, f"\n{question}"


def niah_context(
    task: RulerTask, needles: list[str], keys: list[str], size: int, rng: random.Random, essay: Essay | None
) -> str:
    """The haystack of `size` units (essay words, filler or distractor lines) with the needles in it."""
    if task.haystack == "essay":
        if not essay:
            raise RopekitError(f"RULER task {task.name} needs an essay haystack (--ruler-essay)")
        return insert_by_depth(essay.sentences(size), needles, rng)
    if task.haystack == "needle":
        asked = set(keys)
        lines = [
            _needle(
                task.value_type,
                distinct_items(task.key_type, 1, rng, avoid=asked)[0],
                random_item(task.value_type, rng),
            )
            for _ in range(size)
        ]
    else:
        lines = [FILLER] * size
    return "\n".join(insert_before_lines(lines, needles, rng))


def vt_chain(hops: int, rng: random.Random, *, example: bool = False) -> tuple[list[str], list[str], str]:
    """(assignments, variable names, value): hops + 1 distinct names (3 letters in the example, else 5),
    the first assigned a value drawn from 10000 … 99998 (numpy's randint(10000, 99999))."""
    width = 3 if example else 5
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=width))
        if name not in names:
            names.append(name)
    value = str(rng.randrange(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]
    return chain, names, value


def vt_question(value: str, count: int) -> str:
    return (
        f"\nQuestion: which variables end up holding the value {value}? Answer: following the assignments, "
        f"{count} variables hold {value}; they are:"
    )


def vt_prompt(chain: list[str], names: list[str], value: str, size: int, rng: random.Random) -> str:
    """The vt task text: the chain among `size` filler lines, then the question."""
    context = "\n".join(insert_chain([FILLER] * size, chain, rng))
    return (
        f"Keep track of the variable assignments hidden in the text below.\n\n{context}{vt_question(value, len(names))}"
    )


def vt_example_size(task: RulerTask, tokenizer: PreTrainedTokenizerBase) -> int:
    """Filler lines of the vt one-shot example: the most whose prompt stays within 500 tokens."""
    chain, names, value = vt_chain(task.hops, random.Random("vt-example"), example=True)

    def tokens(n: int) -> int:
        return len(tokenizer(vt_prompt(chain, names, value, n, random.Random("vt-example")))["input_ids"])

    return largest_fit(tokens, VT_EXAMPLE_TOKENS, task.minimum())


def vt_text(task: RulerTask, size: int, example_size: int, rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(one-shot example, blank line, task; answer names; chain)."""
    ex_chain, ex_names, ex_value = vt_chain(task.hops, rng, example=True)
    example = f"{vt_prompt(ex_chain, ex_names, ex_value, example_size, rng)} {' '.join(ex_names)}\n"
    chain, names, value = vt_chain(task.hops, rng)
    return f"{example}\n{vt_prompt(chain, names, value, size, rng)}", names, chain


def cwe_list(num_words: int, common: int, uncommon: int, rng: random.Random) -> tuple[str, list[str]]:
    """A numbered list of `num_words` distinct words: the first 10 `common` times, the rest `uncommon` times, shuffled."""
    vocabulary = common_words()
    if num_words > len(vocabulary):
        raise RopekitError(
            f"RULER's cwe needs {num_words} distinct words here; wonderwords has {len(vocabulary)} "
            "(RULER then draws from its english_words.json, which ropekit does not use): use a shorter length"
        )
    words = rng.sample(vocabulary, num_words)
    listed = words[:10] * common + words[10:] * uncommon
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), words[:10]


def cwe_text(num_words: int, rng: random.Random, *, small: bool) -> tuple[str, list[str]]:
    """One-shot example then the task list of `num_words` distinct words (RULER's counts; `small` below 4096 tokens)."""
    common, uncommon, ex_common, ex_uncommon, ex_words = (6, 1, 3, 1, 20) if small else (30, 3, 10, 3, 40)
    ex_list, ex_answer = cwe_list(ex_words, ex_common, ex_uncommon, rng)
    listed, answer = cwe_list(num_words, common, uncommon, rng)
    question = "\nQuestion: which 10 words occur most often in the list above? Answer: the 10 most frequent words are:"
    head = "Here is a numbered list of words, some repeated more than others; remember the most frequent ones.\n"
    shot = f"{head}{ex_list}{question} " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
    return f"{shot}\n{head}{listed}{question}", answer


def zeta(alpha: float) -> float:
    """Riemann ζ(α) for α > 1: π²/6 at α = 2 (scipy's value, bit for bit), else Euler–Maclaurin."""
    if alpha == 2:
        return math.pi**2 / 6
    n = 20
    head = sum(k**-alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + n**-alpha / 2 + alpha * n ** (-alpha - 1) / 12


def coded_vocabulary(size: int, rng: random.Random) -> list[str]:
    """`size` distinct random 6-letter words, sorted then shuffled; the first becomes "..." (RULER's noise word)."""
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    words = sorted(vocab)
    rng.shuffle(words)
    words[0] = "..."
    return words


def fwe_text(num_words: int, vocab_size: int, rng: random.Random, alpha: float = 2.0) -> tuple[str, list[str]]:
    """Zipf counts int(n · k^−α / ζ(α)) of the ranked vocabulary, shuffled; answers: ranks 2-4."""
    vocab = coded_vocabulary(vocab_size, rng)
    z = zeta(alpha)
    words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(num_words * (k**-alpha) / z))]
    rng.shuffle(words)
    return " ".join(words), vocab[1:4]


def fwe_prompt(text: str) -> str:
    return (
        f"Count how often each coded word occurs in the text below. {text}\nQuestion: ignoring the dots "
        "'....', which three coded words occur most often? Answer: the three most frequent coded words are:"
    )


def prompt_text(
    task: RulerTask,
    size: int,
    seed: int,
    *,
    length: int,
    essay: Essay | None = None,
    qa: QaData | None = None,
    example_size: int = 0,
) -> tuple[str, list[str], list[str]]:
    """(prompt text, answers, hidden statements) for a haystack of `size` units; deterministic in the seed."""
    rng = random.Random(f"{task.name}-{length}-{seed}")
    if task.kind == "niah":
        needles, keys, answers, question = niah_parts(task, rng)
        context = niah_context(task, needles, keys, size, rng, essay)
        head = f"Special magic {task.value_type} are hidden in the text below; remember them, you will be asked about them."
        return f"{head}\n{context}{question}", answers, needles
    if task.kind == "vt":
        return vt_text(task, size, example_size, rng)
    if task.kind == "cwe":
        text, answer = cwe_text(size, rng, small=length < SMALL_WINDOW)
        return text, answer, []
    if task.kind == "fwe":
        text, answer = fwe_text(size, max(4, (length - task.max_new_tokens) // 50), rng)  # (≥ 4: three answers)
        return fwe_prompt(text), answer, []
    if qa is None:
        raise RopekitError(f"RULER task {task.name} needs question-answer files (--ruler-qa-dir)")
    picked = qa.questions[seed % len(qa.questions)]
    docs = qa_documents(qa, picked, max(size, len(picked.gold)), rng)
    context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    ask = "Answer the question from the documents; give only the answer."
    return f"{ask}\n\n{context}\n\n{ask}\n\nQuestion: {picked.query} Answer:", picked.answers, []


def _as_essay(essay: Essay | list[str] | None) -> Essay | None:
    return essay if essay is None or isinstance(essay, Essay) else Essay(essay)


@dataclass(frozen=True)
class _Builder:
    """Prompts of one task at one length for one sample seed, by haystack size."""

    task: RulerTask
    tokenizer: PreTrainedTokenizerBase
    length: int
    seed: int
    essay: Essay | None
    qa: QaData | None

    @property
    def budget(self) -> int:
        return self.length - self.task.max_new_tokens

    @cached_property
    def example_size(self) -> int:
        return vt_example_size(self.task, self.tokenizer) if self.task.kind == "vt" else 0

    def text(self, size: int) -> tuple[str, list[str], list[str]]:
        return prompt_text(
            self.task,
            size,
            self.seed,
            length=self.length,
            essay=self.essay,
            qa=self.qa,
            example_size=self.example_size,
        )

    def tokens(self, size: int) -> int:
        return len(self.tokenizer(self.text(size)[0])["input_ids"])

    def search(self) -> int:
        """The haystack size (see `haystack_size`)."""
        if self.task.kind == "fwe":  # the last of start, start + step, … whose prompt is shorter than the budget
            start, step = max(1, self.budget // 6), self.task.increment(self.length)
            try:
                return start + step * largest_fit(lambda k: self.tokens(start + k * step), self.budget - 1, 0)
            except RopekitError:  # the start is already too long: RULER steps back once
                return max(1, start - step)
        try:
            return largest_fit(self.tokens, self.budget, self.task.minimum())
        except RopekitError:
            raise RopekitError(
                f"RULER task {self.task.name} does not fit in {self.length} tokens: its smallest prompt needs "
                f"more than {self.budget} (the window less {self.task.max_new_tokens} generated tokens)"
            ) from None


def haystack_size(
    task: RulerTask,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    seed: int,
    *,
    essay: Essay | list[str] | None = None,
    qa: QaData | None = None,
) -> int:
    """RULER's haystack size for `task` at `length`, found with sample `seed`'s draw: the largest whose
    prompt fits in `length` − the generation budget (binary search); fwe: RULER's steps of
    budget // 32 words from budget // 6, the last whose prompt is shorter than the budget."""
    return _Builder(task, tokenizer, length, seed, _as_essay(essay), qa).search()


def make_sample(
    task: RulerTask,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    seed: int,
    *,
    essay: Essay | list[str] | None = None,
    qa: QaData | None = None,
    size: int | None = None,
) -> Sample:
    """One sample that fits in `length` tokens with room for the task's generation budget.

    `size`: the haystack size found for the task and length (`haystack_size`, once per cell, as
    RULER); None searches it with this sample's draw. A sample that does not fit at `size` gives
    back RULER's increment until it does.
    """
    build = _Builder(task, tokenizer, length, seed, _as_essay(essay), qa)
    size = build.search() if size is None else size
    while True:
        text, answers, statements = build.text(size)
        ids = tokenizer(text)["input_ids"]
        if len(ids) <= build.budget:
            return Sample(ids, answers, statements, size)
        if size <= task.minimum():
            raise RopekitError(f"RULER task {task.name} does not fit in {length} tokens")
        size = max(task.minimum(), size - task.increment(length))


CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's evaluate.py: strip, control characters → newline, strip."""
    return CONTROL.sub("\n", prediction.strip()).strip()


def share_found(prediction: str, answers: list[str]) -> float:
    """Share (0-1) of the expected answers that occur in the prediction, case-insensitive."""
    lowered = prediction.lower()
    return sum(1.0 if a.lower() in lowered else 0.0 for a in answers) / len(answers)


def any_found(prediction: str, answers: list[str]) -> float:
    """1.0 if any expected answer occurs in the prediction (case-insensitive), else 0.0."""
    lowered = prediction.lower()
    return max(1.0 if a.lower() in lowered else 0.0 for a in answers)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """×100 share of the expected answers that occur in the prediction (case-insensitive)."""
    return 100 * share_found(prediction, answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """×100 if any expected answer occurs in the prediction (case-insensitive), else 0."""
    return 100 * any_found(prediction, answers)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}
SAMPLE_SCORES: dict[str, Callable[[str, list[str]], float]] = {
    "string_match_all": share_found,
    "string_match_part": any_found,
}


def task_score(metric: str, predictions: list[str], answers: list[list[str]]) -> float:
    """RULER's metric function over a task's samples: round(Σ sample scores (0-1) / n × 100, 2),
    in that order (the mean of ×100 scores can round the other way on an exact x.xx5)."""
    score = SAMPLE_SCORES[metric]
    return round(sum(score(p, a) for p, a in zip(predictions, answers)) / len(predictions) * 100, 2)


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
    words: str = field(default_factory=words_record)  # where keys and cwe words come from
    sentences: str = field(default_factory=splitter_record)  # the essay's sentence splitter
    sizing: str = "RULER's: one haystack search per task and length, RULER's increments per sample"
    deviations: list[str] = field(default_factory=lambda: list(DEVIATIONS))
    skipped: dict[str, str] = field(default_factory=dict)  # task → why
    sizes: dict[str, int] = field(default_factory=dict)  # "task@length" → the searched haystack size
    score: dict[str, float] = field(default_factory=dict)  # "task@length" → score, 0-100, RULER's rounding
    rows: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def runnable_tasks(
    tasks: list[str], *, essay: Essay | list[str] | None, qa_dir: str | None
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


def read_essay(path: str | Path | None) -> Essay | None:
    if path is None:
        return None
    from ropekit.data.documents import read_documents

    words = essay_words(" ".join(text for _, text in read_documents(path)))
    if len(words) < 100:
        raise RopekitError(f"{path}: the essay haystack needs at least 100 words")
    return Essay(words)


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
    first = seed * 100_003
    cells: Any = [(t, n, i) for t in specs for n in lengths for i in range(samples)]
    if progress:
        from tqdm.auto import tqdm

        cells = tqdm(cells, desc=f"{label + ' · ' if label else ''}ruler", unit="sample", leave=False)
    for task, n, i in cells:
        cell = f"{task.name}@{n}"
        if cell not in result.sizes:
            result.sizes[cell] = haystack_size(task, tokenizer, n, first, essay=essay, qa=qa.get(task.dataset))
        sample = make_sample(
            task, tokenizer, n, first + i, essay=essay, qa=qa.get(task.dataset), size=result.sizes[cell]
        )
        raw = decode_text(
            tokenizer, generate_greedy(model, sample.prompt_ids, task.max_new_tokens), skip_special_tokens=True
        )
        prediction = postprocess(raw)
        result.rows.append(
            {
                "task": task.name,
                "length": n,
                "sample": i,
                "haystack": sample.size,
                "answers": sample.answers,
                "prediction": prediction,
                "score": METRICS[task.metric](prediction, sample.answers),
            }
        )
    for task in specs:
        for n in lengths:
            rows = [r for r in result.rows if r["task"] == task.name and r["length"] == n]
            result.score[f"{task.name}@{n}"] = task_score(
                task.metric, [r["prediction"] for r in rows], [r["answers"] for r in rows]
            )
    if not result.rows:
        raise RopekitError("no RULER task could run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return result
