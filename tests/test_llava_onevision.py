"""LLaVA-OneVision: CMAI and VMTC over single-image (anyres), multi-image and video prompts, mixed in one batch.

References: stock transformers (gamma 0, ratio 1.0, remove), the naive Eq. 9-11 loop with image and video
placeholders as image keys, a layer-by-layer SigLIP with compression per tile and a loop-built packing
(images), the stock tower + bilinear pooling + compression per frame (videos), one uncached forward over
generated tokens (cached decoding) and each prompt alone (batching).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_cached_equals_full, assert_sample_equals_alone, logits, random_image, random_video
from reference import reference_logits, written_out_output_importance
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

import unclutter
from unclutter import CMAIConfig, VMTCConfig
from unclutter.cmai import gamma_schedule
from unclutter.models.tiny_llava_onevision import tiny_llava_onevision, tiny_llava_onevision_processor

pytestmark = pytest.mark.exact


# one prompt each: a 3x3-tile image (interpolated by anyres_max_4), two images, a video, a 2x1-tile image
PROMPTS = [
    ("user : <image> what is the color of the shape ? assistant :", [random_image(0, 96, 96)], None),
    ("user : <image> <image> how many ? assistant :", [random_image(1, 64, 64), random_image(2, 30, 50)], None),
    ("user : <video> describe the image . assistant :", None, random_video(3, 3, 40, 40)),
    ("user : <image> is it red ? assistant :", [random_image(4, 50, 30)], None),
]


def _batch(processor, prompts=PROMPTS):
    images = [p[1] for p in prompts if p[1] is not None]
    videos = [p[2] for p in prompts if p[2] is not None]
    return processor(
        text=[p[0] for p in prompts], images=images or None, videos=videos or None, return_tensors="pt", padding=True
    )


def _media(model, batch) -> list[int]:
    ids = batch["input_ids"]
    return ((ids == model.config.image_token_id) | (ids == model.config.video_token_id)).sum(dim=1).tolist()


def assert_cached_equals_full_and_batch_equals_single(model, processor, prompts, **kwargs):
    """Under ``unclutter.apply(**kwargs)``: cached greedy decoding == one uncached forward; batch == each alone."""
    with unclutter.apply(model, processor, **kwargs):
        gen, _ = assert_cached_equals_full(model, _batch(processor, prompts))
        for i in range(len(prompts)):
            assert_sample_equals_alone(model, gen, i, _batch(processor, prompts[i : i + 1]))


# ---- CMAI: images (single and multi) and videos, all image keys -----------------------------------------


def test_cmai_on_images_and_videos_equals_naive_reference():
    model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    batch = _batch(processor)
    media = _media(model, batch)
    assert len(set(media)) == len(PROMPTS) and batch["pixel_values_videos"].shape[:2] == (1, 3)
    gammas = gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    expected = reference_logits(model, batch, gammas)
    stock = logits(model, batch)
    with unclutter.apply(model, cmai=CMAIConfig(gamma_max=0.6)) as h:
        got = logits(model, batch)
    assert h.cmai_state.num_image_tokens.tolist() == media  # video placeholders are image keys too
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)
    video_row = valid[2] & (
        torch.arange(valid.shape[1]) > batch["input_ids"][2].tolist().index(model.config.video_token_id)
    )
    assert (got[2][video_row] - stock[2][video_row]).abs().max() > 1e-3, "CMAI must act on the video prompt"


def test_cmai_gamma_zero_equals_stock_on_images_and_videos():
    model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    batch = _batch(processor)
    stock = logits(model, batch)
    with unclutter.apply(model, processor, cmai=CMAIConfig(gamma_max=0.0)):
        got = logits(model, batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], stock[valid], atol=1e-5, rtol=1e-5)


def test_cmai_cached_decode_equals_full_and_batch_equals_single_on_images_and_videos():
    model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    assert_cached_equals_full_and_batch_equals_single(model, processor, PROMPTS[:3], cmai=CMAIConfig())


# ---- VMTC: images per tile, videos per pooled frame ------------------------------------------------------


def _grid(model, size) -> tuple[int, int]:
    cfg = model.config
    return get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)


def _reference_pack(tiles: torch.Tensor, grid: tuple[int, int] | None, newline: torch.Tensor) -> torch.Tensor:
    """(tiles, t, E) -> base, then tile by tile in raster order, a newline after each row of tiles (one tile: + newline)."""
    if grid is None:
        return torch.cat([tiles[0], newline[None]])
    rows, cols = grid
    out = [tiles[0]]
    for r in range(rows):
        out += [tiles[1 + r * cols + c] for c in range(cols)] + [newline[None]]
    return torch.cat(out)


def _reference_tiles(model, pixel_values, handle, with_importance: bool = False):
    """Layer-by-layer SigLIP with compression; importance = eager attention received, averaged over heads and queries.

    ``with_importance``: also return each output token's importance after the last stage, written out: a kept
    patch's own, a merged token's the sum over its members."""
    tower, cfg = model.model.vision_tower, handle.vmtc
    h = tower.embeddings(pixel_values)
    by_layer = {s.layer: s for s in handle.active_stages}
    last = unclutter.vmtc.feature_block(len(tower.encoder.layers), model.config.vision_feature_layer)
    out_importance = None
    for i, block in enumerate(tower.encoder.layers[: last + 1]):
        attn_out, weights = block.self_attn(block.layer_norm1(h))
        h = h + attn_out
        if i in by_layer:
            s = by_layer[i]
            imp = weights.mean(1).mean(1)
            h, info = unclutter.vmtc.compress(
                h, imp, s.keep, s.clusters, merge=cfg.merge, normalize=cfg.normalize, has_cls=False
            )
            out_importance = written_out_output_importance(info, imp, s.keep, h.shape[1])
        h = h + block.mlp(block.layer_norm2(h))
    feats = model.model.multi_modal_projector(h)
    return (feats, out_importance) if with_importance else feats


# Stock's high-res patch grid (rows x cols of tokens after unpadding, and interpolation for 96x96) and the image's
# high-res tile grid, per image size; the test below checks the grids against the stock processor's counts.
STOCK_HIGH_RES = {
    (96, 96): ((8, 8), (3, 3)),  # 12x12 interpolated to 8x8 (anyres_max_4)
    (64, 64): ((8, 8), (2, 2)),
    (30, 50): ((4, 6), (1, 2)),  # unpadded
    (50, 30): ((6, 4), (2, 1)),
    (40, 80): ((6, 12), (2, 3)),
}


def _capped(t: int, size: tuple[int, int]) -> int:
    """Tokens per high-res tile under VMTC: the budget's share (t of 16) of stock's high-res tokens, per tile."""
    (h, w), (rows, cols) = STOCK_HIGH_RES[size]
    return max(1, min(t, round(h * w * t / 16) // (rows * cols)))


def _reference_image(model, tiles, handle, size: tuple[int, int] | None) -> list[torch.Tensor]:
    """Per tile, the tokens it sends: `_reference_tiles`, then for an image whose share of stock's count is below
    its tiles' (``size``: its STOCK_HIGH_RES entry) the high-res tiles compressed again to the capped count,
    ranked and weighted by the written-out output importance. ``size=None``: a single tile."""
    feats, importance = _reference_tiles(model, tiles, handle, with_importance=True)
    t, cfg = handle.num_image_tokens, handle.vmtc
    if size is None or _capped(t, size) == t:
        return list(feats)
    capped = _capped(t, size)
    c = max(1, capped // 8) if cfg.merge == "cluster" else (0 if cfg.merge == "drop" else 1)
    high, _ = unclutter.vmtc.compress(
        feats[1:], importance[1:], capped - c, c, merge=cfg.merge, normalize=cfg.normalize, has_cls=False
    )
    assert high.shape[1] == capped < t
    return [feats[0]] + list(high)


def _expected(t: int, size: tuple[int, int]) -> int:
    rows, cols = STOCK_HIGH_RES[size][1]
    return t + rows * cols * _capped(t, size) + rows


def _bilinear_half(x: torch.Tensor) -> torch.Tensor:
    """(F, 16, E) 4x4 grids -> (F, 4, E): OneVision's frame pooling, written out."""
    grid = x.view(len(x), 4, 4, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(2, 2), mode="bilinear").permute(0, 2, 3, 1).reshape(len(x), 4, -1)


