"""IFEval's verifiable instructions: one checker and one description per instruction id.

Verdicts follow google-research `instruction_following_eval` (the IFEval reference) exactly: same
regexes, same counting, same normalisation of kwargs. Where the reference draws a random value for
an invalid kwarg (`keywords:letter_frequency` with a `letter` that is not an ASCII letter), we use
one fixed value instead, 'e' (see `INVALID_LETTER`). A missing kwarg, for which the reference would
draw a random value, is an error here: a benchmark must say what it asks.

`startend:start_checker` is not an IFEval instruction: it is ours, for the paper's T16 "Starting
Constraint", written as the mirror image of `startend:end_checker`.
"""

from __future__ import annotations

import collections
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from . import text

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
INVALID_LETTER = "e"  # replaces a non-letter `letter` kwarg (the reference draws a random letter)
LANGUAGES = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi", "fr": "French",
    "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian", "bn": "Bengali", "uk": "Ukrainian",
    "th": "Thai", "ur": "Urdu", "ta": "Tamil", "te": "Telugu", "bg": "Bulgarian", "ko": "Korean",
    "pl": "Polish", "he": "Hebrew", "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili",
    "kn": "Kannada", "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    """A verifiable instruction: ``check(response, **kwargs) -> bool`` and its IFEval sentence."""

    id: str
    args: tuple[str, ...]
    check: Callable[..., bool]
    template: str

    @property
    def category(self) -> str:
        return self.id.split(":")[0]


def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}.")
    return count < threshold if relation == RELATIONS[0] else count >= threshold


# ---- keywords ---------------------------------------------------------------------------------


def keywords_existence(value: str, *, keywords: list[str]) -> bool:
    return all(re.search(k, value, flags=re.IGNORECASE) for k in sorted(keywords))


def keywords_frequency(value: str, *, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(keyword.strip(), value, flags=re.IGNORECASE)), relation, frequency)


def keywords_forbidden(value: str, *, forbidden_words: list[str]) -> bool:
    return not any(re.search(r"\b" + w + r"\b", value, flags=re.IGNORECASE) for w in set(forbidden_words))


def normalize_letter(letter: str | None) -> str:
    if not letter or len(letter) > 1 or not 97 <= ord(letter.lower()) <= 122:
        return INVALID_LETTER
    return letter.strip().lower()


def keywords_letter_frequency(value: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    counts = collections.Counter(value.lower())
    return _compare(counts[normalize_letter(letter)], let_relation, let_frequency)


# ---- language, length -------------------------------------------------------------------------


def response_language(value: str, *, language: str) -> bool:
    try:
        return text.detect_language(value) == language
    except text.LanguageUndetectable:
        return True  # the reference counts an undetectable language as followed


def number_sentences(value: str, *, num_sentences: int, relation: str) -> bool:
    return _compare(text.count_sentences(value), relation, num_sentences)


def number_paragraphs(value: str, *, num_paragraphs: int) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", value)
    count = len(paragraphs)
    for i, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == num_paragraphs


def number_words(value: str, *, num_words: int, relation: str) -> bool:
    return _compare(text.count_words(value), relation, num_words)


def nth_paragraph_first_word(value: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paragraphs = re.split(r"\n\n", value)
    count = len(paragraphs) - sum(1 for p in paragraphs if not p.strip())
    if nth_paragraph > count:
        return False
    paragraph = paragraphs[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    found = ""
    for ch in word:
        if ch in {".", ",", "?", "!", "'", '"'}:
            break
        found += ch.lower()
    return count == num_paragraphs and found == first_word.lower()


# ---- detectable content and format ------------------------------------------------------------


def number_placeholders(value: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", value)) >= num_placeholders


def postscript(value: str, *, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + marker.lower() + r".*$"  # unescaped, as the reference
    return bool(re.findall(pattern, value.lower(), flags=re.MULTILINE))


def number_bullet_lists(value: str, *, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", value, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", value, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def constrained_response(value: str) -> bool:
    value = value.strip()
    return any(option in value for option in CONSTRAINED_RESPONSES)


def number_highlighted_sections(value: str, *, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", value) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", value) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= num_highlights


def multiple_sections(value: str, *, section_spliter: str, num_sections: int) -> bool:
    sections = re.split(r"\s?" + section_spliter.strip() + r"\s?\d+\s?", value)
    return len(sections) - 1 >= num_sections


def json_format(value: str) -> bool:
    value = (
        value.strip()
        .removeprefix("```json")
        .removeprefix("```Json")
        .removeprefix("```JSON")
        .removeprefix("```")
        .removesuffix("```")
        .strip()
    )
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def title(value: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", value))


# ---- combination, start/end, case, punctuation ------------------------------------------------


def two_responses(value: str) -> bool:
    parts = value.split("******")
    valid = []
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def repeat_prompt(value: str, *, prompt_to_repeat: str) -> bool:
    return value.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(value: str, *, end_phrase: str) -> bool:
    return value.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def start_checker(value: str, *, start_phrase: str) -> bool:
    """Ours (paper T16): the mirror of `end_checker`."""
    return value.strip().strip('"').lower().startswith(start_phrase.strip().lower())


def quotation(value: str) -> bool:
    value = value.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


def capital_word_frequency(value: str, *, capital_frequency: int, capital_relation: str) -> bool:
    capitals = sum(1 for word in text.word_tokenize(value) if word.isupper())
    return _compare(capitals, capital_relation, capital_frequency)


def _english_and(value: str, case_ok: bool) -> bool:
    try:
        return case_ok and text.detect_language(value) == "en"
    except text.LanguageUndetectable:
        return True  # as the reference


def english_capital(value: str) -> bool:
    return _english_and(value, value.isupper())


def english_lowercase(value: str) -> bool:
    return _english_and(value, value.islower())


def no_comma(value: str) -> bool:
    return not re.search(r"\,", value)


def _i(id_: str, check: Callable[..., bool], template: str) -> Instruction:
    params = inspect.signature(check).parameters.values()
    return Instruction(id_, tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY), check, template)


INSTRUCTIONS: dict[str, Instruction] = {
    i.id: i
    for i in [
        _i("keywords:existence", keywords_existence, "Include keywords {keywords} in the response."),
        _i(
            "keywords:frequency",
            keywords_frequency,
            "In your response, the word {keyword} should appear {relation} {frequency} times.",
        ),
        _i(
            "keywords:forbidden_words", keywords_forbidden, "Do not include keywords {forbidden_words} in the response."
        ),
        _i(
            "keywords:letter_frequency",
            keywords_letter_frequency,
            "In your response, the letter {letter} should appear {let_relation} {let_frequency} times.",
        ),
        _i(
            "language:response_language",
            response_language,
            "Your ENTIRE response should be in {language} language, no other language is allowed.",
        ),
        _i(
            "length_constraints:number_sentences",
            number_sentences,
            "Your response should contain {relation} {num_sentences} sentences.",
        ),
        _i(
            "length_constraints:number_paragraphs",
            number_paragraphs,
            "There should be {num_paragraphs} paragraphs. Paragraphs are separated with the markdown divider: ***",
        ),
        _i("length_constraints:number_words", number_words, "Answer with {relation} {num_words} words."),
        _i(
            "length_constraints:nth_paragraph_first_word",
            nth_paragraph_first_word,
            "There should be {num_paragraphs} paragraphs. Paragraphs and only paragraphs are separated with each "
            "other by two new lines as if it was '\\n\\n' in python. Paragraph {nth_paragraph} must start with "
            "word {first_word}.",
        ),
        _i(
            "detectable_content:number_placeholders",
            number_placeholders,
            "The response must contain at least {num_placeholders} placeholders represented by square brackets, "
            "such as [address].",
        ),
        _i(
            "detectable_content:postscript",
            postscript,
            "At the end of your response, please explicitly add a postscript starting with {postscript_marker}",
        ),
        _i(
            "detectable_format:number_bullet_lists",
            number_bullet_lists,
            "Your answer must contain exactly {num_bullets} bullet points. Use the markdown bullet points such "
            "as:\n* This is point 1. \n* This is point 2",
        ),
        _i(
            "detectable_format:constrained_response",
            constrained_response,
            "Answer with one of the following options: {options}",
        ),
        _i(
            "detectable_format:number_highlighted_sections",
            number_highlighted_sections,
            "Highlight at least {num_highlights} sections in your answer with markdown, i.e. *highlighted section*.",
        ),
        _i(
            "detectable_format:multiple_sections",
            multiple_sections,
            "Your response must have {num_sections} sections. Mark the beginning of each section with "
            "{section_spliter} X, such as:\n{section_spliter} 1\n[content of section 1]\n{section_spliter} 2\n"
            "[content of section 2]",
        ),
        _i(
            "detectable_format:json_format",
            json_format,
            "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
        ),
        _i(
            "detectable_format:title",
            title,
            "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
        ),
        _i(
            "combination:two_responses",
            two_responses,
            "Give two different responses. Responses and only responses should be separated by 6 asterisk "
            "symbols: ******.",
        ),
        _i(
            "combination:repeat_prompt",
            repeat_prompt,
            "First repeat the request word for word without change, then give your answer (1. do not say any "
            "words or characters before repeating the request; 2. the request you need to repeat does not "
            "include this sentence)",
        ),
        _i(
            "startend:end_checker",
            end_checker,
            "Finish your response with this exact phrase {end_phrase}. No other words should follow this phrase.",
        ),
        _i("startend:start_checker", start_checker, "Start your response with the exact phrase {start_phrase}."),
        _i("startend:quotation", quotation, "Wrap your entire response with double quotation marks."),
        _i(
            "change_case:capital_word_frequency",
            capital_word_frequency,
            "In your response, words with all capital letters should appear {capital_relation} "
            "{capital_frequency} times.",
        ),
        _i(
            "change_case:english_capital",
            english_capital,
            "Your entire response should be in English, and in all capital letters.",
        ),
        _i(
            "change_case:english_lowercase",
            english_lowercase,
            "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.",
        ),
        _i("punctuation:no_comma", no_comma, "In your entire response, refrain from the use of any commas."),
    ]
}

IFEVAL_IDS = tuple(i for i in INSTRUCTIONS if i != "startend:start_checker")  # the reference's 25
