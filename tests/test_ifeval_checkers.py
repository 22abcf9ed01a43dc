"""Checker edge cases, each from the IFEval reference's semantics."""

import pytest

from unclutter import ifeval
from unclutter.ifeval import text

F = ifeval.follows


@pytest.mark.parametrize(
    "response, ok",
    [
        ('```json\n{"a": 1}\n```', True),
        ('```JSON\n{"a": 1}\n```', True),
        ('```Json{"a": 1}```', True),
        ("```\n[1, 2]\n```", True),
        ('  {"a": [1, 2]}  ', True),
        ("{a: 1}", False),
        ('Here is JSON: {"a": 1}', False),
        ('```json\n{"a": 1}\n``` trailing', False),
    ],
)
def test_json_fences(response, ok):
    assert F("detectable_format:json_format", {}, response) is ok


@pytest.mark.parametrize(
    "response, n",
    [
        ("* one\n* two", 2),
        ("- one\n--- two", 2),  # any line starting with '-' counts, '---' too
        ("* one\n**bold** line\n- three", 2),  # '**' does not start a bullet
        ("  * indented\n*\n- x", 3),  # reference quirk: '[^*]' matches the newline, so '*\n- x' is a star bullet too
        ("text - not at start\n* a", 1),
    ],
)
def test_bullets(response, n):
    assert F("detectable_format:number_bullet_lists", {"num_bullets": n}, response)
    assert not F("detectable_format:number_bullet_lists", {"num_bullets": n + 1}, response)


@pytest.mark.parametrize(
    "marker, response, ok",
    [
        ("P.S.", "Answer.\nP.S. remember", True),
        ("P.S.", "Answer. p.s. mid-line counts", True),
        ("P.S.", "Answer. ps without dots", False),
        ("P.P.S", "Answer.\nP. P. S. later", True),
        ("P.P.S", "Answer.\nP.S. only", False),
        ("Note:", "Answer.\nnote: x", True),
    ],
)
def test_postscript(marker, response, ok):
    assert F("detectable_content:postscript", {"postscript_marker": marker}, response) is ok


def test_title():
    assert F("detectable_format:title", {}, "<<A Title>>\nbody")
    assert not F("detectable_format:title", {}, "<< >>\n<<>>")
    assert F("detectable_format:title", {}, "<< >> and <<>>")  # greedy: '<< >> and <<>>' is one non-empty title
    assert not F("detectable_format:title", {}, "<<split\ntitle>>")


