"""Metric tests: hand-checked cases from the official definitions, and equality with lmms-eval's own scoring code
on tricky and seeded-random strings."""

import ast
import importlib
import importlib.util
import math
import os
import random
import re
import statistics
import string
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from unclutter import metrics as M

# ---- lmms-eval's own code -----------------------------------------------------------------------


def _load_file(path: Path):
    """An lmms-eval source file as a module of its own (importing lmms_eval.tasks needs tenacity, sacrebleu ...)."""
    spec = importlib.util.spec_from_file_location(f"lmms_src_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_def(path: Path, name: str, **names):
    """One top-level function or class of an lmms-eval file, compiled from that file alone with the names it uses
    (for files whose other imports are not installed: requests, the tasks package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name == name)
    scope = dict(names)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), scope)
    return scope[name]


@pytest.fixture(scope="module")
def lmms():
    pd = importlib.import_module("pandas")
    yaml = importlib.import_module("yaml")
    logger = importlib.import_module("loguru").logger
    root = Path(importlib.import_module("lmms_eval").__file__).parent
    tasks = root / "tasks"
    mme = _load_file(tasks / "mme" / "utils.py")
    vqa = _load_file(tasks / "_task_utils" / "vqa_eval_metric.py")
    mcq = _load_file(tasks / "_task_utils" / "mcq_extract.py")
    vqa_names = {"EvalAIAnswerProcessor": vqa.EvalAIAnswerProcessor, "statistics": statistics}
    gqa_yaml = "".join(line for line in (tasks / "gqa" / "gqa.yaml").open() if "!function" not in line)
    (gqa_metric,) = yaml.safe_load(gqa_yaml)["metric_list"]
    evaluator = _load_def(tasks / "mmbench" / "mmbench_evals.py", "MMBench_Evaluator", math=math, os=os,
                          rd=random.Random(), string=string, time=time, pd=pd, eval_logger=logger)  # fmt: skip
    return SimpleNamespace(
        mme=mme,
        processor=vqa.EvalAIAnswerProcessor(),
        vqav2=_load_def(tasks / "vqav2" / "utils.py", "vqav2_process_results", **vqa_names),
        textvqa=_load_def(tasks / "textvqa" / "utils.py", "textvqa_process_results", **vqa_names),
        exact_match=_load_def(root / "api" / "metrics.py", "exact_match_hf_evaluate", np=np, re=re, string=string),
        gqa_metric=gqa_metric,
        mcq=mcq,
        mmbench_results=_load_def(tasks / "mmbench" / "en_utils.py", "mmbench_process_results"),
        evaluator=evaluator(),
    )


def random_strings(seed: int, tokens: list[str], seps: list[str], n: int = 300, most: int = 5) -> list[str]:
    """``n`` deterministic strings: up to ``most`` tokens with a random separator before, between and after."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(seps)]
        for _ in range(rng.randint(0, most)):
            parts += [rng.choice(tokens), rng.choice(seps)]
        out.append("".join(parts))
    return out


SEPS = ["", " ", "", " ", ".", ",", ", ", "!", "?", "\n", "\t", "  ", "..."]

# ---- VQA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),
        ("The cat", "cat"),
        ("yes!", "yes"),
        ("1,000", "1000"),  # comma between digits removed
        ("dont", "don't"),  # contraction map
        ("red/white", "red white"),  # '/' not next to a space becomes a space
        ("3.5", "3.5"),  # a period between digits stays
        ("It's a man's hat", "it 's man 's hat"),
    ],
)
def test_vqa_normalization(raw, normalized):
    assert M.normalize_vqa_answer(raw) == normalized


def test_vqav2_normalization():
    # lmms-eval's VQAv2 scoring skips the processor's first step: ',' and '?' are punctuation, "'s" is not split
    assert M.normalize_vqav2_answer("red,white") == "red white" and M.normalize_vqa_answer("red,white") == "redwhite"
    assert M.normalize_vqav2_answer("It's a man's hat") == "it's man's hat"
    assert M.normalize_vqav2_answer(" Two\tdogs.\n") == "2 dogs"


