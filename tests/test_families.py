"""The contract of `unclutter.apply`, checked the same way on a tiny random model of every supported family.

Each family's tiny model, processor and prompt format come from `unclutter.models.tiny.tiny_vlm`.
References are independent of the code under test: stock transformers (gamma 0, ratio 1.0, remove),
the naive loop implementation of Eq. 9-11 (`reference.py`), and one uncached forward over the tokens
that cached `generate` produced. Family-specific behaviour (tiles, videos, several images) is tested in
each family's own file.
"""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from reference import reference_logits

import unclutter
from unclutter import CMAIConfig, SPDConfig, VMTCConfig
from unclutter.cmai import gamma_schedule
from unclutter.models.tiny import FAMILIES, tiny_vlm

pytestmark = pytest.mark.exact

QUESTIONS = ["what is the color of the shape ? please answer in one word .", "how many ?"]
# families whose tiny model exists; test_every_supported_family_has_a_tiny_model fails while one is missing
BUILT = [f for f in FAMILIES if f == "llava" or importlib.util.find_spec(f"unclutter.models.tiny_{f}")]
TOKEN_REDUCTION = [f for f in BUILT if tiny_vlm(f).vmtc]
REDUCTIONS = [(f, "vmtc") for f in TOKEN_REDUCTION] + [(f, "spd") for f in BUILT if tiny_vlm(f).spd]


def _image(seed: int, size: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def test_every_supported_family_has_a_tiny_model():
    assert list(FAMILIES) == BUILT
    names = {name for a in unclutter.integrations.ADAPTERS for name in a.classes}
    for family in FAMILIES:
        model = tiny_vlm(family).model()
        assert type(model).__name__ in names and type(model.model).__name__ in names


@pytest.fixture(params=BUILT)
def family(request):
    return tiny_vlm(request.param)


@pytest.fixture
def setup(family):
    torch.manual_seed(0)
    model, processor = family.model(), family.processor()
    images = [_image(0, family.image_size), _image(1, family.image_size)]
    return family, model, processor, images


def _batch(family, processor, images, questions=QUESTIONS):
    return family.batch(processor, images, questions)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def _valid(batch):
    return batch["attention_mask"].bool()


def _generate(model, batch, steps=5, **kw):
    with torch.no_grad():
        return model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **kw,
        )  # fmt: skip


def _extend(batch, sequences):
    """The processor's inputs for one uncached forward over prompt + generated tokens."""
    ids = batch["input_ids"]
    extra = sequences.shape[1] - ids.shape[1]
    out = dict(batch)
    out["input_ids"] = sequences
    for name, value in batch.items():
        if name != "input_ids" and isinstance(value, torch.Tensor) and value.shape[:2] == ids.shape:
            fill = torch.ones if name == "attention_mask" else torch.zeros
            out[name] = torch.cat([value, fill(ids.shape[0], extra, dtype=value.dtype)], dim=1)
    return out


def _assert_cached_equals_full(model, batch, steps=5):
    gen = _generate(model, batch, steps)
    full = _logits(model, _extend(batch, gen.sequences[:, :-1]))
    first = gen.sequences.shape[1] - 1 - steps
    for t in range(steps):
        torch.testing.assert_close(gen.logits[t], full[:, first + t], atol=1e-4, rtol=1e-4)
    return gen


def _image_tokens(model, batch) -> list[int]:
    adapter = unclutter.integrations.base.adapter_for(model)(model)
    media = torch.tensor(adapter.media_token_ids())
    return torch.isin(batch["input_ids"], media).sum(dim=1).tolist()


# ---- CMAI on every family ---------------------------------------------------------------------------


def test_cmai_gamma_zero_equals_stock(setup):
    family, model, processor, images = setup
    batch = _batch(family, processor, images)
    stock = _logits(model, batch)
    with unclutter.apply(model, processor, cmai=CMAIConfig(gamma_max=0.0)):
        got = _logits(model, batch)
    torch.testing.assert_close(got[_valid(batch)], stock[_valid(batch)], atol=1e-5, rtol=1e-5)


def test_cmai_equals_naive_reference_and_changes_the_logits(setup):
    family, model, processor, images = setup
    batch = _batch(family, processor, images)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded for this test"
    gammas = gamma_schedule(model.config.get_text_config().num_hidden_layers, 0.6)
    expected = reference_logits(model, batch, gammas)
    stock = _logits(model, batch)
    with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)):
        got = _logits(model, batch)
    valid = _valid(batch)
    torch.testing.assert_close(got[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)
    assert (got[valid] - stock[valid]).abs().max() > 1e-3, "gamma 0.6 must change the logits"


def test_cmai_cached_decode_equals_one_full_forward(setup):
    family, model, processor, images = setup
    batch = _batch(family, processor, images)
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        gen = _assert_cached_equals_full(model, batch)
    stock = _generate(model, batch)
    gaps = [(a - b).abs().amax().item() for a, b in zip(gen.logits[1:], stock.logits[1:], strict=True)]
    assert all(g > 1e-4 for g in gaps), f"CMAI must act at every decode step, not only the prefill: {gaps}"


def test_cmai_batch_equals_single(setup):
    family, model, processor, images = setup
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        together = _generate(model, _batch(family, processor, images))
        for i in range(2):
            alone = _generate(model, _batch(family, processor, images[i : i + 1], QUESTIONS[i : i + 1]))
            assert torch.equal(together.sequences[i, -5:], alone.sequences[0, -5:])
            for t in range(5):
                torch.testing.assert_close(together.logits[t][i], alone.logits[t][0], atol=5e-5, rtol=1e-4)


def test_cmai_sampled_and_beam_generation(setup):
    family, model, processor, images = setup
    batch = _batch(family, processor, images[:1], QUESTIONS[:1])
    steps = 4
    with unclutter.apply(model, processor, cmai=CMAIConfig()), torch.no_grad():
        torch.manual_seed(0)
        sampled = model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=True, top_k=5)
        assert sampled.shape[1] == batch["input_ids"].shape[1] + steps
        beams = model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, num_beams=3, num_return_sequences=3,
            do_sample=False, length_penalty=0.0, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        prompt = batch["input_ids"].shape[1]
        for i in range(3):  # beam scores under cached CMAI = log-probs of one uncached CMAI forward
            seq = beams.sequences[i : i + 1]
            logits = _logits(model, _extend(batch, seq))[0, prompt - 1 : -1]
            logp = logits.log_softmax(-1).gather(1, seq[0, prompt:, None]).sum()
            torch.testing.assert_close(beams.sequences_scores[i], logp, atol=1e-4, rtol=1e-4)


