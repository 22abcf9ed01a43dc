"""CMAI on a tiny LLaVA: exact against a naive reference, stock-equivalent at gamma 0, cached = full, batch = single."""

import pytest
import torch
from conftest import PROMPTS, encode, image_features
from reference import reference_logits, reference_outputs

import unclutter
from unclutter import CMAIConfig, VMTCConfig
from unclutter.compat import cache_argument, output_cache
from unclutter.integrations import cmai_attention

real_static_decode_mask = cmai_attention._static_decode_mask

pytestmark = pytest.mark.exact  # the exactness suite CI runs on both ends of the transformers range


@pytest.mark.parametrize("gamma_max", [0.3, 0.6, 0.9])
def test_cmai_equals_naive_reference_on_padded_batch(model, processor, images, gamma_max):
    batch = encode(processor, images)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded for this test"
    cfg = CMAIConfig(gamma_max=gamma_max)
    gammas = unclutter.cmai.gamma_schedule(model.config.text_config.num_hidden_layers, gamma_max)
    expected = reference_logits(model, batch, gammas)
    with unclutter.apply(model, cmai=cfg), torch.no_grad():
        got = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid].float(), atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        stock = model(**batch).logits
    assert (stock[valid] - got[valid]).abs().max() > 1e-4, "inhibition must change the output"


def test_gamma_zero_equals_stock(model, processor, images):
    batch = encode(processor, images)
    with torch.no_grad():
        stock = model(**batch).logits
        with unclutter.apply(model, processor, cmai=CMAIConfig(gamma_max=0.0)):
            got = model(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], stock[valid], atol=1e-6, rtol=1e-5)


def _generate(model, batch, steps=6, **kw):
    return model.generate(
        **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("focus", ["paper", "tia", "sum", "discounted"])
def test_cached_decode_equals_full_forward(model, processor, images, focus):
    batch = encode(processor, images)
    with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6, focus=focus)), torch.no_grad():
        gen = _generate(model, batch)
        seq = gen.sequences[:, :-1]
        mask = torch.cat([batch["attention_mask"], torch.ones(2, seq.shape[1] - batch["input_ids"].shape[1])], 1)
        full = model(input_ids=seq, attention_mask=mask.long(), pixel_values=batch["pixel_values"]).logits
    steps = len(gen.logits)
    for t in range(steps):
        torch.testing.assert_close(gen.logits[t], full[:, seq.shape[1] - steps + t], atol=2e-5, rtol=1e-4)


def test_manual_decoding_loop_equals_generate(model, processor, images):
    """A prefill that lets the model create its cache, then hand-written decode steps."""
    batch = encode(processor, images)
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad():
        gen = _generate(model, batch, steps=4)
        out = model(**batch, use_cache=True)
        cache, mask, logits = output_cache(out), batch["attention_mask"], [out.logits[:, -1]]
        for _ in range(3):
            ids = logits[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(ids)], 1)
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_argument(model): cache})
            logits.append(out.logits[:, -1])
    for t in range(4):
        torch.testing.assert_close(logits[t], gen.logits[t], atol=2e-5, rtol=1e-4)


def test_long_prompts_take_query_rows_in_chunks_with_the_same_result(model, processor, images, monkeypatch):
    """A long prompt's head-averaged attention is computed a chunk of query rows at a time (bounded memory); a budget
    of 3 rows per chunk here, for the general path (padded batch) and the fast one (one prompt), against the naive
    reference."""
    from unclutter.integrations import cmai_attention

    heads = model.config.text_config.num_attention_heads
    gammas = unclutter.cmai.gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    for batch in (encode(processor, images), encode(processor, images[:1], PROMPTS[:1])):
        expected = reference_logits(model, batch, gammas)
        width = batch["input_ids"].shape[0] * heads * batch["input_ids"].shape[1]
        monkeypatch.setattr(cmai_attention, "_LOGITS_PER_CHUNK", 3 * width)  # 3 query rows per chunk
        calls = []
        chunk = cmai_attention._chunk_head_mean_probs
        monkeypatch.setattr(
            cmai_attention, "_chunk_head_mean_probs", lambda *a, calls=calls, chunk=chunk: calls.append(1) or chunk(*a)
        )
        with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)), torch.no_grad():
            got = model(**batch).logits
        monkeypatch.undo()
        layers = sum(g > 0 for g in gammas.values())
        assert len(calls) > 2 * layers  # several chunks per inhibiting layer
        valid = batch["attention_mask"].bool()
        torch.testing.assert_close(got[valid], expected[valid].float(), atol=2e-5, rtol=1e-4)