def _counts(model, batch) -> tuple[list[int], list[int]]:
    ids = batch["input_ids"]
    return (ids == model.config.image_token_id).sum(1).tolist(), (ids == model.config.video_token_id).sum(1).tolist()


@pytest.mark.parametrize("cfg", [VMTCConfig(ratio=0.5), VMTCConfig(num_tokens=3, merge="drop")])
def test_processor_counts_equal_model_features(cfg):
    model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    stock_images, stock_videos = _counts(model, _batch(processor))
    with unclutter.apply(model, processor, vmtc=cfg) as h, torch.no_grad():
        batch = _batch(processor)
        images, videos = _counts(model, batch)
        feats = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
            batch_num_images=batch["batch_num_images"],
        ).pooler_output  # fmt: skip
        video = model.model.get_video_features(pixel_values_videos=batch["pixel_values_videos"]).pooler_output
        logits(model, batch)  # the model's own checks: features and placeholders match
        t, per_frame = h.num_image_tokens, h.adapter.frame_tokens
        sizes = [(96, 96), (64, 64), (30, 50), (50, 30), (40, 80)]
        data = processor._get_num_multimodal_tokens(image_sizes=sizes, video_sizes=[(3, 40, 40)])
    lengths = [len(f) for f in feats]
    assert [_grid(model, s) for s in sizes] == [(3, 3), (2, 2), (1, 2), (2, 1), (2, 3)]
    assert images == [lengths[0], lengths[1] + lengths[2], 0, lengths[3]]
    stock_data = tiny_llava_onevision_processor()._get_num_multimodal_tokens(image_sizes=sizes)
    assert stock_data.num_image_tokens == [16 + h * (w + 1) for (h, w), _ in STOCK_HIGH_RES.values()]
    assert list(STOCK_HIGH_RES) == sizes
    assert lengths == [_expected(t, (96, 96)), t + 1, t + 1, _expected(t, (50, 30))]  # two single tiles between
    assert _capped(t, (96, 96)) < t and _capped(t, (50, 30)) < t and _capped(t, (64, 64)) == t
    assert videos == [0, 0, video.shape[1], 0] and video.shape[1] == 3 * per_frame + 1
    assert data.num_image_tokens == [_expected(t, size) for size in sizes]
    for ours, stock in zip(data.num_image_tokens, stock_data.num_image_tokens, strict=True):
        assert ours <= stock * t / 16 + 3  # the budget's share of stock's count (+ newlines, rounding)
    assert data.num_video_tokens == [3 * per_frame + 1]
    assert all(a < b for a, b in zip(images + videos, stock_images + stock_videos, strict=True) if b)


