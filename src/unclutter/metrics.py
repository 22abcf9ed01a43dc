"""Benchmark metrics, computed as lmms-eval computes them (tests/test_metrics.py checks against its own code).

- `vqa_accuracy`: VQAv2 / TextVQA accuracy. Each human answer is left out in turn, the prediction scores
  ``min(#matches among the others / 3, 1)``, and the scores are averaged. TextVQA normalises with the whole
  EvalAI answer processor (`normalize_vqa_answer`); lmms-eval's VQAv2 scoring skips its first step
  (`normalize_vqav2_answer`).
- `gqa_match`: lmms-eval's generic exact match with ignore_case and ignore_punctuation.
- `mme_scores`: Otter's yes/no parsing, per-image acc and acc+ (both questions of an image right), category
  score = acc + acc+, perception (10 categories) and cognition (every other category) totals.
- `mmbench_choice` / `circular_accuracy`: lmms-eval's judge-free ("static") MMBench option extraction;
  CircularEval counts a question right only if every rotation of its options is answered right.
"""

from __future__ import annotations

import math
import re
import statistics
import string
from collections.abc import Iterable, Mapping, Sequence

# ---- VQA (EvalAI answer processor) ------------------------------------------------------------

_CONTRACTIONS_TEXT = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't|havent haven't
hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm
Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't
notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't
shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've
shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've|somebody'dve somebody'd've
somebodyll somebody'll|somebodys somebody's|someoned someone'd|someoned've someone'd've|someone'dve someone'd've
someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd|thered've there'd've
there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've
theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's
whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll
whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've
yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've
youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(
    pair.split(" ") for line in _CONTRACTIONS_TEXT.strip().splitlines() for pair in line.split("|") if pair
)
NUMBER_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATION = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The processor passes re.UNICODE (32) where `sub` takes `count`: at most 32 periods go.
    return _PERIOD_STRIP.sub("", out, 32)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(answer: str) -> str:
    """The whole EvalAI answer processor; lmms-eval's TextVQA scoring applies it to prediction and answers."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def normalize_vqav2_answer(answer: str) -> str:
    """What lmms-eval's VQAv2 scoring applies (as the official VQA evaluation does): tabs and newlines become
    spaces, then only the processor's punctuation and digit/article/contraction steps. Unlike TextVQA there is no
    lowercasing first, no deletion of ',' and '?' and no "'s" split: "red,white" -> "red white", "man's" stays."""
    return _process_digit_article(_process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, bench: str = "vqav2") -> float:
    """VQA accuracy in [0, 1] of one prediction against the human answers (usually 10), as lmms-eval's
    ``vqav2`` / ``textvqa`` process_results score it (``bench`` picks the normalisation). lmms-eval's VQAv2 drops
    answer records equal to the left-out one; the dataset's records carry distinct answer ids, so that is one each."""
    normalizers = {"vqav2": normalize_vqav2_answer, "textvqa": normalize_vqa_answer}
    if bench not in normalizers:
        raise ValueError(f"vqa_accuracy scores bench 'vqav2' or 'textvqa', got {bench!r}.")
    normalize = normalizers[bench]
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer.")
    pred = normalize(prediction)
    gts = [normalize(a) for a in answers]
    matches = [sum(g == pred for j, g in enumerate(gts) if j != i) for i in range(len(gts))]
    return float(statistics.mean(min(1.0, m / 3) for m in matches))  # exact mean, as lmms-eval


# ---- GQA --------------------------------------------------------------------------------------

_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_gqa_answer(answer: str) -> str:
    """lmms-eval's GQA metric (HF evaluate's exact_match, ignore_case + ignore_punctuation) on one string:
    lowercase, delete ASCII punctuation anywhere. Its numpy arrays add two quirks kept here: a lowercase that grows
    (only 'İ' does) is cut back to the string's length, and trailing NUL characters vanish."""
    return answer.lower()[: len(answer)].translate(_DROP_PUNCTUATION).rstrip("\x00")


def gqa_match(prediction: str, answer: str) -> bool:
    """GQA exact match; the harness strips the generation (not the reference) before the metric."""
    return normalize_gqa_answer(prediction.strip()) == normalize_gqa_answer(answer)


# ---- MME --------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no(prediction: str) -> str:
    """'yes', 'no' or 'other', as lmms-eval's MME parser (Otter's). After lowercasing, stripping and deleting every
    '.': the exact word; a lone 'y' / 'n'; else 'yes' (checked first) or 'no' anywhere in the first 4 characters.
    So "Yesterday" and "eyes" are yes, "nope", "not sure" and "a no" are no, "The answer is yes" is other."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME scores from records with ``question_id`` (the image id), ``category``, ``answer``, ``prediction``.

    Returns {"perception", "cognition", "total", "categories": {cat: {"acc", "acc_plus", "score"}}}, acc and
    acc_plus in percent. As lmms-eval: per image acc = % right, acc+ = 100 if both right; category score = mean over
    its images of acc + acc+ (max 200); perception sums the 10 perception categories, cognition every other one.
    lmms-eval refuses images without exactly 2 questions; here acc+ is then 100 when all are right.
    """
    per_cat: dict = {}  # category -> image -> [1.0 right / 0.0 wrong], in order of first appearance
    for r in records:
        answer = str(r["answer"]).lower().strip().replace(".", "")
        if answer not in ("yes", "no"):
            raise ValueError(f"MME answers are yes or no, got {r['answer']!r}.")
        right = 1.0 if parse_yes_no(str(r["prediction"])) == answer else 0.0
        per_cat.setdefault(r["category"], {}).setdefault(r["question_id"], []).append(right)
    categories, perception, cognition = {}, 0, 0
    for cat, images in per_cat.items():
        accs = [sum(s) / len(s) * 100.0 for s in images.values()]
        pluses = [100.0 * all(s) for s in images.values()]
        score = sum(p + a for p, a in zip(pluses, accs, strict=True)) / len(images)  # lmms-eval's float order
        categories[cat] = {"acc": sum(accs) / len(images), "acc_plus": sum(pluses) / len(images), "score": score}
        if cat in MME_PERCEPTION:
            perception += score
        else:
            cognition += score
    return {
        "perception": perception, "cognition": cognition, "total": perception + cognition,
        "categories": dict(sorted(categories.items())),
    }  # fmt: skip


