"""The shapes world: determinism, ground truth that matches the pixels, answers that pass IFEval's checkers,
files the trainer and the harness accept (a LLaVA-mix-like stage 2 without instruction turns), and the ViT's
pretraining (patch targets, the CLS objective and the CLS attention measurement)."""

import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from unclutter import ifeval
from unclutter.cli import app
from unclutter.evaluation.data import load_records
from unclutter.ifeval.suite import TASKS
from unclutter.shapes.dataset import build_shapes
from unclutter.shapes.text import QUESTION_TYPES, ask, caption, instructed_turn
from unclutter.shapes.world import COLORS, IMAGE_SIZE, NUMBER_WORDS, POSITIONS, SHAPES, render, sample_scene
from unclutter.training.data import load_llava_json


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    counts = build_shapes(out, 40, seed=3, if_per_task=2)
    return out, counts


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    out, _ = world
    build_shapes(tmp_path / "again", 40, seed=3, if_per_task=2)
    build_shapes(tmp_path / "other", 40, seed=4, if_per_task=2)
    assert _files(out) == _files(tmp_path / "again")
    assert (out / "images/000000.png").read_bytes() != (tmp_path / "other/images/000000.png").read_bytes()


def test_counts_and_formats_accepted_by_trainer_and_harness(world):
    out, counts = world
    assert counts == {"images": 40, "pretrain": 40, "finetune": 40, "vqa": 40, "if16": 32}
    assert len(load_llava_json(out / "pretrain.json", out / "images")) == 40
    assert len(load_llava_json(out / "finetune.json", out / "images")) == 40
    vqa = load_records("gqa", out / "vqa.jsonl", out / "images")
    assert {r["kind"] for r in vqa} == set(QUESTION_TYPES)
    suite = load_records("if16", out / "if16.jsonl", out / "images")
    assert sorted({r["task"] for r in suite}) == sorted(TASKS)