def test_vmtc_ratio_one_is_stock_on_images_and_videos():
    model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    batch = _batch(processor)
    stock = logits(model, batch)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=1.0)) as h:
        again = _batch(processor)
        assert torch.equal(again["input_ids"], batch["input_ids"])
        assert torch.equal(logits(model, again), stock)
    assert h.active_stages == [] and not h.adapter.compresses_frames


def test_vmtc_budget_per_tile_and_per_frame():
    model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5)) as h:
        logits(model, _batch(processor))
    assert (h.num_image_tokens, h.stock_image_tokens) == (8, 16)  # half of each 4x4 tile
    assert (h.adapter.frame_tokens, h.adapter.stock_frame_tokens) == (2, 4)  # half of each 2x2-pooled frame
    tiles = 10 + 1 + 1 + 3  # 3x3 tiles + base, two single tiles, 2x1 tiles + base
    assert len(h.stage_infos) == len(h.active_stages) > 1
    for info, stage in zip(h.stage_infos, h.active_stages, strict=True):
        assert info.importance.shape == (tiles, stage.tokens_in) and info.kept_index.shape == (tiles, stage.keep)
    assert h.adapter.frame_info.importance.shape == (3, 4)  # one row per frame, over its pooled tokens


@pytest.mark.parametrize("attn", ["eager", "sdpa"])  # sdpa: ranked inside the stage blocks' attention
@pytest.mark.parametrize("cfg", [VMTCConfig(), VMTCConfig(num_tokens=6, num_stages=2, merge="single")])
def test_vmtc_features_equal_layerwise_reference(cfg, attn):
    model = tiny_llava_onevision(attn_implementation=attn)
    reference_model = tiny_llava_onevision(attn_implementation="eager")  # eager returns the weights references need
    processor = tiny_llava_onevision_processor()
    with unclutter.apply(model, processor, vmtc=cfg) as h, torch.no_grad():
        assert len(h._ranked) == (len(h.active_stages) if attn == "sdpa" else 0)
        batch = _batch(processor)
        got = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
            batch_num_images=batch["batch_num_images"],
        ).pooler_output  # fmt: skip
        video = model.model.get_video_features(pixel_values_videos=batch["pixel_values_videos"]).pooler_output[0]
        newline = model.model.image_newline
        grids = [_grid(model, (96, 96)), None, None, _grid(model, (50, 30))]
        for i, (grid, size) in enumerate(zip(grids, [(96, 96), None, None, (50, 30)], strict=True)):
            tiles = batch["pixel_values"][i][: 1 + grid[0] * grid[1] if grid else 1]
            ref = _reference_pack(_reference_image(reference_model, tiles, h, size), grid, newline)
            torch.testing.assert_close(got[i], ref)
    with torch.no_grad():  # the stock tower (removed VMTC): every patch of every frame
        frames = batch["pixel_values_videos"][0]
        out = reference_model.model.vision_tower(frames, output_hidden_states=True, output_attentions=True)
        importance = out.attentions[h.active_stages[-1].layer].mean(1).mean(1)  # (frames, 16) received
        pooled = _bilinear_half(reference_model.model.multi_modal_projector(out.hidden_states[-1]))
        weights = _bilinear_half(importance[..., None])[..., 0]
        clusters = h.adapter.frame_clusters(h)
        ref, _ = unclutter.vmtc.compress(
            pooled, weights, h.adapter.frame_tokens - clusters, clusters, merge=cfg.merge, has_cls=False
        )
        torch.testing.assert_close(video, torch.cat([ref.flatten(0, 1), newline[None]]))