def test_vqa_accuracy_leave_one_out():
    answers = ["2"] * 3 + ["3"] * 7
    for bench in ("vqav2", "textvqa"):
        # "two" -> "2": leaving out a "2" leaves 2 matches (2/3), leaving out a "3" leaves 3 (1)
        assert M.vqa_accuracy("two", answers, bench=bench) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
        assert M.vqa_accuracy("three", answers, bench=bench) == 1.0
        assert M.vqa_accuracy("2", ["2", "2"] + ["x"] * 8, bench=bench) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
        assert M.vqa_accuracy("cat", ["dog"] * 10, bench=bench) == 0.0
        assert M.vqa_accuracy("A Dog.", ["dog"] * 10, bench=bench) == 1.0
        with pytest.raises(ValueError):
            M.vqa_accuracy("x", [], bench=bench)
    assert M.vqa_accuracy("red,white", ["red white"] * 10, bench="vqav2") == 1.0
    assert M.vqa_accuracy("red,white", ["red white"] * 10, bench="textvqa") == 0.0


VQA_TRICKY = [
    "Two dogs.", "The cat", "yes!", "Yes.", "1,000", "1, 000", "dont", "red/white", "red / white", "red,white", "3.5",
    "3 . 5", ".5", "It's a man's hat", "  A Dog.  ", "an apple", "None", "none", "ten", "10", "a", "the", "", " ",
    "\n", "\tyes\n", "what?", "x-ray", "(2)", "hello, world", "1, 2", "e.g.", "U.S.A.", "Twas", "twas", "yall'll",
    "Im", "I'm", "ain't", "aint", "somebody'd", "café", "İstanbul", "no.", "...", "a.b.c.d", "Yes, it is", "NO!",
    "2 dogs", "two  dogs", "it's", "its", "dog's", "dogs", "left-hand side", "50%", "$5", "5:30", "#1", "@home",
    ". " * 40, "1.2.3", "one;two", "[red]", "{x}", "<b>", "a_b", "`x`", '"quoted"', "back\\slash", "a+b=c",
]  # fmt: skip
VQA_TOKENS = ["two", "Two", "TWO", "none", "one", "ten", "a", "an", "the", "The", "dog", "dogs", "man's", "it's",
              "dont", "cant", "yes", "no", "1", "1,000", "3.5", "10", "red", "white", "/", "-", "(", ")", ";", "'",
              '"', "_", "@", "'s", "İ", "é"]  # fmt: skip


def _vqa_cases() -> list[tuple[str, list[str]]]:
    rng = random.Random(21)
    cases = [(p, [rng.choice(VQA_TRICKY) for _ in range(10)]) for p in VQA_TRICKY]
    randoms = random_strings(5, VQA_TOKENS, SEPS + ["/", "-", " - ", "'"], n=400, most=3)
    for i in range(0, len(randoms), 4):
        pool = randoms[i : i + 4]
        cases.append((rng.choice(pool), [rng.choice(pool) for _ in range(10)]))
        cases.append((pool[0].upper(), [rng.choice(pool) for _ in range(rng.randint(1, 10))]))
    return cases


def test_vqa_matches_lmms_eval(lmms):
    for pred, answers in _vqa_cases():
        for text in [pred, *answers]:
            assert M.normalize_vqa_answer(text) == lmms.processor(text), repr(text)
            v2 = lmms.vqav2({"question_id": 0, "answers": [{"answer": "x", "answer_id": 1}]}, [text])
            assert M.normalize_vqav2_answer(text) == v2["submission"]["answer"], repr(text)
        # the harness strips generations; VQAv2 answer records carry distinct answer ids
        doc = {"question_id": 0, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                             for i, a in enumerate(answers)]}  # fmt: skip
        assert M.vqa_accuracy(pred, answers, bench="vqav2") == lmms.vqav2(doc, [pred.strip()])["exact_match"]
        doc = {"question_id": 0, "answers": list(answers)}
        assert M.vqa_accuracy(pred, answers, bench="textvqa") == lmms.textvqa(doc, [pred.strip()])["exact_match"]


# ---- GQA ----------------------------------------------------------------------------------------


