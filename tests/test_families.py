"""The contract of `unclutter.apply`, checked the same way on a tiny random model of every supported family.

Each family's tiny model, processor and prompt format come from `unclutter.models.tiny.tiny_vlm`.
References are independent of the code under test: stock transformers (gamma 0, ratio 1.0, remove),
the naive loop implementation of Eq. 9-11 (`reference.py`), and one uncached forward over the tokens
that cached `generate` produced. Family-specific behaviour (tiles, videos, several images) is tested in
each family's own file. ``UNCLUTTER_TEST_DEVICE=cuda`` runs the same contract on a GPU (`helpers.DEVICE`).
"""

import importlib.util
import re

import pytest
import torch
from helpers import (
    DEVICE,
    assert_cached_equals_full,
    assert_sample_equals_alone,
    extend,
    generate,
    logits,
    random_image,
)
from reference import reference_logits

import unclutter
from unclutter import CMAIConfig, SPDConfig, VMTCConfig
from unclutter.cmai import gamma_schedule
from unclutter.models.tiny import FAMILIES, tiny_vlm

pytestmark = pytest.mark.exact

QUESTIONS = ["what is the color of the shape ? please answer in one word .", "how many ?"]
STEPS = 5  # greedy decoding steps
# families whose tiny model exists; test_every_supported_family_has_a_tiny_model fails while one is missing
BUILT = [f for f in FAMILIES if f == "llava" or importlib.util.find_spec(f"unclutter.models.tiny_{f}")]
TOKEN_REDUCTION = [f for f in BUILT if tiny_vlm(f).vmtc]
REDUCTIONS = [(f, "vmtc") for f in TOKEN_REDUCTION] + [(f, "spd") for f in BUILT if tiny_vlm(f).spd]


def test_every_supported_family_has_a_tiny_model():
    assert list(FAMILIES) == BUILT
    names = {name for a in unclutter.integrations.ADAPTERS for name in a.classes}
    for family in FAMILIES:
        model = tiny_vlm(family).model()
        assert type(model).__name__ in names and type(model.model).__name__ in names


def _setup(name: str):
    """(family, model, processor, two images of the family's size), the model built after seeding 0."""
    family = tiny_vlm(name)
    torch.manual_seed(0)
    model, processor = family.model().to(DEVICE), family.processor()
    return family, model, processor, [random_image(0, family.image_size), random_image(1, family.image_size)]


@pytest.fixture(params=BUILT)
def setup(request):
    return _setup(request.param)


def _batch(family, processor, images, questions=QUESTIONS):
    return family.batch(processor, images, questions).to(DEVICE)


def _valid(batch):
    return batch["attention_mask"].bool()


def _image_tokens(model, batch) -> list[int]:
    adapter = unclutter.integrations.base.adapter_for(model)(model)
    media = torch.tensor(adapter.media_token_ids(), device=batch["input_ids"].device)
    return torch.isin(batch["input_ids"], media).sum(dim=1).tolist()


# ---- CMAI on every family ---------------------------------------------------------------------------


def test_cmai_gamma_zero_equals_stock(setup):
    family, model, processor, images = setup
    batch = _batch(family, processor, images)
    stock = logits(model, batch)
    with unclutter.apply(model, processor, cmai=CMAIConfig(gamma_max=0.0)):
        got = logits(model, batch)
    torch.testing.assert_close(got[_valid(batch)], stock[_valid(batch)], atol=1e-5, rtol=1e-5)