@pytest.mark.parametrize("kwargs", [{"cmai": CMAIConfig()}, {"vmtc": VMTCConfig()}])
def test_image_key_map_names_each_keys_tile_token(kwargs):
    model = tiny_llava_onevision(attn_implementation="eager")
    processor = tiny_llava_onevision_processor()
    with unclutter.apply(model, processor, **kwargs) as h, torch.no_grad():
        batch = _batch(processor, PROMPTS[3:])  # 2x1 tiles, unpadded (not interpolated) by the stock packing
        keys = h.adapter.image_key_map(h, batch)
        packed = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        ).pooler_output[0]  # fmt: skip
        tiles = batch["pixel_values"][0]
        per_tile = (
            _reference_image(model, tiles, h, (50, 30))  # high-res tiles compressed again (the share of stock's)
            if "vmtc" in kwargs
            else model.model.multi_modal_projector(
                model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-1]
            )
        )
        big = _batch(processor, PROMPTS[:1])  # 3x3 tiles
        interpolated, big_count = h.adapter.image_key_map(h, big), _counts(model, big)[0][0]
    assert len(keys) == len(packed) == _counts(model, batch)[0][0]
    expected = torch.stack([model.model.image_newline if key is None else per_tile[key[0]][key[1]] for key in keys])
    torch.testing.assert_close(packed, expected)
    assert len(interpolated) == big_count
    if "cmai" in kwargs:  # stock interpolates the 12x12 grid to 8x8: those keys hold no single tile token
        assert interpolated[16:] == [None] * (8 * 9)


