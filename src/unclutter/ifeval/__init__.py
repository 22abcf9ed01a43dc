"""IFEval-exact instruction checkers and the paper's 16-task image instruction-following suite.

unclutter.ifeval.follows("punctuation:no_comma", {}, "no commas here")        # True
unclutter.ifeval.describe("detectable_format:title", {})                     # IFEval's sentence
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .checkers import IFEVAL_IDS, INSTRUCTIONS, Instruction

__all__ = ["IFEVAL_IDS", "INSTRUCTIONS", "Instruction", "describe", "follows", "loose_variants", "resolve_kwargs"]


def _instruction(instruction_id: str) -> Instruction:
    try:
        return INSTRUCTIONS[instruction_id]
    except KeyError:
        raise ValueError(
            f"unknown instruction id {instruction_id!r}; known ids: {', '.join(sorted(INSTRUCTIONS))}."
        ) from None


def resolve_kwargs(instruction_id: str, kwargs: Mapping[str, Any] | None, prompt: str | None = None) -> dict:
    """The kwargs a checker takes: None values dropped (lm-eval's files carry every key as null)."""
    inst = _instruction(instruction_id)
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    unknown = sorted(set(given) - set(inst.args))
    if unknown:
        raise ValueError(f"{instruction_id} takes {list(inst.args)}, got unexpected kwargs {unknown}.")
    if "prompt_to_repeat" in inst.args and "prompt_to_repeat" not in given and prompt is not None:
        given["prompt_to_repeat"] = prompt
    missing = [a for a in inst.args if a not in given]
    if missing:
        raise ValueError(f"{instruction_id} needs kwargs {missing}.")
    return given


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
    for key in ("postscript_marker", "section_spliter", "end_phrase", "start_phrase", "keyword"):
        if key in kw:
            kw[key] = kw[key].strip()
    return inst.template.format(options=CONSTRAINED_RESPONSES, **kw)