def test_highlights_count_single_and_double():
    # '*a*' and '**b**' both count; the empty '**' matches of the single pattern do not.
    assert F("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and **b**")
    assert not F("detectable_format:number_highlighted_sections", {"num_highlights": 3}, "*a* and **b**")
    assert not F("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "* *\n**  **")


@pytest.mark.parametrize(
    "response, ok",
    [
        ("first ****** second", True),
        ("****** first ****** second ******", True),
        ("same ****** same", False),
        ("a ****** ****** b", False),  # an empty response in the middle
        ("only one", False),
        ("a ****** b ****** c", False),
    ],
)
def test_two_responses(response, ok):
    assert F("combination:two_responses", {}, response) is ok


@pytest.mark.parametrize(
    "response, n",
    [("a *** b *** c", 3), ("*** a *** b", 2), ("a***b", 2), ("one paragraph", 1)],
)
def test_paragraphs(response, n):
    assert F("length_constraints:number_paragraphs", {"num_paragraphs": n}, response)


def test_paragraphs_empty_middle_fails():
    assert not F("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "a *** *** b")


def test_nth_paragraph_first_word():
    kw = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Second"}
    assert F("length_constraints:nth_paragraph_first_word", kw, 'First.\n\n"Second, then more')
    assert not F("length_constraints:nth_paragraph_first_word", kw, "First.\n\nThird word")
    assert not F("length_constraints:nth_paragraph_first_word", kw, "Only one paragraph")


def test_sections():
    kw = {"section_spliter": "Section", "num_sections": 2}
    assert F("detectable_format:multiple_sections", kw, "Section 1\nfoo\nSection 2\nbar")
    assert not F("detectable_format:multiple_sections", kw, "Section 1\nfoo\nSection two")


def test_sentences_use_punkt_abbreviations():
    assert text.count_sentences("Dr. Smith arrived at 5 p.m. today. He sat down. Was it Mr. Jones?") == 3
    kw = {"num_sentences": 3, "relation": "less than"}
    assert F("length_constraints:number_sentences", kw, "Dr. Smith came. He left.")
    assert not F("length_constraints:number_sentences", kw, "One. Two. Three.")


@pytest.mark.parametrize(
    "response",
    [
        "The U.S. economy grew by 3.5% in Q2, e.g. in services. Prices rose... Then they fell!",
        "# Title\n\n* First point. Still first.\n* Second point\n\n1. Step one. 2. Step two.",
        '"Is it over?" she asked. "Yes." He left at approx. 10 a.m. on Jan. 5th.',
        "P.S. Thanks for reading!!! See you soon?! Bye.",
        "<<My poem>>\nRoses are red,\nviolets are blue.\n\nSugar is sweet; and so are you.",
        "Section 1\nThe end of the i.e. clause. Mt. Everest is tall. St. Louis too.",
        "No punctuation at all here",
        "",
    ],
)
def test_sentence_counts_agree_with_independent_punkt(response):
    """Shapes of GPT-4-style answers; all 541 published responses are compared in tests_published/."""
    import punkt

    assert text.count_sentences(response) == len(punkt.sent_tokenize(response))


def test_words_and_capitals():
    assert text.count_words("Hello, world! It's 2024.") == 5  # \w+: Hello world It s 2024
    kw = {"capital_frequency": 3, "capital_relation": "at least"}
    assert F("change_case:capital_word_frequency", kw, "I LOVE NLP.")
    assert not F("change_case:capital_word_frequency", kw, "I love NLP.")


def test_case_and_language():
    assert F("change_case:english_lowercase", {}, "this answer is written in plain english words")
    assert not F("change_case:english_lowercase", {}, "This answer has a capital letter")
    assert F("change_case:english_capital", {}, "THIS ANSWER IS WRITTEN IN CAPITAL LETTERS ONLY")
    assert not F("change_case:english_capital", {}, "ESTA RESPUESTA ESTA ESCRITA EN ESPANOL Y NO EN INGLES")
    assert F("language:response_language", {"language": "de"}, "Das ist eine Antwort auf Deutsch, sehr gut.")
    assert not F("language:response_language", {"language": "de"}, "This is clearly an English answer.")
    # langdetect raises on text without letters: the reference counts that as followed
    assert F("language:response_language", {"language": "fr"}, "1234 !!! 5678")
    assert not F("change_case:english_capital", {}, "1234 !!! 5678")  # isupper() is False: no detection


def test_keywords():
    assert F("keywords:existence", {"keywords": ["red", "circle"]}, "A RED Circle.")
    assert not F("keywords:existence", {"keywords": ["red", "square"]}, "A red circle.")
    assert F("keywords:forbidden_words", {"forbidden_words": ["red"]}, "a reddish circle")
    assert not F("keywords:forbidden_words", {"forbidden_words": ["red"]}, "a Red circle")
    kw = {"keyword": "cat", "frequency": 2, "relation": "at least"}
    assert F("keywords:frequency", kw, "cat catalog")  # substring matches count, as the reference
    assert not F("keywords:frequency", {**kw, "relation": "less than"}, "cat cat")


def test_letter_frequency_and_invalid_letter():
    kw = {"letter": "A", "let_frequency": 3, "let_relation": "at least"}
    assert F("keywords:letter_frequency", kw, "banana")
    assert not F("keywords:letter_frequency", {**kw, "let_relation": "less than"}, "banana")
    bad = {"letter": "#", "let_frequency": 2, "let_relation": "at least"}  # becomes 'e'
    assert F("keywords:letter_frequency", bad, "eee") and not F("keywords:letter_frequency", bad, "###")
    assert "letter e" in ifeval.describe("keywords:letter_frequency", bad)


def test_misc_checkers():
    assert F("punctuation:no_comma", {}, "no commas here") and not F("punctuation:no_comma", {}, "a, b")
    assert F("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [place]")
    assert not F("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] only")
    assert F("startend:quotation", {}, ' "quoted" ') and not F("startend:quotation", {}, '"')
    assert F("detectable_format:constrained_response", {}, "Well. My answer is no.")
    assert F("startend:end_checker", {"end_phrase": "Any other questions?"}, '"That is it. any other questions?"')
    assert not F("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Yes.")
    assert F("startend:start_checker", {"start_phrase": "My answer is"}, ' "my answer is red."')
    assert not F("startend:start_checker", {"start_phrase": "My answer is"}, "Well, my answer is red.")
    assert F("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!")
    assert F("combination:repeat_prompt", {}, "Say hi. Hi!", prompt="Say hi.")


def test_strict_fails_empty_and_loose_variants():
    assert not F("punctuation:no_comma", {}, "   ")
    response = "Sure, here it is:\nno commas in the answer"
    assert not F("punctuation:no_comma", {}, response)
    assert F("punctuation:no_comma", {}, response, loose=True)  # first line dropped
    assert F("detectable_format:title", {}, "**<<T>>**", loose=True)
    assert len(ifeval.loose_variants("a\nb\nc")) == 8


def test_bad_ids_and_kwargs():
    with pytest.raises(ValueError, match="unknown instruction id"):
        F("nope:nothing", {}, "x")
    with pytest.raises(ValueError, match="unexpected kwargs"):
        F("punctuation:no_comma", {"num_words": 3}, "x")
    with pytest.raises(ValueError, match="needs kwargs"):
        F("length_constraints:number_words", {"relation": "at least"}, "x")
    with pytest.raises(ValueError, match="relation must be"):
        F("length_constraints:number_words", {"relation": "more than", "num_words": 2}, "x y z")
    # lm-eval style kwargs with every key present as null are accepted
    assert F("punctuation:no_comma", {"num_words": None, "relation": None}, "x")
    # containers of the wrong type are named, not an AttributeError / unhashable TypeError from inside
    with pytest.raises(ValueError, match=r"punctuation:no_comma: kwargs must be an object .* got 'x'"):
        F("punctuation:no_comma", "x", "y")
    with pytest.raises(ValueError, match=r"an instruction id is a string .* got \['punctuation:no_comma'\]"):
        F(["punctuation:no_comma"], {}, "y")


def test_all_26_instructions_described():
    assert len(ifeval.IFEVAL_IDS) == 25 and len(ifeval.INSTRUCTIONS) == 26
    sample = {
        "keywords": ["a"], "keyword": "a", "frequency": 1, "relation": "at least", "forbidden_words": ["b"],
        "letter": "q", "let_frequency": 1, "let_relation": "less than", "language": "fr", "num_sentences": 2,
        "num_paragraphs": 2, "num_words": 9, "nth_paragraph": 1, "first_word": "hi", "num_placeholders": 1,
        "postscript_marker": "P.S.", "num_bullets": 3, "num_highlights": 2, "section_spliter": "Section",
        "num_sections": 2, "prompt_to_repeat": "x", "end_phrase": "Bye.", "start_phrase": "Hi",
        "capital_frequency": 2, "capital_relation": "at least",
    }  # fmt: skip
    for iid, inst in ifeval.INSTRUCTIONS.items():
        sentence = ifeval.describe(iid, {k: sample[k] for k in inst.args})
        assert sentence and "{" not in sentence.replace("{'", "").replace('{"', "")
    assert "French language" in ifeval.describe("language:response_language", {"language": "fr"})
    # the reference's build_description sorts keywords, and sorts and deduplicates forbidden words
    assert ifeval.describe("keywords:existence", {"keywords": ["image", "background"]}) == (
        "Include keywords ['background', 'image'] in the response."
    )
    assert "['field', 'issue', 'thanks']" in ifeval.describe(
        "keywords:forbidden_words", {"forbidden_words": ["field", "thanks", "issue", "field"]}
    )
