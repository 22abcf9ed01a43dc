"""Gemma 3 beyond the shared contract: sliding windows, pan-and-scan crops, several images, unit-wise VMTC.

References: stock transformers, the naive Eq. 9-11 loop (`reference.py`, which runs on the masks
transformers builds: sliding windows, bidirectional image blocks, padding), one uncached forward over
what cached `generate` produced, each sample alone, and a layer-by-layer SigLIP written here that groups
patches into the projector's pooling units by explicit index lists and ranks them from eager attention.
"""

import pytest
import torch
from helpers import (
    assert_cached_equals_full,
    assert_sample_equals_alone,
    extend,
    generate,
    logits,
    random_image,
    units_by_index,
)
from reference import reference_logits

import unclutter
from unclutter import CMAIConfig, SPDConfig, VMTCConfig
from unclutter.cmai import gamma_schedule
from unclutter.compat import output_cache
from unclutter.integrations import cmai_attention
from unclutter.integrations.gemma3 import pool_units, project, to_units
from unclutter.models.tiny_gemma3 import SLIDING_WINDOW, TOKENS_PER_IMAGE, tiny_gemma3, tiny_gemma3_processor

pytestmark = pytest.mark.exact

BOI = "<start_of_image>"
QUESTIONS = ["what color ?", "how many ?"]  # short: the naive reference loops over text rows squared
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 16}
STEPS = 5  # greedy decoding steps


def _prompt(question: str, images: int) -> str:
    return f"<bos><start_of_turn>user {' and '.join([BOI] * images)} {question}<end_of_turn><start_of_turn>model"


def _inputs(processor, images: list[list], questions: list[str], **kwargs):
    text = [_prompt(q, len(ims)) for q, ims in zip(questions, images, strict=True)]
    return processor(images=images, text=text, return_tensors="pt", padding=True, **kwargs)


def _gammas(model) -> dict[int, float]:
    return gamma_schedule(model.config.get_text_config().num_hidden_layers, 0.6)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on shared cores waiting for them dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return tiny_gemma3()


@pytest.fixture
def processor():
    return tiny_gemma3_processor()


# ---- CMAI: sliding windows and Gemma 3's masks ------------------------------------------------------------


