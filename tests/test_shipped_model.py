"""The shipped shapes model: present, safetensors only, small, and still good at its world.

The numbers checked here are floors on a fresh held-out sample (the model card reports the full
500-question / 160-prompt benchmark); they catch a broken checkpoint, tokenizer or prompt format.
"""

import pytest

from unclutter.demo import SHIPPED, bench_items, load, run_methods


@pytest.fixture(scope="module")
def shipped():
    return load(None)


def test_weights_are_safetensors_and_small():
    files = {p.name: p.stat().st_size for p in SHIPPED.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in files)
    assert sum(files.values()) < 25 * 2**20
    assert "README.md" in files  # the model card


def test_shipped_model_answers_and_follows(shipped):
    model, processor = shipped
    vqa, ifs = bench_items(48, "shipped-model-test")
    res = run_methods(model, processor, vqa + ifs, {"stock": {}}, max_new_tokens=64, batch=16)["stock"]
    vqa_acc = sum(res["correct"][:48]) / 48
    if_rate = sum(res["followed"][48:]) / 48
    assert vqa_acc >= 0.75, vqa_acc  # measured 0.918 on 500 held-out (the target is 0.9)
    assert if_rate >= 0.6, if_rate  # measured 0.875 on the 160-prompt suite


def test_probe_finds_colour_and_shape_lookups_before_the_last_layer(tmp_path):
    """The model card's diagnosis, re-measured: a first-layer head at the colour word finds the object named
    by colour (run AC: 0.73 of its attention on that cell, 0.03 on each other object), and a head before the
    last layer finds the object named by shape from the last token (AC: layer 1, 0.87 against 0.03; run R,
    with a trained projector, had none before its last layer)."""
    from unclutter.evaluation.generation import load_model
    from unclutter.ifeval.scoring import read_jsonl
    from unclutter.shapes.dataset import build_shapes
    from unclutter.shapes.model import cell_of_patch
    from unclutter.shapes.probe import lookup_attention

    assert cell_of_patch(12).view(12, 12)[::4, ::4].flatten().tolist() == list(range(9))
    build_shapes(tmp_path, 40, seed=11, if_per_task=1)
    model, processor = load_model(str(SHIPPED), dtype="float32", device="cpu")
    model.set_attn_implementation("eager")
    scenes = [s for _, s in read_jsonl(tmp_path / "scenes.jsonl")]
    table = lookup_attention(model, processor, scenes, tmp_path / "images")
    layers, heads = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    assert set(table) == {(k, w) for k in ("color", "shape") for w in ("word", "last")}
    assert all(t.shape == (layers, heads, 2) and t.min() >= 0 and t.max() <= 1 for t in table.values())
    named, other = table["color", "word"][0].unbind(-1)
    assert (named - 5 * other).max() > 0.5
    named, other = table["shape", "last"][: layers - 1].unbind(-1)
    assert (named - 5 * other).max() > 0.5
