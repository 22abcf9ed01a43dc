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
    assert vqa_acc >= 0.6, vqa_acc  # measured 0.844 on 500 held-out; the target (0.9) is not met yet
    assert if_rate >= 0.6, if_rate  # measured 0.900 on the 160-prompt suite