def test_cmai_follows_sliding_windows_in_prefill_and_decoding(model, processor):
    """Prompts 3-4x the window, decoding past it: cached == full == the naive reference; sliding caches drop keys."""
    batch = _inputs(processor, [[random_image(0, 48)], [random_image(1, 48)]], QUESTIONS)
    assert batch["input_ids"].shape[1] > 3 * SLIDING_WINDOW
    steps = SLIDING_WINDOW + 2
    stock = generate(model, batch, steps)
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        gen, full = assert_cached_equals_full(model, batch, steps)
        cache = output_cache(gen)
    expected = reference_logits(model, extend(batch, gen.sequences[:, :-1]), _gammas(model))
    valid = extend(batch, gen.sequences[:, :-1])["attention_mask"].bool()
    torch.testing.assert_close(full[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)
    kept = [layer.keys.shape[-2] for layer in cache.layers]
    total = gen.sequences.shape[1] - 1
    assert kept == [SLIDING_WINDOW - 1 if s else total for s in cache.is_sliding] and any(cache.is_sliding)
    gaps = [(a - b).abs().amax().item() for a, b in zip(gen.logits[1:], stock.logits[1:], strict=True)]
    assert all(g > 1e-4 for g in gaps), f"CMAI must act at every decode step, also past the window: {gaps}"


def test_cmai_follows_a_static_cache_past_the_sliding_window(model, processor):
    """A static cache's sliding layers hold a fixed buffer of the window: empty slots first, then (prompt longer
    than the window) the whole prompt once, then the last keys rolled. Cached == full == the naive reference, and
    equal to the dynamic cache's decoding."""
    batch = _inputs(processor, [[random_image(0, 48)], [random_image(1, 48)]], QUESTIONS)
    steps = SLIDING_WINDOW + 2
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        gen, full = assert_cached_equals_full(model, batch, steps, cache_implementation="static")
        cache = output_cache(gen)
        dynamic = generate(model, batch, steps)
    assert type(cache).__name__ == "StaticCache" and any(cache.is_sliding)
    assert {layer.keys.shape[-2] for layer, s in zip(cache.layers, cache.is_sliding, strict=True) if s} == {
        SLIDING_WINDOW
    }
    expected = reference_logits(model, extend(batch, gen.sequences[:, :-1]), _gammas(model))
    valid = extend(batch, gen.sequences[:, :-1])["attention_mask"].bool()
    torch.testing.assert_close(full[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)
    for a, b in zip(gen.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_a_compiled_static_decode_step_follows_the_sliding_windows(model, processor):
    """`generate`'s compile of the static decode step (dynamo's aot_eager backend here): the sliding layers' CMAI is
    traced too (key offsets on the device), past the window, with eager's tokens and logits."""
    from transformers import CompileConfig

    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers' own switch for compiling on CPU
    batch = _inputs(processor, [[random_image(0, 48)], [random_image(1, 48)]], QUESTIONS)
    steps = SLIDING_WINDOW + 2
    torch._dynamo.reset()
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        eager = generate(model, batch, steps, cache_implementation="static", disable_compile=True)
        compiled = generate(model, batch, steps, cache_implementation="static", compile_config=config)
    torch._dynamo.reset()
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.logits, eager.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_decode_step_whose_token_is_structural_keeps_the_fast_path_exact(model, processor):
    """A generated image marker is no text query: that step takes the general path and stores no row; the prefill
    and the steps around it take the fast one (global layers; sliding layers past their window fall back per layer). Each step
    equals one uncached forward and the naive reference."""
    from unclutter.compat import cache_argument

    batch = _inputs(processor, [[random_image(0, 48)]], QUESTIONS[:1])
    marker = torch.tensor([[model.config.eoi_token_id]])
    with unclutter.apply(model, processor, cmai=CMAIConfig()) as handle, torch.no_grad():
        out = model(**batch, use_cache=True)
        cache, ids, got = output_cache(out), batch["input_ids"], []
        for step in range(4):
            new = marker if step == 1 else out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, new], 1)
            step_batch = {"input_ids": new, "attention_mask": torch.ones_like(ids), cache_argument(model): cache}
            out = model(**step_batch, use_cache=True)
            got.append(out.logits[:, -1])
        assert handle.cmai_state.fast_steps == 4 and handle.cmai_state.rows_exact  # the prefill and 3 steps
        full = logits(model, extend(batch, ids))[:, -4:]
    naive = reference_logits(model, extend(batch, ids), _gammas(model))[:, -4:]
    for t in range(4):
        torch.testing.assert_close(got[t], full[:, t], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got[t], naive[:, t].float(), atol=5e-5, rtol=1e-4)


def test_cmai_layers_get_gemma3s_real_masks(model, processor, monkeypatch):
    """Every CMAI layer gets a materialised mask: sliding window, bidirectional image block, no future text."""
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, module.is_sliding, attention_mask))
        return forward(module, query, key, value, attention_mask, **kwargs)

    forward = cmai_attention.sdpa_attention_forward
    monkeypatch.setattr(cmai_attention, "sdpa_attention_forward", spy)
    batch = _inputs(processor, [[random_image(0, 48)]], QUESTIONS[:1])
    ids = batch["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero()[:, 0]
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        generate(model, batch, steps=2)
    length = ids.shape[0]
    prefill = [(layer, sliding, m) for layer, sliding, m in seen if m is not None and m.shape[-2] == length]
    decode = [(layer, sliding, m) for layer, sliding, m in seen if m is not None and m.shape[-2] == 1]
    unmasked = [layer for layer, _, m in seen if m is None]
    # layer 0 has gamma 0: in a decode step without padding every key is allowed there, so it gets no mask (SDPA's
    # unmasked kernel, as in stock transformers)
    assert unmasked == [0] and len(prefill) == 4 and len(decode) == 3, "one prefill and one decode call per layer"
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    for _, sliding, mask in prefill:
        allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0  # the fast path's masks are additive
        assert allowed[image[0], image[-1]], "image tokens attend bidirectionally within their image"
        text = ids != model.config.image_token_id
        assert not (allowed & (k > q))[text].any(), "text rows never see later tokens"
        if sliding:
            assert not (allowed & (q - k >= SLIDING_WINDOW)).any(), "sliding layers drop keys beyond the window"
        else:
            assert allowed[-1, 0], "full-attention layers keep the first token"
    assert {m.shape[-1] for _, sliding, m in decode if sliding} == {SLIDING_WINDOW}
    assert {m.shape[-1] for _, sliding, m in decode if not sliding} == {length + 1}


# ---- several images per sample, pan-and-scan crops: CMAI alone and with VMTC --------------------------------

LAYOUTS = {  # images per sample (a different count in each sample), processor kwargs
    "pan_and_scan": ([[random_image(0, 48, 144)], [random_image(1, 48, 96)]], PAN_AND_SCAN),  # 1+3 and 1+2 crops
    "two_images": ([[random_image(0, 48), random_image(2, 48)], [random_image(1, 48)]], {}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("vmtc", [None, VMTCConfig()], ids=["cmai", "vmtc+cmai"])
def test_several_image_blocks_per_sample(model, processor, layout, vmtc):
    images, kwargs = LAYOUTS[layout]
    stock_blocks = (_inputs(processor, images, QUESTIONS, **kwargs)["input_ids"] == model.config.boi_token_id).sum(1)
    assert stock_blocks.tolist() in ([4, 3], [2, 1])
    with unclutter.apply(model, processor, cmai=CMAIConfig(), vmtc=vmtc) as handle:
        batch = _inputs(processor, images, QUESTIONS, **kwargs)
        soft = (batch["input_ids"] == model.config.image_token_id).sum(1)
        assert soft.tolist() == (stock_blocks * handle.num_image_tokens).tolist()
        together, _ = assert_cached_equals_full(model, batch, STEPS)
        for i in range(2):
            alone = _inputs(processor, images[i : i + 1], QUESTIONS[i : i + 1], **kwargs)
            assert_sample_equals_alone(model, together, i, alone)
        got = logits(model, batch)
    if vmtc is None:  # the prompt alone: the naive reference is slow on long rows
        expected = reference_logits(model, batch, _gammas(model))
        valid = batch["attention_mask"].bool()
        torch.testing.assert_close(got[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)
        assert (got[valid] - logits(model, batch)[valid]).abs().max() > 1e-3


# ---- VMTC on whole pooling units ------------------------------------------------------------------------


def reference_soft_tokens(model, pixel_values, handle):
    """Layer-by-layer SigLIP with unit-wise VMTC: importance = mean eager attention received, per unit."""
    tower, proj = model.model.vision_tower, model.model.multi_modal_projector
    side, kernel = proj.patches_per_image, proj.kernel_size
    u = kernel * kernel
    h = tower.embeddings(pixel_values)[:, units_by_index(side, kernel)]
    stages = {s.layer: s for s in handle.active_stages}
    cfg = handle.vmtc
    for i, block in enumerate(tower.encoder.layers):
        out, weights = block.self_attn(block.layer_norm1(h))
        h = h + out
        if i in stages:
            s, (b, n, d) = stages[i], h.shape
            received = weights.mean(dim=1).mean(dim=1)  # (B, n): mean over heads, then over queries
            importance = received.view(b, n // u, u).mean(dim=-1)
            h, _ = unclutter.vmtc.compress(
                h.reshape(b, n // u, u * d), importance, s.keep, s.clusters, merge=cfg.merge, has_cls=False
            )
            h = h.reshape(b, -1, d)
        h = h + block.mlp(block.layer_norm2(h))
    h = tower.post_layernorm(h)
    pooled = h.view(h.shape[0], -1, u, h.shape[-1]).mean(dim=2)
    return proj.mm_soft_emb_norm(pooled) @ proj.mm_input_projection_weight


def _soft_tokens(model, pixel_values):
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=pixel_values).pooler_output


def test_unit_pooling_equals_the_stock_projector_bit_for_bit(model, processor):
    pixels = _inputs(processor, [[random_image(0, 48)], [random_image(1, 48)]], QUESTIONS)["pixel_values"]
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        patches = model.model.vision_tower(pixel_values=pixels).last_hidden_state
        stock = proj(patches)
        grouped = to_units(patches, proj.patches_per_image, proj.kernel_size)
        assert torch.equal(grouped, patches[:, units_by_index(proj.patches_per_image, proj.kernel_size)])
        assert torch.equal(project(proj, pool_units(proj, grouped), grouped), stock)


@pytest.mark.parametrize(
    "cfg",
    [VMTCConfig(), VMTCConfig(ratio=0.25, merge="single"), VMTCConfig(num_tokens=5, layers=(1, 3), clusters=2)],
    ids=["default", "single", "two-stages"],
)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vmtc_equals_a_layer_by_layer_reference(processor, cfg, attn):
    """eager: ranked from captured q/k by a second score pass; sdpa: ranked inside the stage blocks' attention
    (`vision.vmtc_attention`). Both against the reference on an eager twin (same weights)."""
    model = tiny_gemma3(attn_implementation=attn)
    twin = tiny_gemma3(attn_implementation="eager")  # eager attention returns the weights the reference ranks by
    pixels = _inputs(processor, [[random_image(0, 48)], [random_image(1, 48), random_image(2, 48)]], QUESTIONS)[
        "pixel_values"
    ]
    with unclutter.apply(model, processor, vmtc=cfg) as handle:
        got = _soft_tokens(model, pixels)
        with torch.no_grad():
            expected = reference_soft_tokens(twin, pixels, handle)
        fused = model.config.vision_config._attn_implementation
    assert (fused, len(handle._ranked)) == (
        ("unclutter_vmtc", len(handle.active_stages)) if attn == "sdpa" else ("eager", 0)
    )
    assert model.config.vision_config._attn_implementation == attn  # remove() restores it
    assert got.shape == (3, handle.num_image_tokens, model.config.text_config.hidden_size)
    assert handle.num_image_tokens == (cfg.num_tokens or round(cfg.ratio * TOKENS_PER_IMAGE))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_vmtc_at_the_last_block_keeps_the_stock_soft_tokens_of_the_top_units(processor):
    """Dropping at the last block: the kept soft tokens are the stock ones of the units that receive most attention."""
    model = tiny_gemma3(attn_implementation="eager")
    pixels = _inputs(processor, [[random_image(0, 48)], [random_image(1, 48)]], QUESTIONS)["pixel_values"]
    stock = _soft_tokens(model, pixels)
    proj, last = model.model.multi_modal_projector, len(model.model.vision_tower.encoder.layers) - 1
    with torch.no_grad():
        weights = model.model.vision_tower(pixel_values=pixels, output_attentions=True).attentions[last]
    received = weights.mean(dim=1).mean(dim=1)[:, units_by_index(proj.patches_per_image, proj.kernel_size)]
    top = received.view(2, TOKENS_PER_IMAGE, -1).mean(dim=-1).topk(6, dim=1).indices.sort(dim=1).values
    with unclutter.apply(model, processor, vmtc=VMTCConfig(num_tokens=6, layers=(last,), merge="drop")) as handle:
        got = _soft_tokens(model, pixels)
    assert torch.equal(handle.stage_infos[0].kept_index, top)
    torch.testing.assert_close(
        got, stock.gather(1, top[..., None].expand(-1, -1, stock.shape[-1])), atol=1e-5, rtol=1e-5
    )


def test_processor_counts_and_image_blocks_match_the_compressed_tokens(model, processor):
    images = [[random_image(0, 48, 144)], [random_image(1, 48)]]
    stock = _inputs(processor, images, QUESTIONS, **PAN_AND_SCAN)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5)) as handle:
        batch = _inputs(processor, images, QUESTIONS, **PAN_AND_SCAN)
        assert processor._get_num_multimodal_tokens(image_sizes=[(48, 48), (48, 144)])["num_image_tokens"] == [8, 8]
        ids = batch["input_ids"]
        blocks = (ids == model.config.boi_token_id).cumsum(1) * (ids == model.config.image_token_id)
        sizes = [(blocks[b] == n).sum().item() for b in range(2) for n in range(1, int(blocks[b].max()) + 1)]
        assert sizes == [8] * 5 and handle.num_image_tokens == 8  # 1+3 crops, then 1 image: 8 soft tokens each
        # the bidirectional image-block mask is built from token_type_ids: exactly the compressed soft tokens
        assert torch.equal(batch["token_type_ids"].bool(), ids == model.config.image_token_id)
        logits(model, batch)  # the tower's features fill exactly the processor's placeholders
        with pytest.raises(ValueError, match="Pass processor= to unclutter.apply"):
            logits(model, stock)
    again = _inputs(processor, images, QUESTIONS, **PAN_AND_SCAN)
    assert all(torch.equal(again[k], stock[k]) for k in stock)
    assert processor._get_num_multimodal_tokens(image_sizes=[(48, 48)])["num_image_tokens"] == [TOKENS_PER_IMAGE]


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_spd_pools_the_stock_soft_tokens(model, processor, grid):
    """SPD pools the 4x4 grid of stock soft tokens (after the projector's own pooling) to grid x grid. It pooled the
    raw patch grid instead, the same only where grid divides the token grid (not for the default 12 of 16)."""
    import torch.nn.functional as F

    from unclutter.compat import image_features

    pixels = _inputs(processor, [[random_image(0, 48)], [random_image(1, 48)]], QUESTIONS)["pixel_values"]
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        patches = model.model.vision_tower(pixel_values=pixels).last_hidden_state  # (2, side*side, D)
        side = proj.patches_per_image
        soft = F.avg_pool2d(patches.transpose(1, 2).reshape(2, -1, side, side), proj.kernel_size)  # (2, D, 4, 4)
        pooled = F.adaptive_avg_pool2d(soft, grid).flatten(2).transpose(1, 2)
        expected = proj.mm_soft_emb_norm(pooled) @ proj.mm_input_projection_weight
        with unclutter.apply(model, processor, spd=SPDConfig(grid=grid)):
            got = torch.stack(image_features(model.model, pixels))
    assert got.shape[1] == grid * grid
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_spd_at_the_soft_token_grid_is_stock_and_coarser_grids_count(model, processor):
    batch = _inputs(processor, [[random_image(0, 48)], [random_image(1, 48)]], QUESTIONS)
    stock = logits(model, batch)
    with unclutter.apply(model, processor, spd=SPDConfig(grid=4)):
        torch.testing.assert_close(logits(model, batch), stock, atol=1e-6, rtol=1e-6)
    with unclutter.apply(model, processor, spd=SPDConfig(grid=2)):
        coarse = _inputs(processor, [[random_image(0, 48)], [random_image(1, 48)]], QUESTIONS)
        assert (coarse["input_ids"] == model.config.image_token_id).sum(1).tolist() == [4, 4]
        logits(model, coarse)


def test_clear_errors(model, processor):
    with pytest.raises(ValueError, match="no CLS token"):
        unclutter.apply(model, processor, vmtc=VMTCConfig(importance="cls"))
    with pytest.raises(ValueError, match="finer than"):
        unclutter.apply(model, processor, spd=SPDConfig(grid=5))
    processor.image_seq_length = 9
    with pytest.raises(ValueError, match="do not belong together"):
        unclutter.apply(model, processor, vmtc=VMTCConfig())
    assert "forward" not in vars(model.model.multi_modal_projector)  # the failed apply undid itself
