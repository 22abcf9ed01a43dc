"""LLaVA-NeXT: anyres tiles of several sizes and aspect ratios under CMAI, VMTC and SPD.

References: stock transformers (ratio 1.0, remove), a layer-by-layer CLIP with compression per tile and
a loop-built packing (VMTC), average-pooled stock tile features (SPD), the naive Eq. 9-11 loop (CMAI),
one uncached forward over generated tokens (cached decoding) and each image alone (batching).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_cached_equals_full, assert_sample_equals_alone, extend, logits, random_image
from reference import reference_logits
from test_llava_apply import reference_vmtc_features
from transformers import DynamicCache
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

import unclutter
from unclutter import CMAIConfig, SPDConfig, VMTCConfig
from unclutter.cmai import gamma_schedule
from unclutter.compat import cache_argument
from unclutter.models.tiny_llava_next import tiny_llava_next, tiny_llava_next_processor

pytestmark = pytest.mark.exact

# (height, width): 2x2 tiles exactly, 1x2, 3x1, 2x2 with unpadding, 1x3 with much padding
SIZES = [(64, 64), (40, 80), (100, 30), (50, 70), (20, 100)]
QUESTIONS = ["what is the color of the shape ?", "how many ?", "describe the image .", "is it red ?", "yes or no ?"]


IMAGES = [random_image(i, *size) for i, size in enumerate(SIZES)]
# Stock's high-res patch grid (rows x cols of tokens, the padding cropped) and the image's tile grid, per image size
# (4x4-patch tiles); test_processor_count_equals_model_features_for_every_size checks them against stock's counts.
STOCK_HIGH_RES = {
    (64, 64): ((8, 8), (2, 2)),
    (40, 80): ((4, 8), (1, 2)),
    (100, 30): ((12, 4), (3, 1)),
    (50, 70): ((6, 8), (2, 2)),  # 2 of 8 patch rows cropped
    (20, 100): ((2, 12), (1, 3)),  # 2 of 4 patch rows cropped
}


def _high(t: int, size: tuple[int, int]) -> int:
    """Tokens per high-res tile under VMTC: the budget's share (t of 16) of stock's high-res tokens, per tile, at most
    t and at least 1."""
    (h, w), (rows, cols) = STOCK_HIGH_RES[size]
    return max(1, min(t, round(h * w * t / 16) // (rows * cols)))


def _reference_image(model, tiles, handle, size: tuple[int, int]) -> list[torch.Tensor]:
    """Per tile, the projected tokens it sends: the layer-by-layer reference, then, for an image whose share of
    stock's count is below its tiles' budget, the high-res tiles compressed again to `_high`, ranked and weighted by
    the written-out output importance of the last stage."""
    feats, importance = reference_vmtc_features(model, tiles, handle, with_importance=True)
    feats = model.model.multi_modal_projector(feats)
    t, cfg = handle.num_image_tokens, handle.vmtc
    h = _high(t, size)
    if h == t:
        return list(feats)
    c = (max(1, h // 8) if cfg.clusters is None else min(cfg.clusters, h)) if cfg.merge == "cluster" else 0
    c = 1 if cfg.merge == "single" else c
    high, _ = unclutter.vmtc.compress(
        feats[1:], importance[1:], h - c, c, merge=cfg.merge, normalize=cfg.normalize, has_cls=False
    )
    assert high.shape[1] == h < t
    return [feats[0]] + list(high)


def _batch(processor, images=IMAGES, questions=QUESTIONS):
    text = [f"user : <image> {q} assistant :" for q in questions[: len(images)]]
    return processor(images=list(images), text=text, return_tensors="pt", padding=True)


def _counts(model, batch) -> list[int]:
    return (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()


def _grid(model, size) -> tuple[int, int]:
    cfg = model.config
    return get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)


def _features(model, batch) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    return list(out.pooler_output)


def _reference_pack(tiles: torch.Tensor, grid: tuple[int, int], newline: torch.Tensor) -> torch.Tensor:
    """(1 + rows*cols, t, E) -> base, then tile by tile in raster order, a newline after each row of tiles."""
    rows, cols = grid
    out = [tiles[0]]
    for r in range(rows):
        out += [tiles[1 + r * cols + c] for c in range(cols)] + [newline[None]]
    return torch.cat(out)


# ---- counts: processor == model features, for every size and aspect ratio ---------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"vmtc": VMTCConfig(ratio=0.5)}, {"vmtc": VMTCConfig(num_tokens=3, merge="drop")}, {"spd": SPDConfig(grid=2)}],
)
def test_processor_count_equals_model_features_for_every_size(kwargs):
    """VMTC: the base tile keeps the per-tile budget t, each high-res tile the budget's share of stock's (cropped)
    high-res tokens (`_high`), a newline per row of tiles; SPD: every tile its grid."""
    model, processor = tiny_llava_next(), tiny_llava_next_processor()
    stock = _counts(model, _batch(processor))
    assert list(STOCK_HIGH_RES) == SIZES and [_grid(model, s) for s in SIZES] == [g for _, g in STOCK_HIGH_RES.values()]
    assert processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens == [
        16 + h * (w + 1) for (h, w), _ in STOCK_HIGH_RES.values()
    ]  # stock: base tile, then the cropped grid with a newline per patch row
    with unclutter.apply(model, processor, **kwargs) as h:
        batch = _batch(processor)
        counts = _counts(model, batch)
        t = h.num_image_tokens
        high = [_high(t, s) if "vmtc" in kwargs else t for s in SIZES]
        assert counts == [len(f) for f in _features(model, batch)]
        assert counts == [t + r * c * k + r for (r, c), k in zip((_grid(model, s) for s in SIZES), high, strict=True)]
        assert processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens == counts
        logits(model, batch)  # the model's own check: image features and image tokens match
    assert all(c < s for c, s in zip(counts, stock, strict=True))
    if "vmtc" in kwargs:  # the padded images are fitted to the share, the others keep the tile budget
        assert high[3] < t and high[4] < t and high[0] == t
        for ours, theirs in zip(counts, stock, strict=True):
            assert ours <= theirs * t / 16 + 3  # the budget's share of stock's count (+ newlines, rounding)


def test_an_elongated_image_never_gets_more_tokens_than_stock():
    """A per-tile budget counts the padding that stock crops: at ratio 0.9 the 1x3-tile 20x100 image would send
    14 + 3 * 14 + 1 = 57 tokens against stock's 42. The high-res share keeps every image below stock, except a strip
    so thin that stock's unpadded high-res grid is empty (stock: the base tile alone), whose high-res tiles still send
    1 token each and a newline per tile row (documented in `llava_next`)."""
    model, processor = tiny_llava_next(), tiny_llava_next_processor()
    stock = _counts(model, _batch(processor))
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.9)) as h:
        batch = _batch(processor)
        counts = _counts(model, batch)
        assert counts == [len(f) for f in _features(model, batch)]
        logits(model, batch)
    assert h.num_image_tokens == 14 and stock[4] == 42
    assert all(c <= s for c, s in zip(counts, stock, strict=True)), (counts, stock)
    thin = [(8, 200), (5, 96), (3, 300), (1, 50)]  # 1x3 and 1x2 tiles, every high-res patch row cropped
    stock_thin = processor._get_num_multimodal_tokens(image_sizes=thin).num_image_tokens
    assert stock_thin == [16] * len(thin)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.9)) as h:
        ours = processor._get_num_multimodal_tokens(image_sizes=thin).num_image_tokens
        grids = [_grid(model, s) for s in thin]
        assert [h.adapter.stock_high_res_grid(s, g)[0] for s, g in zip(thin, grids, strict=True)] == [0] * len(thin)
        assert ours == [14 + r * c + r for r, c in grids] == [18, 18, 17, 17]
        batch = _batch(processor, [random_image(i, *s) for i, s in enumerate(thin)], QUESTIONS[: len(thin)])
        assert _counts(model, batch) == [len(f) for f in _features(model, batch)] == ours
        logits(model, batch)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.75)):  # t = 12 = 16 - 3 - 1: at most stock
        assert processor._get_num_multimodal_tokens(image_sizes=thin).num_image_tokens == [16, 16, 15, 15]


def test_per_tile_budget_and_one_stage_info_per_stage():
    model, processor = tiny_llava_next(), tiny_llava_next_processor()
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5)) as h:
        batch = _batch(processor)
        _features(model, batch)
    tiles = sum(1 + r * c for r, c in (_grid(model, s) for s in SIZES))
    assert h.num_image_tokens == 8 and h.stock_image_tokens == 16  # half of each 4x4 tile
    assert len(h.stage_infos) == len(h.active_stages) > 1
    for info, stage in zip(h.stage_infos, h.active_stages, strict=True):
        assert info.importance.shape == (tiles, stage.tokens_in)
        assert info.kept_index.shape == (tiles, stage.keep) and info.num_clusters == stage.clusters


# ---- VMTC and SPD against references ------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [VMTCConfig(), VMTCConfig(num_tokens=5, num_stages=2, merge="single")])
def test_vmtc_features_equal_layerwise_reference(cfg):
    model = tiny_llava_next(attn_implementation="eager")  # eager returns the weights the reference needs
    processor = tiny_llava_next_processor()
    images, sizes = IMAGES[3:], SIZES[3:]
    with unclutter.apply(model, processor, vmtc=cfg) as h, torch.no_grad():
        batch = _batch(processor, images)
        got = _features(model, batch)
        for i, size in enumerate(sizes):
            grid = _grid(model, size)
            tiles = batch["pixel_values"][i][: 1 + grid[0] * grid[1]]
            ref = _reference_image(model, tiles, h, size)
            assert ref[0].shape[0] == h.num_image_tokens and ref[1].shape[0] == _high(h.num_image_tokens, size)
            torch.testing.assert_close(got[i], _reference_pack(ref, grid, model.model.image_newline))


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_spd_equals_pooled_stock_tiles(grid):
    model, processor = tiny_llava_next(), tiny_llava_next_processor()
    batch = _batch(processor, IMAGES[3:])
    with unclutter.apply(model, processor, spd=SPDConfig(grid=grid)):
        got = _features(model, _batch(processor, IMAGES[3:]))
    with torch.no_grad():
        for i, size in enumerate(SIZES[3:]):
            layout = _grid(model, size)
            tiles = batch["pixel_values"][i][: 1 + layout[0] * layout[1]]
            feats = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
            square = feats.transpose(1, 2).reshape(len(tiles), -1, 4, 4)
            pooled = F.adaptive_avg_pool2d(square, grid).flatten(2).transpose(1, 2)
            ref = _reference_pack(model.model.multi_modal_projector(pooled), layout, model.model.image_newline)
            torch.testing.assert_close(got[i], ref)


def test_vmtc_ratio_one_is_stock_on_anyres_inputs():
    model, processor = tiny_llava_next(), tiny_llava_next_processor()
    batch = _batch(processor)
    stock = logits(model, batch)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=1.0)) as h:
        again = _batch(processor)
        assert torch.equal(again["input_ids"], batch["input_ids"])
        assert torch.equal(logits(model, again), stock)
        assert h.active_stages == [] and "pack_image_features" not in vars(model.model)


@pytest.mark.parametrize("kwargs", [{"cmai": CMAIConfig()}, {"vmtc": VMTCConfig()}])
def test_image_key_map_names_each_keys_tile_token(kwargs):
    model = tiny_llava_next(attn_implementation="eager")
    processor = tiny_llava_next_processor()
    with unclutter.apply(model, processor, **kwargs) as h, torch.no_grad():
        batch = _batch(processor, IMAGES[3:4])  # 2x2 tiles, unpadded by the stock packing
        keys = h.adapter.image_key_map(h, batch)
        packed = _features(model, batch)[0]
        tiles = batch["pixel_values"][0]
        if "vmtc" in kwargs:
            per_tile = _reference_image(model, tiles, h, SIZES[3])  # high-res tiles fitted to the share (6 of 8)
        else:
            hidden = model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-2][:, 1:]
            per_tile = model.model.multi_modal_projector(hidden)
    newline = model.model.image_newline
    assert len(keys) == len(packed) == _counts(model, batch)[0]
    assert keys.count(None) == (2 if "vmtc" in kwargs else 6)  # a newline per tile row / per unpadded patch row
    expected = torch.stack([newline if key is None else per_tile[key[0]][key[1]] for key in keys])
    torch.testing.assert_close(packed, expected)


# ---- CMAI and generation with images of different sizes in one batch ----------------------------------


def test_cmai_equals_naive_reference_with_different_image_token_counts():
    model, processor = tiny_llava_next(), tiny_llava_next_processor()
    batch = _batch(processor, IMAGES[:3])
    assert len(set(_counts(model, batch))) == 3
    gammas = gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    expected = reference_logits(model, batch, gammas)
    with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)):
        got = logits(model, batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)


def test_vmtc_cmai_cached_decode_equals_full_and_batch_equals_single():
    model, processor = tiny_llava_next(), tiny_llava_next_processor()
    images = IMAGES[1:4]
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()):
        batch = _batch(processor, images)
        assert len(set(_counts(model, batch))) == 3
        gen, _ = assert_cached_equals_full(model, batch)
        for i in range(len(images)):
            assert_sample_equals_alone(model, gen, i, _batch(processor, images[i : i + 1], QUESTIONS[i : i + 1]))


def test_remove_restores_the_processors_stock_count():
    model, processor = tiny_llava_next(), tiny_llava_next_processor()
    batch = _batch(processor)
    stock_counts = processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    stock = logits(model, batch)
    handle = unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig())
    assert _counts(model, _batch(processor)) != _counts(model, batch)
    handle.remove()
    again = _batch(processor)
    assert torch.equal(again["input_ids"], batch["input_ids"]) and _counts(model, again) == stock_counts
    assert processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens == stock_counts
    assert not {"replace_image_token", "_get_num_multimodal_tokens"} & set(vars(processor))
    assert "pack_image_features" not in vars(model.model)
    assert torch.equal(logits(model, again), stock)


def test_cmai_on_a_mistral_decoder_with_a_sliding_window():
    """LLaVA-NeXT-Mistral's layout: Mistral hands its window to the attention function as an argument (its modules
    have no such attribute). With a window shorter than the prompt, CMAI equals the naive reference, cached decoding
    equals one full forward (generate's cache, whose layers keep only the window, and a plain DynamicCache, which
    keeps every key), and gamma 0 decodes as stock; a padded batch (the general path) and one sample (the fast path)."""
    window, steps = 24, 6
    model, processor = tiny_llava_next(mistral_window=window), tiny_llava_next_processor()
    gammas = gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    for images in (IMAGES[:2], IMAGES[:1]):
        batch = _batch(processor, images)
        assert batch["input_ids"].shape[1] > window
        expected, stock = reference_logits(model, batch, gammas), generate_with(model, batch, steps)
        with unclutter.apply(model, cmai=CMAIConfig()):
            got = logits(model, batch)
            assert_cached_equals_full(model, batch, steps)
            plain = generate_with(model, batch, steps, **{cache_argument(model): DynamicCache()})
            full = logits(model, extend(batch, plain.sequences[:, :-1]))
            first = batch["input_ids"].shape[1] - 1
            for t in range(steps):
                torch.testing.assert_close(plain.logits[t], full[:, first + t], atol=1e-4, rtol=1e-4)
        valid = batch["attention_mask"].bool()
        torch.testing.assert_close(got[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)
        with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.0)):
            for cache in ({}, {cache_argument(model): DynamicCache()}):
                same = generate_with(model, batch, steps, **cache)
                assert torch.equal(same.sequences, stock.sequences)
                for a, b in zip(same.logits, stock.logits, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def generate_with(model, batch, steps: int, **kwargs):
    with torch.no_grad():
        return model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **kwargs,
        )  # fmt: skip


# ---- clear errors --------------------------------------------------------------------------------------


def test_stock_placeholders_under_vmtc_ask_for_the_processor():
    model, processor = tiny_llava_next(), tiny_llava_next_processor()
    batch = _batch(processor, IMAGES[:2])
    with unclutter.apply(model, vmtc=VMTCConfig()):
        with pytest.raises(ValueError, match="Pass processor="):
            model(**batch)
        with pytest.raises(ValueError, match="Pass processor="):
            model.generate(**batch, max_new_tokens=2)


def test_unsupported_setups_fail_loudly():
    model, processor = tiny_llava_next(), tiny_llava_next_processor()
    with pytest.raises(ValueError, match="larger than the 4x4 tile grid"):
        unclutter.apply(model, processor, spd=SPDConfig(grid=5))
    processor.image_processor.image_grid_pinpoints = [[32, 64], [64, 32]]
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        unclutter.apply(model, processor, vmtc=VMTCConfig())
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        unclutter.apply(model, vmtc=VMTCConfig())
    assert "_unclutter_handle" not in vars(model.model)  # failed applies leave nothing behind


def test_high_res_share_on_the_real_checkpoints_tiling():
    """llava-v1.6's tiling (336 px tiles of 24x24 patches, its five pinpoints): under VMTC every image sends the
    budget's share of stock's count, never more than stock, whatever its aspect ratio (a per-tile budget alone: a
    16:9 photo at ratio 0.75 sent 2,162 tokens against stock's 1,948). Counts from the stock processor."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from unclutter.models.tiny import text_kwargs, tiny_tokenizer, vision_kwargs

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    tok = tiny_tokenizer()
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision_kwargs(336, 14, 2, intermediate=32, projection_dim=32)),
        text_config=LlamaConfig(**text_kwargs(tok, layers=1, intermediate=32)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    model = LlavaNextForConditionalGeneration(config).eval()
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    sizes = [(1080, 1920), (720, 1280), (480, 640), (600, 600), (100, 1000), (1000, 100), (300, 700), (2000, 333)]
    stock = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    assert stock[:2] == [1948, 1948]
    for ratio in (0.75, 0.5, 0.25):
        with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=ratio)) as h:
            ours = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
            t = h.num_image_tokens
            for size, a, b in zip(sizes, stock, ours, strict=True):
                rows, cols = h.adapter.image_grid(size)
                assert b < a, (ratio, size, a, b)
                # stock: 576 (base) + the cropped grid + a newline per patch row; ours: t + the share + a newline per
                # tile row; the share rounds down per tile
                high = (a - 576) * 24 / 25  # stock's high-res patch tokens, newlines (about 1 in 25) taken out
                assert t + ratio * high - rows * cols - 30 <= b <= t + ratio * (a - 576) + rows, (ratio, size, a, b)