def test_gqa():
    assert M.gqa_match("Yes.", "yes") and M.gqa_match(" Left ", "left") and not M.gqa_match("the left", "left")
    assert M.gqa_match("t-shirt", "tshirt") and M.gqa_match("İ", "i") and not M.gqa_match("left", " left")


GQA_TRICKY = [
    "yes", "Yes.", "YES!", " Left ", "left", "left.", "the left", "t-shirt", "tshirt", "T-Shirt", "don't", "dont",
    "İ", "i̇", "i", "İa", "i̇a", "ia", "a\x00", "a\x00b", "a\x00.", "\x00", "", " ", "\n", "yes\n", "Ünïcode",
    "ünïcode", "ΣΑΣ", "σας", "σασ", "café", "cafe", "1,000", "1000", "10", "ten", "no", "No", "N.O.", "«no»", "no…",
]  # fmt: skip


def test_gqa_matches_lmms_eval(lmms):
    kwargs = {k: v for k, v in lmms.gqa_metric.items() if k not in ("metric", "aggregation", "higher_is_better")}
    assert lmms.gqa_metric["metric"] == "exact_match" and kwargs == {"ignore_case": True, "ignore_punctuation": True}
    rng = random.Random(7)
    chars = list("aAbBzZ İi.,!-'\"?\n\tΣσς\x00") + ["i̇", "no", "yes"]
    pairs = [(p, a) for p in GQA_TRICKY for a in GQA_TRICKY]
    for _ in range(400):
        p = "".join(rng.choice(chars) for _ in range(rng.randint(0, 6)))
        a = rng.choice([p, p.upper(), p.lower(), p.strip(), p.replace(".", ""), p + "\x00", p + ".", p.swapcase()])
        pairs += [(p, a), (a, p)]
    for pred, answer in pairs:
        # lmms-eval's generic generate_until scoring: the generation is stripped, the reference is doc["answer"]
        theirs = lmms.exact_match(predictions=[pred.strip()], references=[answer], **kwargs)["exact_match"]
        assert M.gqa_match(pred, answer) == bool(theirs), (pred, answer)


# ---- MME ----------------------------------------------------------------------------------------


def test_yes_no_parsing():
    assert M.parse_yes_no("Yes.") == "yes"
    assert M.parse_yes_no("No, it is not") == "no"
    assert M.parse_yes_no("yes, there is") == "yes"
    assert M.parse_yes_no("There is a dog") == "other"
    assert M.parse_yes_no(" Y. ") == "yes" and M.parse_yes_no("n") == "no" and M.parse_yes_no("x") == "other"
    assert M.parse_yes_no("Yesterday") == "yes" and M.parse_yes_no("nope") == "no"
    assert M.parse_yes_no("The answer is yes") == "other"


MME_TRICKY = [
    "Yes", "Yes.", "yes, it is", "No!", "No", "no.", "Yesterday", "nope", "The answer is yes", "YES", "y", "Y.", "n",
    " n ", "N\n", "", " ", "\n", "\nyes\n", "  No, there is not.", "eyes", "a no", "not sure", "I don't know", "Sí",
    "no\n\nyes", "..yes..", ".", "y.e.s", "n.o", "İyes", "ye", "nö", "No.Yes", "1", "Yes!", "no way", "Noted", "On",
    "none", "know", "yess", "noyes", "\tyes", "y y", "No.", "yes.\n", " Yes, the image shows a dog.", "x", "?",
]  # fmt: skip
MME_TOKENS = ["yes", "Yes", "YES", "no", "No", "NO", "y", "n", "Y", "N", "nope", "not", "Yesterday", "eyes", "none",
              "know", "the", "answer", "is", "maybe", "a", "İ", "sí", "0", "."]  # fmt: skip


def test_parse_yes_no_matches_lmms_eval(lmms):
    rng = random.Random(3)
    chars = list("yesnoYESNO .,!?\n\t")
    chars_random = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 6))) for _ in range(300)]
    for text in MME_TRICKY + random_strings(1, MME_TOKENS, SEPS, most=3) + chars_random:
        assert M.parse_yes_no(text) == lmms.mme.parse_pred_ans(text), repr(text)