def test_no_per_call_mask_outlives_its_call(model, processor, images):
    """A call's layouts hold (B, 1, q, K) masks (0.5 GB kept after an 8,600-token prefill): released when it returns,
    and a prefill edits its shared mask in place per layer and puts it back (the naive reference checks that)."""
    batch = encode(processor, images[:1], PROMPTS[:1])
    gammas = unclutter.cmai.gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)) as h, torch.no_grad():
        got = model(**batch).logits
        assert h.cmai_state.chunk.fast and h.cmai_state.chunk.layouts == {}
    torch.testing.assert_close(got, reference_logits(model, batch, gammas).float(), atol=2e-5, rtol=1e-4)


def test_a_general_prefill_allocates_no_text_by_text_weights(model, processor, images):
    """A padded batch (the general path) weighs each text row's earlier text rows (Eq. 9-10) with `a`'s own columns
    edited in place: no (B, q_new, q_new) float32 tensor, neither in the layout nor per layer (three were alive at
    once, 89 MiB each for 2 x 3,400 text rows)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):  # the shape of every float32 tensor an op allocates (not views, not in place)
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                fresh = isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                if fresh and t.dtype == torch.float32:
                    self.made.append(tuple(t.shape))
            return out

    batch = encode(processor, images)
    gammas = unclutter.cmai.gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)) as h, torch.no_grad(), Shapes() as shapes:
        got = model(**batch).logits
    ch = h.cmai_state.chunk
    q_new = ch.q_len - ch.start
    assert not ch.fast and q_new > 1 and q_new not in (ch.q_len, h.cmai_state.image_pos.shape[1])
    assert (2, q_new, q_new) not in shapes.made and (2, q_new, ch.q_len) in shapes.made  # (B, q_new, K): `a`
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], reference_logits(model, batch, gammas)[valid].float(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("focus", ["paper", "tia"])
def test_fast_calls_equal_a_full_forward_and_the_naive_reference(model, processor, images, focus, cache, monkeypatch):
    """One unpadded prompt takes the fast path in its prefill and decode steps (the host knows the image block, that
    nothing is padding and that every row is text); a left-padded batch takes the general one. Both against
    independent results. On a static cache every decode step takes the fixed-shape `_static_decode_mask` instead."""
    gammas = unclutter.cmai.gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    fixed = []
    monkeypatch.setattr(
        cmai_attention, "_static_decode_mask", lambda *a: fixed.append(a[1]) or real_static_decode_mask(*a)
    )
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    for batch, fast in ((encode(processor, images[:1], PROMPTS[:1]), 6), (encode(processor, images), 0)):
        fixed.clear()
        with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6, focus=focus)) as h, torch.no_grad():
            gen = _generate(model, batch, **kwargs)
            assert h.cmai_state.fast_steps == fast
            layers = model.config.text_config.num_hidden_layers
            assert len(fixed) == (layers * 5 if cache == "static" else 0)  # each decode step, every layer
            if cache == "static":  # rows for the prompt's text rows and the tokens the cache has room for after it
                image = batch["input_ids"] == model.config.image_token_id
                after = torch.arange(image.shape[1]) > image.float().argmax(dim=1, keepdim=True)
                prompt_rows = int((after & ~image & batch["attention_mask"].bool()).sum(dim=1).max())
                room = output_cache(gen).layers[0].max_cache_len - image.shape[1]
                assert h.cmai_state.text_pos.shape[1] - 1 == prompt_rows + room
            ids = gen.sequences[:, :-1]
            mask = torch.cat([batch["attention_mask"], torch.ones_like(ids[:, batch["input_ids"].shape[1] :])], 1)
            full = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
        valid = mask[:, -6:].bool()
        for t in range(6):
            torch.testing.assert_close(gen.logits[t], full[:, t - 6], atol=2e-5, rtol=1e-4)
        if focus == "paper":
            naive = reference_logits(model, {**batch, "input_ids": ids, "attention_mask": mask}, gammas).float()
            got = torch.stack(gen.logits, 1)
            torch.testing.assert_close(got[valid], naive[:, -6:][valid], atol=2e-5, rtol=1e-4)
            every = mask.bool()  # the prefill over the whole sequence too
            torch.testing.assert_close(full[every], naive[every], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("focus", ["paper", "tia"])
def test_batch_equals_single(model, processor, images, focus):
    """The padded batch takes the general path, each sample alone the fast one."""
    batch = encode(processor, images)
    with unclutter.apply(model, cmai=CMAIConfig(focus=focus)), torch.no_grad():
        together = _generate(model, batch)
        for i in range(2):
            alone = _generate(model, encode(processor, images[i : i + 1], PROMPTS[i : i + 1]))
            assert torch.equal(together.sequences[i, -6:], alone.sequences[0, -6:])
            for t in range(6):
                torch.testing.assert_close(together.logits[t][i], alone.logits[t][0], atol=2e-5, rtol=1e-4)


def test_cmai_sampled_generation_and_layer_subset(model, processor, images):
    batch = encode(processor, images)
    with unclutter.apply(model, cmai=CMAIConfig(layers=(2,), gammas=(0.5,))) as h, torch.no_grad():
        torch.manual_seed(0)
        out = model.generate(**batch, max_new_tokens=5, do_sample=True, top_k=5)
        assert out.shape == (2, batch["input_ids"].shape[1] + 5)
        assert set(h.cmai_state.rows) == {2}  # only the active layer keeps state
        n_img = int((batch["input_ids"][0] == model.config.image_token_id).sum())
        assert h.cmai_state.rows[2].shape[-1] == n_img


def test_beam_search_follows_cache_reordering(model, processor, images):
    """Beam scores under cached CMAI equal the log-probs of a full (uncached) CMAI forward."""
    batch = encode(processor, images[:1], PROMPTS[:1])
    steps = 5
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, num_beams=3, num_return_sequences=3,
            do_sample=False, length_penalty=0.0, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        prompt_len = batch["input_ids"].shape[1]
        for i in range(3):
            seq = out.sequences[i : i + 1]
            logits = model(input_ids=seq, pixel_values=batch["pixel_values"]).logits[0, prompt_len - 1 : -1]
            logp = logits.log_softmax(-1).gather(1, seq[0, prompt_len:, None]).sum()
            torch.testing.assert_close(out.sequences_scores[i], logp, atol=1e-4, rtol=1e-4)


def test_output_attentions_are_the_inhibited_weights(processor, images):
    """A model loaded with eager attention returns its attention maps; under CMAI it returned none (SDPA's). Now each
    layer's weights are the ones the inhibited attention used: stock eager's at gamma 0, the naive reference's."""
    from unclutter.models.tiny import tiny_llava

    torch.manual_seed(0)
    model = tiny_llava(attn_implementation="eager")
    batch = encode(processor, images)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        stock = model(**batch, output_attentions=True)
    gammas = unclutter.cmai.gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    expected = reference_outputs(model, batch, gammas, output_attentions=True)
    for cfg, want in ((CMAIConfig(gamma_max=0.0), stock), (CMAIConfig(gamma_max=0.6), expected)):
        with unclutter.apply(model, cmai=cfg), torch.no_grad():
            got = model(**batch, output_attentions=True)
            torch.testing.assert_close(got.logits, model(**batch).logits, atol=0, rtol=0)  # the maps change nothing
        assert len(got.attentions) == len(want.attentions) == model.config.text_config.num_hidden_layers
        for a, b in zip(got.attentions, want.attentions, strict=True):
            rows = valid[:, None, :, None] & valid[:, None, None, :]  # padding rows and keys differ by convention
            torch.testing.assert_close(a * rows, b.float() * rows, atol=2e-6, rtol=1e-4)
    inhibited = expected.attentions[-1].float() * rows == 0
    assert inhibited.sum() > (stock.attentions[-1] * rows == 0).sum()  # the last layer's maps show the inhibition


def test_one_cache_object_reused_for_beam_searches(model, processor, images):
    """A DynamicCache passed to several generations (``reset()`` between): each beam search equals one with a fresh
    cache (CMAI's rows were reordered once per earlier generation of the cache). A copy of the cache reorders
    itself, as stock's does, not the cache it was copied from."""
    import copy

    from transformers import DynamicCache

    batch = encode(processor, images[:1], PROMPTS[:1])
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False,
                  length_penalty=0.0, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad():
        fresh = model.generate(**batch, **kwargs)
        cache = DynamicCache(config=model.config.get_text_config())
        for _ in range(3):
            cache.reset()
            again = model.generate(**batch, **{cache_argument(model): cache}, **kwargs)
            assert torch.equal(again.sequences, fresh.sequences)
            torch.testing.assert_close(again.sequences_scores, fresh.sequences_scores, atol=0, rtol=0)
    copied, keys = copy.deepcopy(cache), cache.layers[0].keys.clone()
    copied.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(copied.layers[0].keys, keys[[2, 0, 1]]) and torch.equal(cache.layers[0].keys, keys)


@pytest.mark.parametrize("masked", [(0,), (0, 1)], ids=["one-sample", "every-sample"])
def test_decode_steps_whose_token_is_not_text_equal_the_naive_reference(model, processor, images, masked):
    """A decode step whose new token is no text query (here: masked out) in some or all samples stores nothing
    for them and inhibits nothing for them, and the steps after it stay exact (CMAI's decode path runs without
    the host learning which rows were text, so this is where its bookkeeping could drift)."""
    batch = encode(processor, images)
    gammas = unclutter.cmai.gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)), torch.no_grad():
        out = model(**batch, use_cache=True)
        cache, mask, ids, logits = output_cache(out), batch["attention_mask"], batch["input_ids"], []
        for step in range(4):
            new = out.logits[:, -1].argmax(-1, keepdim=True)
            keep = torch.ones_like(new)
            if step == 1:
                keep[list(masked)] = 0
            ids, mask = torch.cat([ids, new], 1), torch.cat([mask, keep], 1)
            out = model(input_ids=new, attention_mask=mask, use_cache=True, **{cache_argument(model): cache})
            logits.append(out.logits[:, -1])
        full = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
    naive = reference_logits(model, {**batch, "input_ids": ids, "attention_mask": mask}, gammas)
    for t in (0, 2, 3):  # the steps whose own token is real
        torch.testing.assert_close(logits[t], full[:, t - 4], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(logits[t], naive[:, t - 4].float(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_decode_step_syncs_the_host_once_whatever_the_depth(model, processor, images, monkeypatch, cache):
    """On a GPU every host-device sync stalls the launch queue; CMAI's decode step has one (the check that no
    image token arrives after the prefill), not one per layer. On a static cache reading its length is one more
    (stock reads it too), and the fixed-shape layers add none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncs = {"aten._local_scalar_dense", "aten.nonzero", "aten.nonzero_numpy", "aten.is_nonzero", "aten.item"}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) in syncs:
                self.syncs.append(str(func))
            return func(*args, **(kwargs or {}))

    from transformers import StaticCache

    batch = encode(processor, images)
    assert len(unclutter.cmai.gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)) > 2
    with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)) as handle, torch.no_grad():
        given = {}
        if cache == "static":
            given[cache_argument(model)] = StaticCache(model.config.text_config, batch["input_ids"].shape[1] + 4)
        out = model(**batch, use_cache=True, **given)
        new = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], 1)
        with Count() as count, monkeypatch.context() as patch:
            tolist = torch.Tensor.tolist  # a host copy that is no ATen call on CPU (it is one on a GPU)
            patch.setattr(torch.Tensor, "tolist", lambda t: count.syncs.append("tolist") or tolist(t))
            model(input_ids=new, attention_mask=mask, use_cache=True, **{cache_argument(model): output_cache(out)})
        state = handle.cmai_state
        assert state.static_tokens == (batch["input_ids"].shape[1] + 4 if cache == "static" else 0)
        assert (state.chunk.length is not None) == (cache == "static")  # the step took the fixed-shape layers
    assert len(count.syncs) == (2 if cache == "static" else 1), count.syncs


@pytest.mark.parametrize("samples", [1, 2], ids=["fast-path", "padded-batch"])
def test_a_generated_image_placeholder_is_neither_image_key_nor_text(model, processor, images, samples):
    """A random model may sample its own `<image>` id; with no image features behind it the model embeds it as an
    ordinary token, and CMAI treats it like a structural marker (no image key, no text query) instead of stopping
    the generation. Every step equals the naive reference, run on the same embeddings with that position's role
    set to structural."""
    batch = encode(processor, images[:samples], PROMPTS[:samples])
    image_id, sentinel = model.config.image_token_id, -7  # the sentinel marks the generated placeholder's role
    gammas = unclutter.cmai.gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)) as handle, torch.no_grad():
        out = model(**batch, use_cache=True)
        cache, mask, ids, got = output_cache(out), batch["attention_mask"], batch["input_ids"], []
        for step in range(4):
            new = out.logits[:, -1].argmax(-1, keepdim=True)
            if step == 1:
                new = torch.full_like(new, image_id)
            ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
            out = model(input_ids=new, attention_mask=mask, use_cache=True, **{cache_argument(model): cache})
            got.append(out.logits[:, -1])
        # the prefill and three steps take the fast path in a single sample; the placeholder's step, the general one
        assert handle.cmai_state.fast_steps == (4 if samples == 1 else 0)
    prompt = batch["input_ids"].shape[1]
    embeds = model.get_input_embeddings()(ids)
    embeds[:, :prompt][batch["input_ids"] == image_id] = image_features(model, batch).flatten(0, 1)
    roles = ids.clone()
    roles[:, prompt + 1] = sentinel
    naive = reference_logits(
        model, {"inputs_embeds": embeds, "attention_mask": mask}, gammas, roles=roles, structural=[sentinel]
    )
    for t in range(4):
        torch.testing.assert_close(got[t], naive[:, prompt + t].float(), atol=2e-5, rtol=1e-4)


def test_images_after_the_prefill_are_refused(model, processor, images):
    """Image keys come from the prefill: a later call that brings image features with its image tokens stops."""
    batch = encode(processor, images[:1], PROMPTS[:1])
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad():
        out = model(**batch, use_cache=True)
        again = {**batch, "attention_mask": torch.cat([batch["attention_mask"], batch["attention_mask"]], 1)}
        with pytest.raises(ValueError, match="every image in the first forward call"):
            model(**again, use_cache=True, **{cache_argument(model): output_cache(out)})


@pytest.mark.filterwarnings("ignore")
def test_torch_compile_with_cmai(model, processor, images):
    """torch.compile (inductor, on CPU) of a model with CMAI equals eager: CMAI's mask bookkeeping runs eagerly (a
    graph break); compiled, inductor generated C++ that did not build (bool and float vector masks mixed)."""
    batch = encode(processor, images)
    with unclutter.apply(model, processor, cmai=CMAIConfig()), torch.no_grad():
        expected = model(**batch, use_cache=False).logits
        got = torch.compile(model, backend="inductor")(**batch, use_cache=False).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_generate_compiles_the_static_decode_step_with_cmai(model, processor, images):
    """`generate` compiles the decode step of a static cache (on a GPU by itself; here the config asks for it on
    CPU, with dynamo's aot_eager backend): CMAI's hooks and per-layer masks run eagerly between the compiled graphs,
    and the tokens and logits are eager's, for a padded batch (general path) and one prompt (fast path)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers' own switch for compiling on CPU (its tests use it)
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad():
        for batch in (encode(processor, images), encode(processor, images[:1], PROMPTS[:1])):
            torch._dynamo.reset()  # (each case compiles afresh: none falls back to eager on a recompile limit)
            counters.clear()
            eager = _generate(model, batch, steps=4, cache_implementation="static", disable_compile=True)
            compiled = _generate(model, batch, steps=4, cache_implementation="static", compile_config=config)
            assert torch.equal(compiled.sequences, eager.sequences)
            for a, b in zip(compiled.logits, eager.logits, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            assert counters["stats"]["unique_graphs"] > 0, "the decode step was not compiled"
    torch._dynamo.reset()


@pytest.mark.parametrize("padded", [False, True])
def test_a_static_decode_step_compiles_to_one_graph_with_cmai_inside(model, processor, images, padded):
    """The step CUDA graphs would replay: on a static cache, a decode step (one prompt, or a left-padded batch) traces
    to one graph that holds every layer's attention and CMAI's inhibition (its quantiles' sorts), with eager's
    logits; only the VLM's forward hooks run eagerly, before and after it."""
    from transformers import StaticCache

    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    batch = encode(processor, images) if padded else encode(processor, images[:1], PROMPTS[:1])
    layers = model.config.text_config.num_hidden_layers
    torch._dynamo.reset()
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad():
        logits = []
        for step in (model, torch.compile(model, backend=keep_graph)):
            cache = StaticCache(config=model.config.text_config, max_cache_len=batch["input_ids"].shape[1] + 8)
            out = model(**batch, use_cache=True, **{cache_argument(model): cache})
            ids = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
            logits.append(step(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_argument(model): cache}))
    torch._dynamo.reset()
    torch.testing.assert_close(logits[1].logits, logits[0].logits, atol=1e-5, rtol=1e-5)

    def count(graph, name):
        return sum(name in str(node.target) for node in graph.graph.nodes)

    with_cmai = [g for g in graphs if count(g, "sort")]
    assert len(with_cmai) == 1, f"CMAI's quantiles spread over {len(with_cmai)} graphs (a graph break inside the step)"
    assert count(with_cmai[0], "scaled_dot_product_attention") == layers
    active = sum(g > 0 for g in unclutter.cmai.gamma_schedule(layers, 0.6).values())
    assert count(with_cmai[0], "sort") == active  # the quantile of every layer whose gamma is not 0


def test_a_static_cache_reset_and_reused_reuses_cmai_buffers(model, processor, images):
    """A server keeps one StaticCache and resets it between prompts (so that CUDA graphs recorded on its buffers stay
    valid); CMAI's fixed-address buffers go with it, zeroed, and the second prompt decodes as on a fresh dynamic
    cache."""
    from transformers import StaticCache

    first, second = encode(processor, images[:1], PROMPTS[:1]), encode(processor, images[1:], PROMPTS[:1])
    cache = StaticCache(config=model.config.text_config, max_cache_len=first["input_ids"].shape[1] + 8)
    with unclutter.apply(model, cmai=CMAIConfig()) as handle, torch.no_grad():
        expected = _generate(model, second)
        _generate(model, first, **{cache_argument(model): cache})
        buffers = {k: v.data_ptr() for k, v in [*handle.cmai_state.rows.items(), ("text", handle.cmai_state.text_pos)]}
        cache.reset()
        got = _generate(model, second, **{cache_argument(model): cache})
        state = handle.cmai_state
        assert {k: v.data_ptr() for k, v in [*state.rows.items(), ("text", state.text_pos)]} == buffers
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("room", [-1, 2], ids=["prompt-too-long", "generation-too-long"])
def test_a_static_cache_too_small_is_a_clear_error(model, processor, images, room):
    """A hand-made StaticCache with room for fewer tokens than the prompt (CMAI blamed a transformers upgrade, reading
    the 4D mask) or than prompt + new tokens (the cache's own index error) is refused with what to change."""
    from transformers import StaticCache

    batch = encode(processor, images[:1], PROMPTS[:1])
    cache = StaticCache(config=model.config.text_config, max_cache_len=batch["input_ids"].shape[1] + room)
    expected = pytest.raises(ValueError, match="static cache holds .* make the cache larger")
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad(), expected:
        _generate(model, batch, steps=5, **{cache_argument(model): cache})


def test_a_4d_mask_that_hides_a_key_is_kept_in_fast_decode_steps(model, processor, images):
    """A user's 4D mask may hide keys besides causality and padding (here a text key, from every later query): a fast
    decode step (one prompt, no padding) keeps the layer's mask, and cached decoding == one uncached forward with the
    same mask (the fast decode step dropped it: its token was taken to see every key)."""
    batch = encode(processor, images[:1], PROMPTS[:1])
    length, hidden_key, steps = batch["input_ids"].shape[1], batch["input_ids"].shape[1] - 3, 4

    def mask(past: int, q_len: int) -> torch.Tensor:  # (1, 1, q, past + q) bool: causal, and hidden_key hidden
        q_pos, k_pos = past + torch.arange(q_len), torch.arange(past + q_len)
        allowed = k_pos[None, :] <= q_pos[:, None]
        allowed[q_pos > hidden_key, hidden_key] = False  # each token still sees itself: none is padding
        return allowed[None, None]

    with unclutter.apply(model, cmai=CMAIConfig()) as handle, torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=mask(0, length), pixel_values=batch["pixel_values"])
        cache, ids, got = output_cache(out), batch["input_ids"], [out.logits[:, -1]]
        for _ in range(steps - 1):
            ids = torch.cat([ids, got[-1].argmax(-1, keepdim=True)], 1)
            out = model(
                input_ids=ids[:, -1:], attention_mask=mask(ids.shape[1] - 1, 1), **{cache_argument(model): cache}
            )
            got.append(out.logits[:, -1])
        assert handle.cmai_state.fast_steps == steps, "the prefill and each decode step should take the fast path"
        full = model(input_ids=ids, attention_mask=mask(0, ids.shape[1]), pixel_values=batch["pixel_values"]).logits
    for t in range(steps):
        torch.testing.assert_close(got[t], full[:, length - 1 + t], atol=1e-5, rtol=1e-5)


def test_conversations_take_turns_on_one_model(model, processor, images):
    """A conversation continued from its cache after other generations ran on the model (another user's turn) goes on
    exactly as if nothing ran in between (it was refused: CMAI's state followed only the latest prefill)."""
    first, second = encode(processor, images[:1], PROMPTS[:1]), encode(processor, images[1:], PROMPTS[1:])
    follow_up = torch.tensor([[5, 6, 7]])

    def turn_two(cache, prompt_len):
        mask = torch.ones(1, prompt_len + 3, dtype=torch.long)
        return model(input_ids=follow_up, attention_mask=mask, use_cache=True, **{cache_argument(model): cache}).logits

    with unclutter.apply(model, processor, cmai=CMAIConfig()), torch.no_grad():
        length = first["input_ids"].shape[1]
        expected = turn_two(output_cache(model(**first, use_cache=True)), length)
        cache = output_cache(model(**first, use_cache=True))
        model.generate(**second, max_new_tokens=3)  # someone else's request
        got = turn_two(cache, length)
        whole = {**first, "input_ids": torch.cat([first["input_ids"], follow_up], 1)}
        whole["attention_mask"] = torch.ones_like(whole["input_ids"])
        full = model(**whole).logits[:, length:]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def _generate_into(result: dict, model, batch, kwargs, stopping) -> None:
    result["out"] = model.generate(**batch, **kwargs, stopping_criteria=stopping)


@pytest.mark.parametrize("pause_in", ["llm", "vision"])
def test_two_threads_on_one_model_get_a_clear_error_and_the_first_is_unharmed(processor, images, pause_in):
    """The method's per-call state (VMTC's captured queries and rankings, CMAI's rows) serves one thread at a time: a
    second thread's generate while the first is inside its own (paused in an LLM layer, in a vision stage block
    during the image encoding generate runs before its first forward, or between decode steps) is refused before
    it touches anything, and the first ends as it would alone (VMTC ranked with the other thread's q/k: silently
    wrong answers)."""
    import threading

    from unclutter import ConcurrentUseError
    from unclutter.models.tiny import tiny_llava

    torch.manual_seed(0)
    model = tiny_llava()
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()) as handle, torch.no_grad():
        first, second = encode(processor, images[:1], PROMPTS[:1]), encode(processor, images[1:], PROMPTS[1:])
        alone, alone_second = model.generate(**first, **kwargs), model.generate(**second, **kwargs)
        inside, resume = threading.Event(), threading.Event()

        def pause(*args, **kw):
            if threading.current_thread().name == "first" and not inside.is_set():
                inside.set()
                resume.wait(10)
            return None if args else torch.zeros(kw["input_ids"].shape[0] if kw else 1, dtype=torch.bool)

        blocks = [m for m in model.model.vision_tower.modules() if type(m).__name__ == "CLIPEncoderLayer"]
        layer = model.model.language_model.layers[1] if pause_in == "llm" else blocks[handle.stages[0].layer]
        hook = layer.register_forward_hook(pause)
        for stopping in ([], [lambda input_ids, scores, **kw: pause(input_ids=input_ids)]):  # in a call, between
            inside.clear(), resume.clear()
            result, errors = {}, []
            worker = threading.Thread(
                target=_generate_into, args=(result, model, first, kwargs, stopping), name="first"
            )
            worker.start()
            inside.wait(10)
            try:
                model.generate(**second, **kwargs)
            except ConcurrentUseError as exc:
                errors.append(str(exc))
            resume.set()
            worker.join()
            assert errors and "two threads use the model at once" in errors[0]
            assert torch.equal(result["out"], alone)
            hook.remove()
        assert torch.equal(model.generate(**second, **kwargs), alone_second)  # the refused thread's turn comes


def test_speculative_rounds_on_a_static_cache_keep_its_fixed_shapes(model, processor, images):
    """Speculative decoding by hand on a StaticCache (a batch of two): rounds of candidates, all but one rejected
    (cropped), then decode steps, one of them a generated <image> placeholder in one sample only. Rejected rows left
    CMAI's text-row bound raised for good, past the cache's capacity: a decode step grew text_pos but not the rows, and
    the placeholder's row was scattered past their end (IndexError). Each call's logits == the dynamic cache's."""
    from transformers import DynamicCache, StaticCache
    from transformers.cache_utils import StaticLayer

    if not hasattr(StaticLayer, "crop"):
        pytest.skip("this transformers cannot crop a static cache")
    batch = encode(processor, images)
    length, rounds, text = batch["input_ids"].shape[1], 25, model.config.get_text_config()
    ops = ["step"] + [6, "step"] * rounds + [torch.tensor([[model.config.image_token_id], [7]]), "step"]
    candidates = torch.randint(5, 40, (rounds, 2, 5), generator=torch.Generator().manual_seed(0))
    results = []
    with unclutter.apply(model, cmai=CMAIConfig()) as handle, torch.no_grad():
        for cache in (DynamicCache(config=text), StaticCache(config=text, max_cache_len=length + 2 * rounds + 10)):
            out = model(**batch, use_cache=True, **{cache_argument(model): cache})
            mask, got, round_ = batch["attention_mask"], [out.logits[:, -1]], 0
            for op in ops:
                ids = got[-1].argmax(-1, keepdim=True)
                if isinstance(op, int):  # the next token and 5 candidates, of which none is kept
                    ids, round_ = torch.cat([ids, candidates[round_]], 1), round_ + 1
                elif isinstance(op, torch.Tensor):
                    ids = op
                step_mask = torch.cat([mask, torch.ones_like(ids)], 1)
                out = model(input_ids=ids, attention_mask=step_mask, use_cache=True, **{cache_argument(model): cache})
                got.append(out.logits[:, 0])
                mask = torch.cat([mask, torch.ones_like(ids[:, :1])], 1)
                if ids.shape[1] > 1:
                    cache.crop(1 - ids.shape[1])
            results.append(got)
        state = handle.cmai_state  # the static generation's: its text rows never grew
        assert state.text_bound <= state.length and state.text_pos.shape[1] - 1 <= state.static_tokens
        assert all(rows.shape[1] == state.text_pos.shape[1] for rows in state.rows.values())
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
