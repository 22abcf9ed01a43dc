"""The shapes world's language: questions with ground-truth answers, captions, and instruction-following
answers built to satisfy IFEval's checkers exactly.

A question has a short answer (for VQA-style scoring) and a one-sentence answer (the base that the
instruction answers are built from). No template contains a comma, so "no commas" holds by construction.

Counts name the attribute as an adjective ("How many square shapes are there?", like "How many red
shapes are there?"), never as a plural noun: a tokenizer trained on this world would make "squares" a
token of its own, seen only in count questions. (That was a suspect for the shipped models' weak count
by shape; the rephrasing did not fix it: see the model card, run L.)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from ..ifeval import describe, follows
from ..ifeval.suite import TASKS, _draw
from .world import COLORS, NUMBER_WORDS, SHAPES, Scene

QUESTION_TYPES = ("color", "shape", "count", "exist", "position")


@dataclass(frozen=True)
class QA:
    kind: str  # one of QUESTION_TYPES
    question: str
    short: str  # the VQA answer
    sentence: str  # the same fact as a sentence


def _count_sentence(n: int, what: str) -> str:
    """``what`` ends in "shape" ("red shape", "square shape"), so its plural is always "shapes"."""
    if n == 1:
        return f"There is one {what}."
    return f"There are {NUMBER_WORDS[n]} {what}s." if n else f"There are no {what}s."


def _unique(objs, attr: str, values, rng: random.Random):
    """An object picked by a value of ``attr`` that exactly one object has (None if no value is unique)."""
    unique = [v for v in values if sum(getattr(o, attr) == v for o in objs) == 1]
    if not unique:
        return None
    pick = rng.choice(unique)
    return next(o for o in objs if getattr(o, attr) == pick)


def ask(scene: Scene, kind: str, rng: random.Random, count_mix: tuple[float, float, float] = (1, 1, 1)) -> QA:
    """One question of ``kind`` with an unambiguous answer for ``scene``; counts are of all shapes, of a
    colour or of a shape in the proportions ``count_mix``."""
    objs = scene.objects
    if kind == "color":
        o = _unique(objs, "shape", SHAPES, rng)
        if o is not None:
            return QA(kind, f"What color is the {o.shape}?", o.color, f"The {o.shape} is {o.color}.")
        kind = "count"
    if kind == "shape":
        o = _unique(objs, "color", COLORS, rng)
        if o is not None:
            return QA(kind, f"What shape is the {o.color} object?", o.shape, f"The {o.color} object is a {o.shape}.")
        kind = "count"
    if kind == "count":
        mode = rng.choices(("all", "color", "shape"), weights=count_mix)[0]
        if mode == "all":
            n = len(objs)
            return QA(kind, "How many shapes are there?", str(n), _count_sentence(n, "shape"))
        if mode == "color":
            c = rng.choice([o.color for o in objs] + list(COLORS))
            n = sum(o.color == c for o in objs)
            return QA(kind, f"How many {c} shapes are there?", str(n), _count_sentence(n, f"{c} shape"))
        s = rng.choice([o.shape for o in objs] + list(SHAPES))
        n = sum(o.shape == s for o in objs)
        return QA(kind, f"How many {s} shapes are there?", str(n), _count_sentence(n, f"{s} shape"))
    if kind == "exist":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, s = rng.choice(sorted(present))
        else:
            near = [(o.color, s) for o in objs for s in SHAPES] + [(c, o.shape) for o in objs for c in COLORS]
            absent = [p for p in near if p not in present]
            c, s = rng.choice(absent)
        q = f"Is there a {c} {s}?"
        if (c, s) in present:
            return QA(kind, q, "yes", f"Yes there is a {c} {s}.")
        return QA(kind, q, "no", f"No there is no {c} {s}.")
    if kind == "position":
        o = rng.choice(objs)
        return QA(kind, f"Where is the {o.name}?", o.position, f"The {o.name} is at the {o.position}.")
    raise ValueError(f"unknown question type {kind!r}; choose from {QUESTION_TYPES}.")


def facts(scene: Scene) -> list[str]:
    """Sentences true of the scene (for bullets, sections, highlights and longer answers)."""
    out = [_count_sentence(len(scene.objects), "shape")]
    out += [f"The {o.name} is at the {o.position}." for o in scene.objects]
    out += ["The background is textured.", "The shapes are easy to see."]
    return out


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A stage-1 caption: the count, then every object, in one of three forms (a third each when ``rng`` is
    given; reading order, position first, without it).

    - Position first in reading order ("Top left: a red square."): every colour and shape word is a direct
      read-out of a cell's patches, the strongest signal for a from-scratch ViT.
    - Object first in shuffled order ("The red square is at the top left."): every position is a lookup of
      the object just named, the skill "where is ..." and "is there ..." questions need among several objects.
    - A terse list, shape first, in shuffled order ("square red top left, circle blue center."): the colour
      after a shape word is a lookup by shape, which "What color is the square?", "Is there a red star?" and
      counts of one shape need and the other two forms never ask for (colour is the easier cue to learn).
    """
    n = len(scene.objects)
    head = "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."
    form = rng.random() if rng is not None else 0.0
    if form < 1 / 3:
        return " ".join([head, *(f"{o.position.capitalize()}: a {o.name}." for o in scene.objects)])
    objs = rng.sample(scene.objects, n)
    if form < 2 / 3:
        return " ".join([head, *(f"The {o.name} is at the {o.position}." for o in objs)])
    return f"{head} {', '.join(f'{o.shape} {o.color} {o.position}' for o in objs)}."