def test_scenes_are_valid_and_pixels_match_ground_truth():
    for seed in range(60):
        scene = sample_scene(random.Random(seed))
        objs = scene.objects
        assert 1 <= len(objs) <= 4
        assert len({(o.row, o.col) for o in objs}) == len(objs)  # distinct cells: positions are unambiguous
        assert len({(o.color, o.shape) for o in objs}) == len(objs)
        pixels = np.asarray(render(scene)).astype(int)
        assert pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        for o in objs:
            assert POSITIONS[int(o.cy // 32)][int(o.cx // 32)] == o.position  # the centre lies in its cell
            centre = pixels[round(o.cy) - 1 : round(o.cy) + 2, round(o.cx) - 1 : round(o.cx) + 2].reshape(-1, 3)
            # every shape covers its centre (the star's inner radius too) in its pure colour
            assert np.abs(centre - np.array(COLORS[o.color])).max() <= 3, (seed, o)


def test_background_has_no_saturated_colour():
    scene = sample_scene(random.Random(0))
    empty = type(scene)((), scene.background_seed)
    px = np.asarray(render(empty)).astype(int)
    saturation = px.max(axis=2) - px.min(axis=2)
    assert np.percentile(saturation, 99) < 90  # shapes' colours have a spread of 130 or more
    assert min(max(c) - min(c) for c in COLORS.values()) >= 130


def test_answers_are_ground_truth():
    for seed in range(80):
        rng = random.Random(seed)
        scene = sample_scene(rng)
        objs = scene.objects
        for kind in QUESTION_TYPES:
            qa = ask(scene, kind, rng)
            if qa.kind == "color":
                shape = qa.question.split()[-1].rstrip("?")
                assert [o.color for o in objs if o.shape == shape] == [qa.short]
            elif qa.kind == "shape":
                color = qa.question.split()[4]
                assert [o.shape for o in objs if o.color == color] == [qa.short]
            elif qa.kind == "count":
                words = qa.question.split()
                if words[2] == "shapes":
                    assert int(qa.short) == len(objs)
                else:  # the attribute as an adjective, never a plural noun ("square shapes", not "squares")
                    assert words[3] == "shapes" and words[2] in (*COLORS, *SHAPES)
                    attr = "color" if words[2] in COLORS else "shape"
                    assert int(qa.short) == sum(getattr(o, attr) == words[2] for o in objs)
                    assert qa.sentence.split()[-2] == words[2] and qa.sentence.endswith(("shape.", "shapes."))
            elif qa.kind == "exist":
                _, _, _, color, shape = qa.question.rstrip("?").split()
                assert qa.short == ("yes" if any(o.color == color and o.shape == shape for o in objs) else "no")
            else:
                name = qa.question[len("Where is the ") : -1]
                assert [o.position for o in objs if o.name == name] == [qa.short]
            assert "," not in qa.sentence
        text = caption(scene)
        assert all(f"{o.position.capitalize()}: a {o.name}." in text for o in objs)
        assert text.count(": a ") == len(objs)


def test_captions_come_in_three_forms_and_name_every_object():
    styles = []
    for seed in range(90):
        scene = sample_scene(random.Random(seed))
        text = caption(scene, random.Random(f"caption-{seed}"))
        n = len(scene.objects)
        head = "There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."
        assert text.startswith(head + " ")
        body = text[len(head) + 1 :]
        if ": a " in text:  # position first, reading order
            assert text == caption(scene)
            styles.append("position")
        elif " is at the " in text:  # object first: every object once, with its own cell
            said = sorted(x.rstrip(".") for x in body.split(". "))
            assert said == sorted(f"The {o.name} is at the {o.position}" for o in scene.objects)
            styles.append("object")
        else:  # terse, shape first: "square red top left, circle blue center."
            assert body.endswith(".") and body == body.lower()
            said = sorted(body.rstrip(".").split(", "))
            assert said == sorted(f"{o.shape} {o.color} {o.position}" for o in scene.objects)
            styles.append("terse")
    assert all(15 < styles.count(s) < 45 for s in ("position", "object", "terse"))


def test_training_turns_favour_the_hard_question_types():
    from unclutter.shapes.dataset import _conversation

    kinds, counts = [], []
    for seed in range(300):
        rng = random.Random(seed)
        scene = sample_scene(rng)
        questions = [t["value"] for t in _conversation(scene, rng, 8, 0.0)[::2]]
        kinds += ["position" if "Where is" in q else "color" if "What color" in q else "other" for q in questions]
        counts += [q.split()[2] for q in questions if "How many" in q]
    share = {k: kinds.count(k) / len(kinds) for k in ("position", "color")}
    # weights 2 and 1 of 7; colour questions fall back to counts when no shape is unique
    assert 0.25 < share["position"] < 0.32 and share["color"] < 0.15
    assert sum(w in SHAPES for w in counts) > 1.8 * counts.count("shapes")  # by shape 2.5, all shapes 1


def test_changing_the_conversations_leaves_images_captions_and_benchmark_alone(world, tmp_path):
    out, _ = world
    build_shapes(tmp_path / "short", 40, seed=3, turns=(2, 3), if_per_task=2)
    for name in ("scenes.jsonl", "pretrain.json", "vqa.jsonl", "if16.jsonl", "images/000007.png"):
        assert (out / name).read_bytes() == (tmp_path / "short" / name).read_bytes(), name
    assert (out / "finetune.json").read_bytes() != (tmp_path / "short" / "finetune.json").read_bytes()


@pytest.mark.parametrize("task", list(TASKS))
def test_instructed_answers_follow_their_instruction(task):
    for seed in range(25):
        rng = random.Random(seed)
        scene = sample_scene(rng)
        qa = ask(scene, QUESTION_TYPES[seed % 5], rng)
        prompt, answer = instructed_turn(task, qa, scene, rng)
        assert prompt.startswith(qa.question)
        iid = TASKS[task][0]
        # re-derive the kwargs the way the checker would see them: from the prompt's instruction sentence
        assert any(
            ifeval.describe(iid, kw) in prompt and ifeval.follows(iid, kw, answer, prompt=prompt)
            for kw in _kwarg_candidates(task, prompt)
        ), (prompt, answer)


def _kwarg_candidates(task, prompt):
    """Every kwargs the suite can draw for ``task`` (small spaces), to find the one in ``prompt``."""
    from itertools import product

    from unclutter.ifeval.suite import END_PHRASES, KEYWORDS, START_PHRASES

    spaces = {
        "T4": [{"num_placeholders": n} for n in range(1, 4)],
        "T5": [{"postscript_marker": m} for m in ("P.S.", "P.P.S")],
        "T7": [{"keywords": [a]} for a in KEYWORDS] + [{"keywords": [a, b]} for a, b in product(KEYWORDS, KEYWORDS)],
        "T8": [{"num_highlights": n} for n in range(1, 4)],
        "T10": [{"section_spliter": s, "num_sections": n} for s in ("Section", "SECTION") for n in (2, 3)],
        "T11": [{"num_bullets": n} for n in range(2, 5)],
        "T12": [{"num_sentences": n, "relation": r} for n in range(1, 5) for r in ("less than", "at least")],
        "T13": [{"num_words": n, "relation": r} for n in range(10, 51) for r in ("less than", "at least")],
        "T15": [{"end_phrase": p} for p in END_PHRASES],
        "T16": [{"start_phrase": p} for p in START_PHRASES],
    }
    return spaces.get(task, [{}])


def _instructed(text: str) -> bool:
    return any(ifeval.describe(TASKS[t][0], {}) in text for t in ("T1", "T2", "T3", "T6", "T9", "T14"))


def test_finetune_mix_is_llava_like_without_instruction_turns(world, tmp_path):
    """Short answers with LLaVA's suffix, sentence answers, descriptions, several turns; no IFEval-style turns
    unless asked for (``if_rate``)."""
    out, _ = world
    records = json.loads((out / "finetune.json").read_text())
    human = [t["value"] for r in records for t in r["conversations"] if t["from"] == "human"]
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)
    assert all(5 <= len(r["conversations"]) // 2 <= 8 for r in records)
    assert len(human) * 0.6 < sum("single word or phrase" in h for h in human) < len(human) * 0.9
    assert sum("in detail" in h or "detailed description" in h for h in human) >= 10
    assert not any(_instructed(h) for h in human)
    build_shapes(tmp_path / "if", 40, seed=3, if_rate=0.3, if_per_task=2)
    human = [t["value"] for r in json.loads((tmp_path / "if" / "finetune.json").read_text())
             for t in r["conversations"] if t["from"] == "human"]  # fmt: skip
    assert sum(map(_instructed, human)) > 5


def test_description_names_every_object_in_its_cell():
    from unclutter.shapes.text import description

    for seed in range(40):
        scene = sample_scene(random.Random(seed))
        text = description(scene)
        n = len(scene.objects)
        assert text.startswith("There is one shape" if n == 1 else f"There are {NUMBER_WORDS[n]} shapes")
        assert all(f"A {o.name} is at the {o.position}." in text for o in scene.objects)
        assert text.count(" is at the ") == n


def test_data_shapes_cli(tmp_path):
    from typer.testing import CliRunner

    from unclutter.cli import app

    res = CliRunner().invoke(app, ["data", "shapes", "--out", str(tmp_path / "w"), "--num", "5", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "w" / "images").glob("*.png"))) == 5
    bad = CliRunner().invoke(app, ["data", "shapes", "--out", str(tmp_path / "x"), "--num", "0"])
    assert bad.exit_code != 0 and "--num must be >= 1" in " ".join(bad.output.split())


def test_object_coverage_is_the_mask_render_pastes():
    from unclutter.shapes.world import object_coverage

    scene = sample_scene(random.Random(5))
    cover = object_coverage(scene)
    assert cover.shape == (IMAGE_SIZE, IMAGE_SIZE) and cover.min() >= 0 and cover.max() <= 1
    for o in scene.objects:
        assert cover[round(o.cy), round(o.cx)] > 0.99  # every centre is covered
    assert cover[0, 0] == 0 or any(o.row == 0 and o.col == 0 for o in scene.objects)
    assert 0.02 < cover.mean() < 0.4


def test_cell_and_scene_labels_match_the_scene(world):
    from unclutter.shapes.vision import PAIRS, cell_labels, cell_of_patch, scene_labels

    assert cell_of_patch(12).view(12, 12)[::4, ::4].flatten().tolist() == list(range(9))
    out, _ = world
    for line in (out / "scenes.jsonl").read_text().splitlines():
        scene = json.loads(line)
        shapes, colors = cell_labels(scene)
        occupied = {o["row"] * 3 + o["col"]: o for o in scene["objects"]}
        for cell in range(9):
            o = occupied.get(cell)
            assert shapes[cell] == (SHAPES.index(o["shape"]) + 1 if o else 0)
            assert colors[cell] == (list(COLORS).index(o["color"]) + 1 if o else 0)
        present, count = scene_labels(scene)
        assert count == len(scene["objects"]) - 1
        assert {PAIRS[i] for i, p in enumerate(present) if p} == {(o["color"], o["shape"]) for o in scene["objects"]}


def test_cls_attention_ratio_weighs_attention_by_coverage():
    """A tower whose CLS attends only to covered patches scores 1/area; uniform attention scores 1."""
    from types import SimpleNamespace

    from unclutter.shapes.vision import cls_attention_ratio

    class Fake(torch.nn.Module):
        config = SimpleNamespace(_attn_implementation="sdpa")

        def __init__(self, rows):
            super().__init__()
            self.rows = rows

        def set_attn_implementation(self, name):
            self.config._attn_implementation = name

        def forward(self, pixel_values, output_attentions):
            b = pixel_values.shape[0]
            attn = torch.zeros(b, 2, 5, 5)
            attn[:, :, 0, 1:] = self.rows[:b, None]
            return SimpleNamespace(attentions=(attn, attn))

    cover = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    focused = cls_attention_ratio(Fake(torch.tensor([[0.9, 0, 0, 0], [0.4, 0.4, 0, 0]])), torch.zeros(2, 1), cover)
    assert [r["block"] for r in focused] == [0, 1]
    assert focused[0]["share"] == pytest.approx(0.75) and focused[0]["area"] == pytest.approx(0.25)
    assert focused[0]["ratio"] == pytest.approx((1 / 0.25 + 0.5 / 0.25) / 2)  # 4x and 2x the area
    uniform = cls_attention_ratio(Fake(torch.full((2, 4), 0.2)), torch.zeros(2, 1), cover)
    assert uniform[1]["ratio"] == pytest.approx(1.0)


def test_pretrain_vision_learns_and_writes_a_loadable_tower(world, tmp_path):
    """A few steps on 40 images: the loss falls, every record is there, and the tower reloads."""
    from transformers import CLIPVisionModel

    from unclutter.shapes.vision import pretrain_vision

    out, _ = world
    log = pretrain_vision(out, tmp_path / "vision", steps=16, batch_size=8, lr=2e-3, holdout=8)
    losses = [e["loss"] for e in log["log"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    for key in ("heldout_shape_acc", "heldout_color_acc", "heldout_cell_acc", "heldout_cls_objects_exact",
                "heldout_cls_count_acc"):  # fmt: skip
        assert 0.0 <= log[key] <= 1.0
    assert [r["block"] for r in log["cls_attention"]] == list(range(5))
    assert all(r["ratio"] > 0 and 0 < r["area"] < 1 for r in log["cls_attention"])
    tower = CLIPVisionModel.from_pretrained(tmp_path / "vision")
    assert tower.config.image_size == IMAGE_SIZE and tower.config.patch_size == 8
    assert json.loads((tmp_path / "vision" / "vision_pretrain.json").read_text())["steps"] == 16
    with pytest.raises(ValueError, match="need more than"):
        pretrain_vision(out, tmp_path / "v2", steps=1, holdout=40)


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="per_task must be >= 1"):  # 0 used to mean "the default"
        build_shapes(tmp_path / "w", 16, seed=0, if_per_task=0)
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(app, ["data", "shapes", "--out", str(tmp_path / "file"), "--num", "16"])
    assert res.exit_code == 2 and "is a file, not a folder" in " ".join(res.output.split())