# ---- MMBench ----------------------------------------------------------------------------------

_WRAPPED_LETTER = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                   (":", ","), (":", "."), (":", ")"), (":", ")."))  # fmt: skip
_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip
_LETTER_FORMS = ((6, "({})"), (5, "{}."), (4, "{}:"), (3, "{})"), (2, "{} "))  # (priority, form)


def _missing(text: object) -> bool:
    return text is None or (isinstance(text, float) and math.isnan(text))


def _letter_alone(answer: str) -> str | None:
    """lmms-eval's first rule: exactly one of A-E as a whitespace-separated token (unless it is "A" in a text of
    more than 3 tokens, maybe the article), else exactly one in one wrapping ("B.", "(C)", ":D", ...), tried in turn."""
    if "Failed to obtain answer via API" in answer:  # lmms-eval's marker of a failed judge call
        return None
    tokens = answer.split()
    alone = [c for c in "ABCDE" if c in tokens]
    if len(alone) == 1 and not (alone == ["A"] and len(tokens) > 3):
        return alone[0]
    for before, after in _WRAPPED_LETTER:
        wrapped = [c for c in "ABCDE" if before + c + after in tokens]
        if len(wrapped) == 1:
            return wrapped[0]
    return None


def _option_text(answer: str, choices: Mapping[str, object]) -> str | None:
    """lmms-eval's second rule: exactly one option text (lowercased) occurs in the lowercased answer."""
    hits = [k for k, text in choices.items() if str(text).lower() in answer.lower()]
    return hits[0] if len(hits) == 1 else None


def _extract_letter(answer: str, letters: Sequence[str]) -> str | None:
    """lmms-eval's static fallback (``extract_mcq_answer``): candidate letters found in several forms, the best
    form winning and, within it, the latest position; a bare letter anywhere only when no form matched."""
    if not answer.strip():
        return None
    letters = list(letters) or list("ABCDEFGH")
    text = answer.strip()
    for mark in ",.!?;:'\"":
        text = text.strip(mark)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter)
    for priority, form in _LETTER_FORMS:
        found += [(priority, text.rfind(form.format(c)), c) for c in letters if form.format(c) in text]
    lowered = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lowered.find(phrase)
        if at != -1:
            found += [(7, pos, c) for c in letters if (pos := text.find(c, at + len(phrase))) != -1]
    core = text.strip()
    found += [(10, 0, c) for c in letters if core.startswith(c) and (len(core) == 1 or not core[1].isalpha())]
    found += [(9, len(text) - 1, c) for c in letters if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha())]
    if not found:
        found = [(0, text.rfind(c), c) for c in letters if c in text]
    return max(found, key=lambda f: f[:2])[2] if found else None  # max keeps the first of equals, as lmms-eval's sort


def mmbench_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter lmms-eval's judge-free MMBench evaluation (``mmbench_en_dev_static``) reads from an answer,
    or None. On the stripped answer: a letter standing alone or wrapped (`_letter_alone`, letters A-E whatever the
    options); else exactly one option text inside it (`_option_text`, options A-D); else the static extractor
    (`_extract_letter`), which falls back to any capital option letter in the text. The GPT-judged mode runs the same
    first two rules and asks the judge where they fail. Missing options are None or NaN, as in lmms-eval's frame.
    """
    answer = prediction.strip()
    choices = {k: options[k] for k in "ABCD" if k in options and not _missing(options[k])}
    return _letter_alone(answer) or _option_text(answer, choices) or _extract_letter(answer, sorted(choices))


def rotate_options(options: Mapping[str, str], answer: str, shift: int) -> tuple[dict[str, str], str]:
    """Options moved ``shift`` places (CircularEval); returns (new options, new answer letter)."""
    letters = [k for k in sorted(options) if options[k] is not None and str(options[k]).strip()]
    texts = [options[k] for k in letters]
    n = len(letters)
    rotated = {letters[i]: texts[(i + shift) % n] for i in range(n)}
    new_answer = letters[(letters.index(answer) - shift) % n]
    return rotated, new_answer


def circular_accuracy(results: Iterable[tuple[str, bool]]) -> float:
    """Fraction of groups (question ids) whose every rotation is right; ``results`` = (group, correct)."""
    groups: dict[str, bool] = {}
    for group, ok in results:
        groups[group] = groups.get(group, True) and ok
    return sum(groups.values()) / len(groups) if groups else 0.0