DESCRIBE_PROMPTS = (  # LLaVA's detailed-description requests, a few phrasings
    "Describe the image in detail.",
    "What do you see in this image? Describe it in detail.",
    "Give a detailed description of the image.",
)


def description(scene: Scene) -> str:
    """A detailed description: the count, every object with its cell in reading order, and the background.

    Complete by construction (every question about the scene can be answered from it), so it is also the
    ground-truth text the LLM's own ceiling is measured with, and what describe-then-answer should produce.
    """
    n = len(scene.objects)
    head = "There is one shape" if n == 1 else f"There are {NUMBER_WORDS[n]} shapes"
    body = " ".join(f"A {o.name} is at the {o.position}." for o in scene.objects)
    return f"{head} on a textured background. {body} Nothing else is in the image."


_PLACEHOLDERS = ("[location]", "[name]", "[date]")
_TITLE = "<<About the Image>>"


def instructed_answer(task: str, kwargs: dict, qa: QA, scene: Scene, more: int = 0) -> str:
    """An answer to ``qa`` that follows the suite task ``task`` with ``kwargs`` (checked by the caller).

    ``more`` adds that many scene facts to the case tasks: IFEval's case checkers also ask langdetect
    for English, which short all-caps sentences can fail.
    """
    base = qa.sentence
    extra = [f for f in facts(scene) if f != base]
    if task == "T1":
        return f"{base} {extra[0]}"
    if task == "T2":
        return " ".join([base, *extra[:more]]).lower()
    if task == "T3":
        return " ".join([base, *extra[:more]]).upper()
    if task == "T4":
        return f"{base} Fill in {' and '.join(_PLACEHOLDERS[: kwargs['num_placeholders']])}."
    if task == "T5":
        return f"{base}\n\n{kwargs['postscript_marker']} I hope this helps."
    if task == "T6":
        return f"{_TITLE}\n\n{base}"
    if task == "T7":
        return f"{base} This answer mentions {' and '.join(kwargs['keywords'])}."
    if task == "T8":
        return " ".join(f"*{s}*" for s in [base, *extra][: kwargs["num_highlights"]])
    if task == "T9":
        return json.dumps({"answer": qa.short})
    if task == "T10":
        parts = [base, *extra][: kwargs["num_sections"]]
        return "\n\n".join(f"{kwargs['section_spliter']} {i + 1}\n{s}" for i, s in enumerate(parts))
    if task == "T11":
        return "\n".join(f"* {s}" for s in [base, *extra][: kwargs["num_bullets"]])
    if task == "T12":
        n = kwargs["num_sentences"] - 1 if kwargs["relation"] == "less than" else kwargs["num_sentences"]
        return " ".join([base, *extra][: max(n, 1)])
    if task == "T13":
        if kwargs["relation"] == "less than":
            return base
        sentences = [base]
        for s in extra * 4:
            if len(" ".join(sentences).split()) >= kwargs["num_words"]:
                break
            sentences.append(s)
        return " ".join(sentences)
    if task == "T14":
        return f"{base}\n******\n{qa.short.capitalize()}."
    if task == "T15":
        return f"{base} {kwargs['end_phrase']}"
    if task == "T16":
        phrase = kwargs["start_phrase"]
        return f"{phrase} {base}" if phrase.endswith(".") else f"{phrase} {base[0].lower()}{base[1:]}"
    raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}.")


def instructed_turn(task: str, qa: QA, scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) for one instruction-following turn, phrased like the if16 suite; the answer is
    verified with `unclutter.ifeval.follows` (a template that breaks a checker fails loudly here)."""
    instruction_id = TASKS[task][0]
    kwargs = _draw(task, rng)
    prompt = f"{qa.question} {describe(instruction_id, kwargs)}"
    for more in range(4 if task in ("T2", "T3") else 1):
        answer = instructed_answer(task, kwargs, qa, scene, more)
        if follows(instruction_id, kwargs, answer, prompt=prompt):
            return prompt, answer
    raise AssertionError(f"built answer fails {instruction_id} {kwargs}: {answer!r}")
