"""Never silent: every state CMAI relies on is checked where it is used, and the tested range is enforced.

These tests do not compare two paths through the same hook: they compare cached decoding with stock
and with one uncached forward, and they break the integration's inputs on purpose (a cache the hook
cannot see, a layer called without the hook, a foreign cache) and expect a loud error.
"""

import warnings

import pytest
import torch
from conftest import encode
from transformers import StaticCache

import unclutter
from unclutter import CMAIConfig, compat
from unclutter.integrations import base
from unclutter.integrations.cmai_attention import CMAIStateError

pytestmark = pytest.mark.exact  # the exactness suite CI runs on both ends of the transformers range


def _generate(model, batch, steps=6):
    return model.generate(
        **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip


def _full_logits(model, batch, sequences):
    """Logits of one uncached forward over prompt + generated tokens, at the positions that predict them."""
    seq = sequences[:, :-1]
    extra = torch.ones(seq.shape[0], seq.shape[1] - batch["input_ids"].shape[1], dtype=torch.long)
    mask = torch.cat([batch["attention_mask"], extra], 1)
    return model(input_ids=seq, attention_mask=mask, pixel_values=batch["pixel_values"], use_cache=False).logits


def test_cmai_changes_every_decode_step_and_equals_one_full_forward(model, processor, images):
    """The 5.24 bug (decode steps silently stock) fails both halves of this test."""
    batch = encode(processor, images)
    steps = 6
    with torch.no_grad():
        with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)):
            gen = _generate(model, batch, steps)
            full_cmai = _full_logits(model, batch, gen.sequences)
        full_stock = _full_logits(model, batch, gen.sequences)  # stock model, same tokens
    first = gen.sequences.shape[1] - 1 - steps
    for t in range(steps):
        decoded = gen.logits[t]
        torch.testing.assert_close(decoded, full_cmai[:, first + t], atol=1e-4, rtol=1e-4)
        # CMAI must act at every step, not only in the prefill (with stock decoding the gap is ~10x smaller)
        gap = (decoded - full_stock[:, first + t]).abs().amax().item()
        assert gap > 1e-2, f"decode step {t}: CMAI changed the logits by only {gap:.2e}"


def test_a_cache_the_hook_cannot_find_fails_at_the_first_decode_step(model, processor, images, monkeypatch):
    """What a future rename of the cache argument looks like: the pre-hook sees no cache."""
    monkeypatch.setattr(base, "find_cache", lambda args, kwargs: None)
    batch = encode(processor, images)
    with (
        unclutter.apply(model, cmai=CMAIConfig()),
        torch.no_grad(),
        pytest.raises(CMAIStateError, match=r"did not find this call's cache.*transformers 5\.\d+"),
    ):
        model.generate(**batch, max_new_tokens=3, do_sample=False)


def test_layer_called_without_the_pre_hook_fails(model, processor, images):
    batch = encode(processor, images)
    embeds = model.model.get_input_embeddings()(batch["input_ids"])
    with (
        unclutter.apply(model, cmai=CMAIConfig()),
        torch.no_grad(),
        pytest.raises(CMAIStateError, match="pre-hook never ran"),
    ):
        model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


def test_a_stale_chunk_with_other_lengths_fails(model, processor, images):
    """The pre-hook ran for another call: the layer's query count does not match."""
    batch = encode(processor, images)
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad():
        model(**batch)
        embeds = model.model.get_input_embeddings()(batch["input_ids"][:, :-2])
        with pytest.raises(CMAIStateError, match="queries but the forward pre-hook saw"):
            model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"][:, :-2])


def test_a_foreign_cache_fails(model, processor, images):
    """A cache whose prefill ran without CMAI (before apply, or on another model) cannot be continued under it."""
    batch = encode(processor, images)
    with torch.no_grad():
        foreign = compat.output_cache(model(**batch, use_cache=True))
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad():
        model(**batch, use_cache=True)
        ids = torch.ones(2, 1, dtype=torch.long)
        mask = torch.cat([batch["attention_mask"], ids], 1)
        with pytest.raises(CMAIStateError, match="whose prefill it did not see"):
            model(input_ids=ids, attention_mask=mask, **{compat.cache_argument(model): foreign})


def test_a_static_cache_driven_by_hand_decodes_as_the_dynamic_one(model, processor, images):
    """A StaticCache the caller made, a prefill with the processor's 2D mask and hand-written decode steps: the layers
    get the cache's whole buffer (more keys than tokens), and the logits are the dynamic cache's."""
    batch = encode(processor, images)
    steps = 4
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad():
        expected = _generate(model, batch, steps)
        cache = StaticCache(config=model.config.text_config, max_cache_len=batch["input_ids"].shape[1] + 16)
        out = model(**batch, use_cache=True, **{compat.cache_argument(model): cache})
        mask, got = batch["attention_mask"], [out.logits[:, -1]]
        for _ in range(steps - 1):
            ids = got[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(ids)], 1)
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{compat.cache_argument(model): cache})
            got.append(out.logits[:, -1])
    assert cache.layers[0].keys.shape[-2] == batch["input_ids"].shape[1] + 16
    for t in range(steps):
        torch.testing.assert_close(got[t], expected.logits[t], atol=1e-5, rtol=1e-5)


def test_a_mask_of_another_rank_is_refused_by_name(model, processor, images):
    batch = encode(processor, images)
    with (
        unclutter.apply(model, cmai=CMAIConfig()),
        torch.no_grad(),
        pytest.raises(ValueError, match=r"2D mask \(batch, sequence\) or a 4D one.*\(2, 1, \d+\)"),
    ):
        model(**{**batch, "attention_mask": batch["attention_mask"][:, None]})


@pytest.mark.parametrize(
    "version, inside",
    [
        ("5.23.0", True),
        ("5.24.0", True),
        ("5.25.0", True),
        ("5.25.3", True),
        ("5.22.2", False),
        ("5.26.0", False),
        ("6.0.0", False),
    ],
)
def test_tested_range(version, inside):
    assert compat.in_tested_range(version) is inside


def test_apply_warns_once_outside_the_tested_range(model, monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.99.0")
    compat.warn_if_untested.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"tested with transformers 5\.23\.0 to 5\.25\.0.*5\.99\.0"):
            unclutter.apply(model, cmai=CMAIConfig()).remove()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            unclutter.apply(model, cmai=CMAIConfig()).remove()  # once per process
    finally:
        compat.warn_if_untested.cache_clear()


def test_pyproject_admits_exactly_the_tested_range():
    import re
    from pathlib import Path

    spec = re.search(r'"(transformers[^"]*)"', (Path(__file__).parents[1] / "pyproject.toml").read_text()).group(1)
    low, high = compat.TESTED
    major, minor = (int(x) for x in high.split(".")[:2])
    assert spec == f"transformers>={low},<{major}.{minor + 1}", spec


def test_makefile_tests_the_lowest_admitted_release():
    import re
    from pathlib import Path

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert re.search(r"^LOWEST_TRANSFORMERS := (\S+)$", makefile, re.M).group(1) == compat.TESTED[0]
