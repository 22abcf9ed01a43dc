"""IFEval-exact instruction checkers and the paper's 16-task image instruction-following suite.

unclutter.ifeval.follows("punctuation:no_comma", {}, "no commas here")        # True
unclutter.ifeval.describe("detectable_format:title", {})                     # IFEval's sentence
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from typing import Any

from .checkers import IFEVAL_IDS, INSTRUCTIONS, RELATIONS, Instruction

__all__ = ["IFEVAL_IDS", "INSTRUCTIONS", "Instruction", "describe", "follows", "loose_variants", "resolve_kwargs"]


def _instruction(instruction_id: str) -> Instruction:
    if not isinstance(instruction_id, str):  # a list would fail the lookup as unhashable
        raise ValueError(f"an instruction id is a string such as 'punctuation:no_comma', got {instruction_id!r}.")
    try:
        return INSTRUCTIONS[instruction_id]
    except KeyError:
        raise ValueError(
            f"unknown instruction id {instruction_id!r}; known ids: {', '.join(sorted(INSTRUCTIONS))}."
        ) from None


def resolve_kwargs(instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str | None = None) -> dict:
    """The kwargs a checker takes: None values dropped (lm-eval's files carry every key as null)."""
    inst = _instruction(instruction_id)
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"{instruction_id}: kwargs must be an object {{name: value}} or null, got {kwargs!r}.")
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    unknown = sorted(set(given) - set(inst.args))
    if unknown:
        raise ValueError(f"{instruction_id} takes {list(inst.args)}, got unexpected kwargs {unknown}.")
    if "prompt_to_repeat" in inst.args and "prompt_to_repeat" not in given and prompt is not None:
        given["prompt_to_repeat"] = prompt
    missing = [a for a in inst.args if a not in given]
    if missing:
        raise ValueError(f"{instruction_id} needs kwargs {missing}.")
    _check_values(inst, given)
    return given


_RELATION_ARGS = ("relation", "let_relation", "capital_relation")
_PATTERN_ARGS = {"keywords": "{}", "keyword": "{}", "forbidden_words": r"\b{}\b"}  # as the checkers search them


def _check_values(inst: Instruction, given: dict) -> None:
    """Each kwarg has the type its checker takes, relations are IFEval's, keyword patterns compile: a bad value is
    named here instead of failing inside a checker (IFEval's reference would raise there too)."""
    hints = typing.get_type_hints(inst.check)
    for name, value in given.items():
        want = hints.get(name)
        if want is int:
            ok, label = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif want is str:
            ok, label = isinstance(value, str), "a string"
        elif typing.get_origin(want) is list:
            ok, label = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings"
        else:
            continue
        if not ok:
            raise ValueError(f"{inst.id}: kwarg {name!r} must be {label}, got {value!r}.")
    for name in _RELATION_ARGS:
        if name in given and given[name] not in RELATIONS:
            raise ValueError(f"{inst.id}: {name} must be one of {list(RELATIONS)}, got {given[name]!r}.")
    for name, form in _PATTERN_ARGS.items():
        for pattern in [given[name]] if isinstance(given.get(name), str) else given.get(name, []):
            try:
                re.compile(form.format(pattern.strip() if name == "keyword" else pattern))
            except re.error as exc:
                raise ValueError(f"{inst.id}: {name} {pattern!r} is not a valid regular expression ({exc}).") from None


def loose_variants(response: str) -> list[str]:
    """The reference's 8 loose-mode variants: as is, without first / last / both lines, each without '*'."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        first,
        last,
        both,
        first.replace("*", ""),
        last.replace("*", ""),
        both.replace("*", ""),
    ]


def follows(
    instruction_id: str,
    kwargs: Mapping[str, Any] | None,
    response: str,
    *,
    prompt: str | None = None,
    loose: bool = False,
) -> bool:
    """Whether ``response`` follows the instruction, as IFEval's reference judges it.

    Strict: an empty (whitespace) response fails. Loose: passes if any of the 8 variants of
    `loose_variants` is non-empty and passes. ``prompt`` fills `combination:repeat_prompt`'s
    ``prompt_to_repeat`` when kwargs lack it.
    """
    inst = _instruction(instruction_id)
    kw = resolve_kwargs(instruction_id, kwargs, prompt)
    candidates = loose_variants(response) if loose else [response]
    return any(r.strip() and inst.check(r, **kw) for r in candidates)


def describe(instruction_id: str, kwargs: Mapping[str, Any] | None = None) -> str:
    """The instruction sentence in IFEval's phrasing, e.g. for building prompts."""
    from .checkers import CONSTRAINED_RESPONSES, LANGUAGES, normalize_letter

    inst = _instruction(instruction_id)
    kw = resolve_kwargs(instruction_id, kwargs, prompt="")
    if "language" in kw:
        kw["language"] = LANGUAGES.get(kw["language"], kw["language"])
    if "letter" in kw:
        kw["letter"] = normalize_letter(kw["letter"])
    if "keywords" in kw:  # the reference's build_description keeps them sorted, forbidden words also deduplicated
        kw["keywords"] = sorted(kw["keywords"])
    if "forbidden_words" in kw:
        kw["forbidden_words"] = sorted(set(kw["forbidden_words"]))
    for key in ("postscript_marker", "section_spliter", "end_phrase", "start_phrase", "keyword"):
        if key in kw:
            kw[key] = kw[key].strip()
    return inst.template.format(options=CONSTRAINED_RESPONSES, **kw)