def test_mme_scores():
    recs = [
        {"question_id": "a.jpg", "category": "color", "answer": "Yes", "prediction": "Yes"},
        {"question_id": "a.jpg", "category": "color", "answer": "No", "prediction": "No"},
        {"question_id": "b.jpg", "category": "color", "answer": "Yes", "prediction": "Yes"},
        {"question_id": "b.jpg", "category": "color", "answer": "No", "prediction": "Yes"},
        {"question_id": "c.png", "category": "code_reasoning", "answer": "No", "prediction": "no"},
        {"question_id": "c.png", "category": "code_reasoning", "answer": "Yes", "prediction": "maybe"},
    ]
    s = M.mme_scores(recs)
    assert s["categories"]["color"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert s["categories"]["code_reasoning"]["score"] == 50.0
    assert s["perception"] == 125.0 and s["cognition"] == 50.0 and s["total"] == 175.0
    with pytest.raises(ValueError):
        M.mme_scores([{"question_id": "a", "category": "color", "answer": "maybe", "prediction": "yes"}])


def test_mme_scores_match_lmms_eval(lmms):
    rng = random.Random(11)
    predictions = MME_TRICKY + random_strings(2, MME_TOKENS, SEPS, most=3)
    categories = [*M.MME_PERCEPTION, *M.MME_COGNITION, "unlisted"]
    for trial in range(4):
        records = []
        for i in range(rng.randint(1, 150)):
            cat = rng.choice(categories[: rng.randint(1, len(categories))])
            for _ in range(2):
                answer = rng.choice(["Yes", "No", "yes.", " No", "YES", "no"])
                records.append({"question_id": f"{cat}/{i}.png", "category": cat, "answer": answer,
                                "prediction": rng.choice(predictions)})  # fmt: skip
        rng.shuffle(records)
        ours = M.mme_scores(records)
        # lmms-eval: the harness strips each generation, process_results scores it, each key is aggregated
        results = [lmms.mme.mme_process_results(r, [r["prediction"].strip()]) for r in records]
        by_key = {k: [res[k] for res in results if k in res] for k in ("mme_perception_score", "mme_cognition_score")}
        assert ours["perception"] == lmms.mme.mme_aggregate_results(by_key["mme_perception_score"]), trial
        assert ours["cognition"] == lmms.mme.mme_aggregate_results(by_key["mme_cognition_score"]), trial
        assert set(ours["categories"]) == {r["category"] for r in records}
        for cat, v in ours["categories"].items():
            theirs = lmms.mme.mme_aggregate_results(
                [x for res in results for x in res.values() if x["category"] == cat]
            )
            assert v["score"] == theirs and v["acc"] + v["acc_plus"] == pytest.approx(theirs), cat


# ---- MMBench ------------------------------------------------------------------------------------


def test_mmbench_choice_and_circular():
    opts = {"A": "a red circle", "B": "a blue square", "C": "a green star"}
    assert M.mmbench_choice("B", opts) == "B"
    assert M.mmbench_choice("(C) a green star", opts) == "C"
    assert M.mmbench_choice("The answer is A.", opts) == "A"
    assert M.mmbench_choice("I think it is a blue square", opts) == "B"
    assert M.mmbench_choice("A or B", opts) == "A"  # lmms-eval's static extractor: a leading letter wins
    assert M.mmbench_choice("no idea", opts) is None
    rotated, ans = M.rotate_options(opts, "B", 1)
    assert rotated == {"A": "a blue square", "B": "a green star", "C": "a red circle"} and ans == "A"
    assert M.circular_accuracy([("q1", True), ("q1", True), ("q2", True), ("q2", False)]) == 0.5


MMB_OPTIONS = [
    {"A": "a red circle", "B": "a blue square", "C": "a green star"},
    {"A": "Yes", "B": "No"},
    {"A": "1", "B": "2", "C": "3", "D": "4"},
    {"A": "cat", "B": "dog", "C": "cat", "D": "Dog"},
    {"A": "apple", "B": "banana", "C": None, "D": float("nan")},
    {"A": "", "B": "x"},
    {"A": "left", "B": "right", "C": "up", "D": "down", "E": "nowhere"},
]
MMB_TRICKY = [
    "A", "A.", "(B)", "Answer: C", "answer: C", "The answer is A.", "B) a blue square", "a blue square",
    "A blue square", "I think it is a blue square", "A or B", "Both A and B", "A cat is on the mat", "A red circle",
    "none of them", "", " ", "\n", "C\n", "Option D", "(E)", "E", "答案是B", "选C", "The correct answer is (B).",
    "B, because it is blue", "Failed to obtain answer via API: A", "a", "b.", "It is A, not B", "It's red", "Apple",
    "banana", "Yes", "No", "2", "4.", "D. 4", "ABCD", "A B C D", "Answer:A", ":B", "B:", "(A).", "A).", "\"B\"",
    "'C'.", "A\nB", "The answer is A. A cat", "I choose D", "my answer is b", "cat", "Dog", "up", "nowhere", "İ A",
]  # fmt: skip
MMB_TOKENS = ["A", "B", "C", "D", "E", "(A)", "B.", "C)", "D:", "(B).", ":C", "a", "the", "answer", "is",
              "The answer is", "option", "red", "circle", "blue square", "green star", "Apple", "banana", "I",
              "choose", "none", "Yes", "No", "2", "cat", "dog", "left", "答案是", "选", "İ"]  # fmt: skip


def _lmms_mmbench_doc(index: int, options: dict, answer: str = "A") -> dict:
    doc = {"index": index, "question": "q?", "answer": answer, "hint": "nan", "source": "s", "split": "dev",
           "category": f"cat{index % 3}", "L2-category": "l2"}  # fmt: skip
    return {**doc, **{k: options.get(k, float("nan")) for k in "ABCD"}}


def _lmms_static_choice(lmms, item: dict) -> str | None:
    """lmms-eval's static MMBench per answer, as eval_sub_data runs it: prefetch rules, then extract_mcq_answer."""
    got = lmms.evaluator.prefetch_answer(item)
    if not got:
        got = lmms.mcq.extract_mcq_answer(item["prediction"], choices=sorted(lmms.evaluator.build_choices(item)))
    return got or None


def test_mmbench_choice_matches_lmms_eval(lmms):
    texts = MMB_TRICKY + random_strings(4, MMB_TOKENS, SEPS + [", ", " - "], n=300)
    for i, text in enumerate(texts):
        for options in MMB_OPTIONS if i < len(MMB_TRICKY) else [MMB_OPTIONS[i % len(MMB_OPTIONS)]]:
            item = lmms.mmbench_results(_lmms_mmbench_doc(0, options), [text])["gpt_eval_score"]
            assert M.mmbench_choice(text, options) == _lmms_static_choice(lmms, item), (text, options)


def test_mmbench_circular_matches_lmms_eval_static(lmms, monkeypatch, capsys):
    # eval_sub_data imports the extractor through the lmms_eval.tasks package; hand it the module loaded above
    monkeypatch.setitem(sys.modules, "lmms_eval.tasks._task_utils.mcq_extract", lmms.mcq)
    rng = random.Random(9)
    texts = MMB_TRICKY + random_strings(6, MMB_TOKENS, SEPS, n=200, most=3)
    results, ours = [], []
    for q in range(1, 80):
        options = {
            k: rng.choice(["red", "blue", "a cat", "Dog", "2", "yes"]) + str(q % 3) for k in "ABCD"[: rng.randint(2, 4)]
        }
        answer = rng.choice(sorted(options))
        for shift in range(len(options)):
            opts, ans = M.rotate_options(options, answer, shift)
            pred = (
                rng.choice([ans, f"({ans})", f"{ans}. {opts[ans]}", opts[ans]])
                if rng.random() < 0.85
                else rng.choice(texts)
            )
            doc = _lmms_mmbench_doc(q + shift * 1_000_000, opts, ans)  # lmms-eval's index for circular copies
            results.append(lmms.mmbench_results(doc, [pred])["gpt_eval_score"])
            ours.append((q, M.mmbench_choice(pred, opts) == ans))
    overall, _, _ = lmms.evaluator.eval_result(results, eval_method="static")
    assert M.circular_accuracy(ours) == overall and 0 < overall < 1
    capsys.readouterr()
