"""`unclutter data shapes`: the shapes world written as training data and benchmarks.

Layout of ``out``::

    images/000000.png ...   the pictures (96x96 RGB)
    scenes.jsonl            ground truth: objects with colour, shape, cell, centre, radius
    pretrain.json           stage 1, LLaVA JSON: one caption per image
    finetune.json           stage 2, LLaVA JSON: multi-turn conversations in the style of LLaVA-1.5's mix
                            (short answers with LLaVA's answer-format suffix, sentence answers, detailed
                            descriptions); instruction-following turns only with ``if_rate`` > 0
    vqa.jsonl               benchmark, the harness's "gqa" format (question, answer), one per image
    if16.jsonl              benchmark, the 16-task suite built from vqa.jsonl's questions
    questions.jsonl         vqa.jsonl's questions in LLaVA's question format (for `ifeval build`)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..evaluation.runner import SHORT_ANSWER
from ..ifeval.scoring import write_jsonl_atomic
from ..ifeval.suite import TASKS, build_suite
from .text import DESCRIBE_PROMPTS, QUESTION_TYPES, ask, caption, description, instructed_turn
from .world import render, sample_scene

IMAGE_PLACEHOLDER = "<image>"


# Stage-2 question mix: colour and shape questions are learnt early (98% and 95% in run L), finding an
# object among several ("where", "is there") and counting are not, so they get more of the turns.
TURN_WEIGHTS = {"color": 1.0, "shape": 1.0, "count": 1.5, "exist": 1.5, "position": 2.0}
COUNT_MIX = (1.0, 1.5, 2.5)  # all shapes, a colour, a shape: total counts come easiest, counts by shape last


def _stream(seed: int, i: int, purpose: str | None = None) -> random.Random:
    """Image ``i``'s random stream for one purpose. One stream per purpose keeps any prefix of a run
    reproducible, and changing how one file is drawn leaves the others (the held-out questions above all)
    as they were. The scene's stream (``purpose=None``) keeps the key it had before there were others."""
    key = f"unclutter-shapes:{seed}:{i}"
    return random.Random(key if purpose is None else f"{key}:{purpose}")


def _conversation(scene, rng: random.Random, turns: int, if_rate: float, describe_rate: float = 0.0) -> list[dict]:
    """Alternating human/gpt turns, as in LLaVA-1.5's mix: short answers with its answer-format suffix,
    sentence answers (a fifth of the question turns), at most one detailed description (each turn is one with
    probability ``describe_rate`` until one is drawn) and, with probability ``if_rate`` per turn, an
    instruction-following turn of the 16-task suite; question types drawn with ``TURN_WEIGHTS``."""
    kinds = rng.choices(list(TURN_WEIGHTS), weights=list(TURN_WEIGHTS.values()), k=turns)
    conv, described = [], False
    for t, kind in enumerate(kinds):
        qa = ask(scene, kind, rng, COUNT_MIX)
        if not described and describe_rate and rng.random() < describe_rate:
            prompt, answer, described = rng.choice(DESCRIBE_PROMPTS), description(scene), True
        elif if_rate and rng.random() < if_rate:
            prompt, answer = instructed_turn(rng.choice(list(TASKS)), qa, scene, rng)
        elif rng.random() < 0.2:
            prompt, answer = qa.question, qa.sentence
        else:
            prompt, answer = f"{qa.question}\n{SHORT_ANSWER}", qa.short
        if t == 0:
            prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
        conv += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return conv


def build_shapes(
    out: str | Path,
    num: int,
    seed: int = 0,
    *,
    turns: tuple[int, int] = (5, 8),
    if_rate: float = 0.0,
    describe_rate: float = 0.12,
    if_per_task: int | None = None,
) -> dict[str, int]:
    """Write ``num`` images and every file above under ``out``; returns counts per file.

    ``if_per_task`` (default ``max(1, num // 16)``) sizes the if16 suite. Deterministic for ``seed``.
    The default stage-2 mix has no instruction-following turns (``if_rate=0``): as in the paper, instruction
    following must come from the LLM, and the miniature measures how much of it survives the image tokens.
    """
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}.")
    for name, rate in (("if_rate", if_rate), ("describe_rate", describe_rate)):
        if not 0 <= rate <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {rate}.")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes, pretrain, finetune, vqa = [], [], [], []
    for i in range(num):
        scene = sample_scene(_stream(seed, i))
        name = f"{i:06d}.png"
        render(scene).save(out / "images" / name)
        scenes.append({"image": name, **scene.to_dict()})
        pretrain.append(
            {"id": f"cap-{i:06d}", "image": name, "conversations": [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nDescribe the image briefly."},
                {"from": "gpt", "value": caption(scene, _stream(seed, i, "caption"))},
            ]}
        )  # fmt: skip
        conv_rng = _stream(seed, i, "conversation")
        finetune.append(
            {"id": f"conv-{i:06d}", "image": name, "conversations": _conversation(
                scene, conv_rng, conv_rng.randint(*turns), if_rate, describe_rate
            )}
        )  # fmt: skip
        qa = ask(scene, QUESTION_TYPES[i % len(QUESTION_TYPES)], _stream(seed, i, "vqa"))
        vqa.append(
            {"question_id": f"{i:06d}", "image": name, "question": qa.question, "answer": qa.short, "kind": qa.kind}
        )
    write_jsonl_atomic(out / "scenes.jsonl", scenes)
    (out / "pretrain.json").write_text(json.dumps(pretrain, indent=1), encoding="utf-8")
    (out / "finetune.json").write_text(json.dumps(finetune, indent=1), encoding="utf-8")
    write_jsonl_atomic(out / "vqa.jsonl", vqa)
    questions = [{"question_id": r["question_id"], "image": r["image"], "question": r["question"]} for r in vqa]
    write_jsonl_atomic(
        out / "questions.jsonl",
        [{"question_id": q["question_id"], "image": q["image"], "text": q["question"]} for q in questions],
    )
    suite = build_suite(questions, per_task=if_per_task if if_per_task is not None else max(1, num // 16), seed=seed)
    write_jsonl_atomic(out / "if16.jsonl", suite)
    return {"images": num, "pretrain": len(pretrain), "finetune": len(finetune), "vqa": len(vqa), "if16": len(suite)}
