"""Benchmark metrics, from the official definitions (as lmms-eval computes them).

- `vqa_accuracy`: VQAv2 / TextVQA accuracy. Prediction and the 10 human answers are normalised like
  the EvalAI answer processor; each human answer is left out in turn, the prediction scores
  ``min(#matches among the other 9 / 3, 1)``, and the 10 scores are averaged.
- `gqa_match`: exact match after LLaVA's GQA normalisation (strip, trailing '.', lowercase).
- `mme_scores`: yes/no parsing, per-category acc and acc+ (both questions of an image right), category
  score = 100 * (acc + acc+), perception (10 categories) and cognition (4 categories) totals.
- `mmbench_choice` / `circular_accuracy`: option extraction without an LLM judge; CircularEval
  counts a question right only if every rotation of its options is answered right.
"""

from __future__ import annotations

import re
from collections import defaultdict
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
    """The EvalAI answer processor (used by the VQAv2 / TextVQA evaluation servers and lmms-eval)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1] of one prediction against the human answers (usually 10)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer.")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(scores) / len(scores)


# ---- GQA --------------------------------------------------------------------------------------


def normalize_gqa_answer(answer: str) -> str:
    return answer.strip().rstrip(".").strip().lower()


def gqa_match(prediction: str, answer: str) -> bool:
    return normalize_gqa_answer(prediction) == normalize_gqa_answer(answer)


# ---- MME --------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_yes_no(prediction: str) -> str:
    """'yes', 'no' or 'other', as lmms-eval's MME parser (exact word, else within the first 4 chars)."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping]) -> dict:
    """MME scores from records with ``question_id`` (the image id), ``category``, ``answer``, ``prediction``.

    Returns {"perception", "cognition", "total", "categories": {cat: {"acc", "acc_plus", "score"}}};
    acc and acc_plus in percent, score = acc + acc_plus (max 200 per category).
    """
    per_cat: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        ok = parse_yes_no(str(r["prediction"])) == str(r["answer"]).strip().lower()
        per_cat[r["category"]][str(r["question_id"])].append(ok)
    categories = {}
    for cat, images in sorted(per_cat.items()):
        answers = [ok for oks in images.values() for ok in oks]
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(all(oks) for oks in images.values()) / len(images)
        categories[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(v["score"] for k, v in categories.items() if k in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in categories.items() if k in MME_COGNITION)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition, "categories": categories}


# ---- MMBench ----------------------------------------------------------------------------------


def mmbench_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form answer picks, or None when it cannot be told without a judge.

    In order: exactly one option letter standing alone in the text ("B", "(B) ...", "The answer is B.");
    else exactly one option whose text appears in the answer; anything else ("A or B") is unanswered.
    """
    letters = [k for k in options if options[k] is not None and str(options[k]).strip()]
    text = prediction.strip()
    alone = {c for c in re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text) if c in letters}
    if len(alone) == 1:
        return alone.pop()
    if alone:
        return None
    lowered = text.lower()
    hits = [k for k in letters if str(options[k]).strip().lower() in lowered]
    return hits[0] if len(hits) == 1 else None


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