def test_base_model_class_is_accepted(setup):
    family, model, processor, images = setup
    batch = _batch(family, processor, images)
    base = model.model
    with torch.no_grad():
        stock = base(**batch, use_cache=False).last_hidden_state
        with unclutter.apply(base, cmai=CMAIConfig()):
            got = base(**batch, use_cache=False).last_hidden_state
        again = base(**batch, use_cache=False).last_hidden_state
    assert (got - stock)[_valid(batch)].abs().max() > 1e-4
    assert torch.equal(again, stock)


def test_remove_restores_model_and_processor_exactly(setup):
    family, model, processor, images = setup
    batch = _batch(family, processor, images)
    stock = _logits(model, batch)
    attn = model.config.get_text_config()._attn_implementation
    hooks = [(n, list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()]
    kwargs = {"vmtc": VMTCConfig()} if family.vmtc else {}
    handle = unclutter.apply(model, processor, cmai=CMAIConfig(), **kwargs)
    _generate(model, _batch(family, processor, images), steps=2)
    handle.remove()
    again = _batch(family, processor, images)
    assert all(torch.equal(again[k], batch[k]) for k in batch if isinstance(batch[k], torch.Tensor))
    assert torch.equal(_logits(model, batch), stock)
    assert model.config.get_text_config()._attn_implementation == attn
    assert [(n, list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()] == hooks
    for module in model.modules():
        assert "forward" not in vars(module) and "_unclutter_cmai" not in vars(module)
    assert not any(k.startswith("_unclutter") for k in vars(model.model))
    unclutter.apply(model, processor, cmai=CMAIConfig()).remove()  # can be applied again


def test_token_reduction_on_a_family_without_it_is_a_clear_error(setup):
    family, model, processor, images = setup
    for kwargs in ({"vmtc": VMTCConfig()}, {"spd": SPDConfig(grid=2)}):
        name = "VMTC" if "vmtc" in kwargs else "SPD"
        if getattr(family, name.lower()):
            continue
        with pytest.raises(NotImplementedError, match=f"{name} is not available for"):
            unclutter.apply(model, processor, **kwargs)


# ---- VMTC and SPD where the family supports them ------------------------------------------------------


@pytest.fixture(params=TOKEN_REDUCTION)
def reducing(request):
    family = tiny_vlm(request.param)
    torch.manual_seed(0)
    return family, family.model(), family.processor(), [_image(0, family.image_size), _image(1, family.image_size)]


def test_vmtc_ratio_one_is_stock(reducing):
    family, model, processor, images = reducing
    batch = _batch(family, processor, images)
    stock = _logits(model, batch)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=1.0)):
        again = _batch(family, processor, images)
        assert torch.equal(again["input_ids"], batch["input_ids"])
        assert torch.equal(_logits(model, again), stock)


@pytest.mark.parametrize("name, method", REDUCTIONS)
def test_half_the_tokens_reach_the_llm_and_the_processor_agrees(name, method):
    family = tiny_vlm(name)
    torch.manual_seed(0)
    model, processor = family.model(), family.processor()
    images = [_image(0, family.image_size), _image(1, family.image_size)]
    stock_counts = _image_tokens(model, _batch(family, processor, images))
    cfg = {"vmtc": VMTCConfig(ratio=0.5)} if method == "vmtc" else {"spd": SPDConfig(grid=2)}
    with unclutter.apply(model, processor, **cfg):
        batch = _batch(family, processor, images)
        counts = _image_tokens(model, batch)
        _logits(model, batch)  # the model's features fill exactly the processor's placeholders
    for got, stock in zip(counts, stock_counts, strict=True):
        assert got < stock
        if method == "vmtc":
            assert abs(got - stock / 2) <= 0.1 * stock, (got, stock)


def test_vmtc_cmai_cached_decode_equals_full_and_batch_equals_single(reducing):
    family, model, processor, images = reducing
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()):
        together = _assert_cached_equals_full(model, _batch(family, processor, images))
        for i in range(2):
            alone = _generate(model, _batch(family, processor, images[i : i + 1], QUESTIONS[i : i + 1]))
            for t in range(5):
                torch.testing.assert_close(together.logits[t][i], alone.logits[t][0], atol=5e-5, rtol=1e-4)