def test_cmai_equals_naive_reference_and_changes_the_logits(setup):
    family, model, processor, images = setup
    batch = _batch(family, processor, images)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded for this test"
    gammas = gamma_schedule(model.config.get_text_config().num_hidden_layers, 0.6)
    expected = reference_logits(model, batch, gammas)
    stock = logits(model, batch)
    with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)):
        got = logits(model, batch)
    valid = _valid(batch)
    torch.testing.assert_close(got[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)
    assert (got[valid] - stock[valid]).abs().max() > 1e-3, "gamma 0.6 must change the logits"


def test_cmai_cached_decode_equals_one_full_forward(setup):
    family, model, processor, images = setup
    batch = _batch(family, processor, images)
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        gen, _ = assert_cached_equals_full(model, batch, STEPS)
    stock = generate(model, batch, STEPS)
    gaps = [(a - b).abs().amax().item() for a, b in zip(gen.logits[1:], stock.logits[1:], strict=True)]
    assert all(g > 1e-4 for g in gaps), f"CMAI must act at every decode step, not only the prefill: {gaps}"


def test_cmai_static_cache_decode_equals_full_forward_and_dynamic_cache(setup):
    """``cache_implementation="static"``: `generate` hands each layer a fixed buffer with empty slots (and builds 4D
    masks ahead), so key index = position there; a padded batch (the general path) and one prompt (the fast one).
    VMTC too where the family reduces tokens."""
    family, model, processor, images = setup
    methods = {"cmai": CMAIConfig(), **({"vmtc": VMTCConfig()} if family.vmtc else {})}
    with unclutter.apply(model, processor, **methods) as handle:
        for images_, questions in ((images, QUESTIONS), (images[:1], QUESTIONS[:1])):
            batch = _batch(family, processor, images_, questions)
            static = generate(model, batch, STEPS, cache_implementation="static")
            fast = handle.cmai_state.fast_steps  # calls of the static generation that took the fast path
            whole = extend(batch, static.sequences[:, :-1])
            # the padding CMAI read from those 4D masks is the processor's
            assert torch.equal(handle.cmai_state.pad, whole["attention_mask"].bool())
            full = logits(model, whole)[:, -STEPS:]
            for t in range(STEPS):
                torch.testing.assert_close(static.logits[t], full[:, t], atol=1e-4, rtol=1e-4)
            dynamic = generate(model, batch, STEPS)
            assert torch.equal(static.sequences, dynamic.sequences)
            for a, b in zip(static.logits, dynamic.logits, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            assert fast == handle.cmai_state.fast_steps and (fast > 0) == (len(images_) == 1)


def test_cmai_batch_equals_single(setup):
    family, model, processor, images = setup
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        together = generate(model, _batch(family, processor, images), STEPS)
        for i in range(2):
            alone = _batch(family, processor, images[i : i + 1], QUESTIONS[i : i + 1])
            assert_sample_equals_alone(model, together, i, alone)


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
            scores = logits(model, extend(batch, seq))[0, prompt - 1 : -1]
            logp = scores.log_softmax(-1).gather(1, seq[0, prompt:, None]).sum()
            torch.testing.assert_close(beams.sequences_scores[i], logp, atol=1e-4, rtol=1e-4)


def test_a_generated_placeholder_does_not_stop_generation(setup):
    """`generate` forced to emit the family's image placeholder once (random models do it unforced) goes on, VMTC
    active where the family has it, and CMAI counts that token as no text row (like a structural marker); exactness
    is tested on LLaVA."""
    family, model, processor, images = setup
    media = unclutter.integrations.base.adapter_for(model)(model).media_token_ids()[0]

    def force(token, prompt):
        def processor_(input_ids, scores):
            if input_ids.shape[1] == prompt + 1:
                scores = torch.full_like(scores, float("-inf"))
                scores[:, token] = 0.0
            return scores

        return processor_

    counts = {}
    vmtc = {"vmtc": VMTCConfig()} if family.vmtc else {}
    with unclutter.apply(model, processor, cmai=CMAIConfig(), **vmtc) as handle, torch.no_grad():
        batch = _batch(family, processor, images[:1], QUESTIONS[:1])  # expanded for the compressed count
        prompt = batch["input_ids"].shape[1]
        for token in (media, 0):  # the placeholder, then an ordinary token in its place
            out = model.generate(
                **batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=[],
                logits_processor=[force(token, prompt)],
            )  # fmt: skip
            assert out[0, prompt + 1].item() == token and out.shape[1] == prompt + 3
            counts[token] = handle.cmai_state.text_count.tolist()
    assert counts[media] == [counts[0][0] - 1], counts


def test_chunked_prefill_is_exact_or_refused(setup):
    """generate's chunked prefill (``prefill_chunk_size``; the images are encoded first and each chunk gets the
    features of its placeholders): chunks that keep every image token in the first one equal one uncached full
    forward and the unchunked run; chunks that split the image tokens are refused (a text row's focus quantile spans
    all image tokens of its prompt), never silently wrong. VMTC active where the family has it; VMTC alone takes any
    chunks."""
    family, model, processor, images = setup
    vmtc = {"vmtc": VMTCConfig()} if family.vmtc else {}

    def run(chunk):
        with torch.no_grad():
            return model.generate(
                **batch, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, output_logits=True,
                return_dict_in_generate=True, prefill_chunk_size=chunk,
            )  # fmt: skip

    with unclutter.apply(model, processor, cmai=CMAIConfig(), **vmtc) as handle:
        batch = _batch(family, processor, images)
        media = torch.isin(batch["input_ids"], torch.tensor(handle.adapter.media_token_ids(), device=DEVICE))
        columns = media.any(dim=0).nonzero()[:, 0]
        first, last, length = int(columns[0]), int(columns[-1]), batch["input_ids"].shape[1]
        assert last + 1 < length, "the prompt must go on after its images for a second chunk"
        whole, chunked = run(None), run(last + 1)
        full = logits(model, extend(batch, chunked.sequences[:, :-1]))
        for t in range(STEPS):
            torch.testing.assert_close(chunked.logits[t], full[:, length - 1 + t], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(chunked.logits[t], whole.logits[t], atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="prefill_chunk_size=None"):
            run(first + 1)
    if not family.vmtc:
        return
    # without CMAI, chunks may split the image tokens: each gets its share of the (compressed) features. Ratio 1.0
    # equals stock's chunked run; at ratio 0.5 a split changes nothing wherever it changes nothing in stock (Gemma 3's
    # image tokens attend to each other both ways, so there a chunk that splits an image changes stock's logits too)
    batch = _batch(family, processor, images)
    stock_whole, stock_split = run(None), run(first + 1)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=1.0)):
        same = run(first + 1)
    assert torch.equal(same.sequences, stock_split.sequences)
    for a, b in zip(same.logits, stock_split.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    pairs = zip(stock_whole.logits, stock_split.logits, strict=True)
    stock_invariant = all(torch.allclose(a, b, atol=1e-4) for a, b in pairs)
    assert stock_invariant or family.family == "gemma3"
    with unclutter.apply(model, processor, **vmtc):
        batch = _batch(family, processor, images)
        whole, split = run(None), run(first + 1)
    if stock_invariant:
        assert torch.equal(split.sequences, whole.sequences)
        for a, b in zip(split.logits, whole.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


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
    stock = logits(model, batch)
    attn = model.config.get_text_config()._attn_implementation
    hooks = [(n, list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()]
    kwargs = {"vmtc": VMTCConfig()} if family.vmtc else {}
    handle = unclutter.apply(model, processor, cmai=CMAIConfig(), **kwargs)
    generate(model, _batch(family, processor, images), steps=2)
    handle.remove()
    again = _batch(family, processor, images)
    assert all(torch.equal(again[k], batch[k]) for k in batch if isinstance(batch[k], torch.Tensor))
    assert torch.equal(logits(model, batch), stock)
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
        others = [m for m in ("VMTC", "SPD") if m != name and getattr(family, m.lower())]
        available = " and ".join([*others, "CMAI"]) + (" are" if others else " is")  # what the family does take
        with pytest.raises(NotImplementedError, match=f"{name} is not available for .* yet; {available}\\."):
            unclutter.apply(model, processor, **kwargs)


def test_another_familys_processor_is_refused(setup):
    """Every processor has the expansion hooks unclutter patches: another family's was accepted and failed later,
    in the model or in unclutter's own hooks (a KeyError), or silently expanded the wrong count."""
    family, model, processor, images = setup
    other = tiny_vlm("gemma3" if family.family != "gemma3" else "llava").processor()
    for kwargs in ({"vmtc": VMTCConfig()} if family.vmtc else {}, {"cmai": CMAIConfig()}):
        with pytest.raises(TypeError, match=f"takes its own processor .*got {type(other).__name__}"):
            unclutter.apply(model, other, **kwargs)
        assert "_unclutter_handle" not in vars(unclutter.integrations.base.adapter_for(model)(model).base)


# ---- VMTC and SPD where the family supports them ------------------------------------------------------


@pytest.fixture(params=TOKEN_REDUCTION)
def reducing(request):
    return _setup(request.param)


@pytest.mark.parametrize("name", [f for f in BUILT if tiny_vlm(f).spd])
def test_an_impossible_spd_grid_names_the_largest_possible_one(name):
    """Every SPD family's refusal of a grid above its grid of tokens says which grids work (most said only "larger
    than the NxN grid"); the grid it names is accepted and the one above it is not."""
    family, model, processor, _ = _setup(name)
    with pytest.raises(ValueError, match=r"choose grid <= \d+") as refused:
        unclutter.apply(model, processor, spd=SPDConfig(grid=99))
    largest = int(re.search(r"choose grid <= (\d+)", str(refused.value)).group(1))
    unclutter.apply(model, processor, spd=SPDConfig(grid=largest)).remove()
    with pytest.raises(ValueError, match=f"choose grid <= {largest}"):
        unclutter.apply(model, processor, spd=SPDConfig(grid=largest + 1))


def test_vmtc_ratio_one_is_stock(reducing):
    family, model, processor, images = reducing
    batch = _batch(family, processor, images)
    stock = logits(model, batch)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=1.0)):
        again = _batch(family, processor, images)
        assert torch.equal(again["input_ids"], batch["input_ids"])
        assert torch.equal(logits(model, again), stock)


@pytest.mark.parametrize("name, method", REDUCTIONS)
def test_half_the_tokens_reach_the_llm_and_the_processor_agrees(name, method):
    family, model, processor, images = _setup(name)
    stock_counts = _image_tokens(model, _batch(family, processor, images))
    cfg = {"vmtc": VMTCConfig(ratio=0.5)} if method == "vmtc" else {"spd": SPDConfig(grid=2)}
    with unclutter.apply(model, processor, **cfg):
        batch = _batch(family, processor, images)
        counts = _image_tokens(model, batch)
        logits(model, batch)  # the model's features fill exactly the processor's placeholders
    for got, stock in zip(counts, stock_counts, strict=True):
        assert got < stock
        if method == "vmtc":
            assert abs(got - stock / 2) <= 0.1 * stock, (got, stock)


def test_vmtc_cmai_cached_decode_equals_full_and_batch_equals_single(reducing):
    family, model, processor, images = reducing
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()):
        together, _ = assert_cached_equals_full(model, _batch(family, processor, images), STEPS)
        for i in range(2):
            alone = _batch(family, processor, images[i : i + 1], QUESTIONS[i : i + 1])
            assert_sample_equals_alone(model, together, i, alone, tokens=False)


def test_inputs_made_under_inference_mode_generate_alike(reducing):
    """Serving code builds inputs inside `torch.inference_mode` (inference tensors have no version counter)."""
    family, model, processor, images = reducing
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()):
        expected = generate(model, _batch(family, processor, images), steps=5).sequences
        with torch.inference_mode():
            batch = family.batch(processor, images, QUESTIONS).to(DEVICE)
            got = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


def test_a_trained_tower_backpropagates_through_vmtc_and_cmai(reducing):
    """Fine-tuning the vision tower with the method on: backward through every stage (towers that rank by received
    attention failed, their fused score pass was in place). The tower's parameters get gradients where stock's do."""
    family, model, processor, images = reducing
    model.train()

    def tower_grads(**cfg) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        with unclutter.apply(model, processor, **cfg):
            batch = _batch(family, processor, images)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            model(**batch, labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if any(t in n for t in ("vision", "visual"))}

    stock, method = tower_grads(), tower_grads(vmtc=VMTCConfig(), cmai=CMAIConfig())
    assert [n for n, g in method.items() if g is None] == [n for n, g in stock.items() if g is None]
    reached = [g for g in method.values() if g is not None]
    assert reached and all(torch.isfinite(g).all() for g in reached)
    assert sum(bool(g.any()) for g in reached) > len(reached) // 2