def test_vmtc_cmai_cached_decode_equals_full_and_batch_equals_single_on_images_and_videos():
    model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    assert_cached_equals_full_and_batch_equals_single(
        model, processor, PROMPTS[:3], vmtc=VMTCConfig(), cmai=CMAIConfig()
    )


def test_anyres_max_cap_on_the_real_checkpoints_tiling():
    """The real checkpoints' tiling (384 px tiles of 27x27 patches, grids 1x1 ... 6x6, anyres_max_9): under VMTC
    no image sends more than the budget's share of stock's count (plus the newlines per tile row), for images
    that stock interpolates as well as for those it does not; counts from the stock processor (before apply)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from unclutter.models.tiny import text_kwargs, vision_kwargs
    from unclutter.models.tiny_llava_onevision import tiny_onevision_tokenizer

    pinpoints = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]
    tok = tiny_onevision_tokenizer()
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision_kwargs(384, 14, 1, intermediate=32, vision_use_head=False)),
        text_config=Qwen2Config(**text_kwargs(tok, layers=1, intermediate=32)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints),
        tokenizer=tok, num_image_tokens=27 * 27, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", video_processor=LlavaOnevisionVideoProcessor(),
    )  # fmt: skip
    sizes = [(384 * r + 7, 384 * c - 5) for r in range(1, 7) for c in range(1, 7)] + [(3000, 2900), (500, 2300)]
    stock = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    for ratio in (0.5, 0.25):
        with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=ratio)) as h:
            ours = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
            share = h.num_image_tokens / 27**2
            for size, a, b in zip(sizes, stock, ours, strict=True):
                rows, _ = h.adapter.image_grid(size)
                # the share of stock's count; we send one newline per tile row where stock sends one per patch row
                assert share * a - rows * 27 - 364 <= b <= share * a + rows + 1, (ratio, size, a, b)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5)) as h:  # a per-tile budget alone: 364 x 37 + 6
        assert h.adapter.image_tokens(h, (2304, 2304)) <= (729 + 81 * 82) / 2 + 6  # stock: 162x162 -> 81x81 + newlines


def test_remove_restores_the_processors_stock_counts():
    model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    batch = _batch(processor)
    stock = logits(model, batch)
    stock_data = processor._get_num_multimodal_tokens(image_sizes=[(96, 96)], video_sizes=[(3, 40, 40)])
    handle = unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig())
    assert _counts(model, _batch(processor)) != _counts(model, batch)
    handle.remove()
    again = _batch(processor)
    assert torch.equal(again["input_ids"], batch["input_ids"])
    data = processor._get_num_multimodal_tokens(image_sizes=[(96, 96)], video_sizes=[(3, 40, 40)])
    assert (data.num_image_tokens, data.num_video_tokens) == (stock_data.num_image_tokens, stock_data.num_video_tokens)
    assert not {"replace_image_token", "replace_video_token", "_get_num_multimodal_tokens"} & set(vars(processor))
    assert not {"pack_image_features", "get_video_features", "apply_pooling"} & set(vars(model.model))
    assert torch.equal(logits(model, again), stock)


def test_unsupported_setups_fail_loudly():
    model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    video_only = _batch(processor, PROMPTS[2:3])
    with unclutter.apply(model, vmtc=VMTCConfig()), pytest.raises(ValueError, match="expands '<video>'"):
        model(**video_only)  # stock video placeholders, compressed frames
    with pytest.raises(ValueError, match="importance='received'"):
        unclutter.apply(model, vmtc=VMTCConfig(importance="cls"))
    with pytest.raises(NotImplementedError, match="SPD is not available"):
        unclutter.apply(model, spd=unclutter.SPDConfig(grid=2))
    assert "_unclutter_handle" not in vars(model.model)
