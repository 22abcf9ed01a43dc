"""Metric unit tests on hand-checked cases from the official definitions."""

import pytest

from unclutter import metrics as M


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


def test_vqa_accuracy_leave_one_out():
    answers = ["2"] * 3 + ["3"] * 7
    # "two" -> "2": leaving out a "2" leaves 2 matches (2/3), leaving out a "3" leaves 3 (1)
    assert M.vqa_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert M.vqa_accuracy("three", answers) == 1.0
    assert M.vqa_accuracy("2", ["2", "2"] + ["x"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert M.vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert M.vqa_accuracy("A Dog.", ["dog"] * 10) == 1.0
    with pytest.raises(ValueError):
        M.vqa_accuracy("x", [])


def test_gqa():
    assert M.gqa_match("Yes.", "yes") and M.gqa_match(" Left ", "left") and not M.gqa_match("the left", "left")


def test_yes_no_parsing():
    assert M.parse_yes_no("Yes.") == "yes"
    assert M.parse_yes_no("No, it is not") == "no"
    assert M.parse_yes_no("yes, there is") == "yes"
    assert M.parse_yes_no("There is a dog") == "other"


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


def test_mmbench_choice_and_circular():
    opts = {"A": "a red circle", "B": "a blue square", "C": "a green star"}
    assert M.mmbench_choice("B", opts) == "B"
    assert M.mmbench_choice("(C) a green star", opts) == "C"
    assert M.mmbench_choice("The answer is A.", opts) == "A"
    assert M.mmbench_choice("I think it is a blue square", opts) == "B"
    assert M.mmbench_choice("A or B", opts) is None
    assert M.mmbench_choice("no idea", opts) is None
    rotated, ans = M.rotate_options(opts, "B", 1)
    assert rotated == {"A": "a blue square", "B": "a green star", "C": "a red circle"} and ans == "A"
    assert M.circular_accuracy([("q1", True), ("q1", True), ("q2", True), ("q2", False)]) == 0.5
