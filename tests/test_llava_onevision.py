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
from reference import reference_logits
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


def _reference_tiles(model, pixel_values, handle) -> torch.Tensor:
    """Layer-by-layer SigLIP with compression; importance = eager attention received, averaged over heads and queries."""
    tower, cfg = model.model.vision_tower, handle.vmtc
    h = tower.embeddings(pixel_values)
    by_layer = {s.layer: s for s in handle.active_stages}
    last = unclutter.vmtc.feature_block(len(tower.encoder.layers), model.config.vision_feature_layer)
    for i, block in enumerate(tower.encoder.layers[: last + 1]):
        attn_out, weights = block.self_attn(block.layer_norm1(h))
        h = h + attn_out
        if i in by_layer:
            s = by_layer[i]
            imp = weights.mean(1).mean(1)
            h, _ = unclutter.vmtc.compress(
                h, imp, s.keep, s.clusters, merge=cfg.merge, normalize=cfg.normalize, has_cls=False
            )
        h = h + block.mlp(block.layer_norm2(h))
    return model.model.multi_modal_projector(h)


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
    assert lengths == [t * 10 + 3, t + 1, t + 1, t * 3 + 2]  # 3x3 tiles, two single tiles, 2x1 tiles
    assert videos == [0, 0, video.shape[1], 0] and video.shape[1] == 3 * per_frame + 1
    assert data.num_image_tokens == [t * 10 + 3, t * 5 + 2, t * 3 + 1, t * 3 + 2, t * 7 + 2]
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


@pytest.mark.parametrize("cfg", [VMTCConfig(), VMTCConfig(num_tokens=6, num_stages=2, merge="single")])
def test_vmtc_features_equal_layerwise_reference(cfg):
    model = tiny_llava_onevision(attn_implementation="eager")  # eager returns the weights the references need
    processor = tiny_llava_onevision_processor()
    with unclutter.apply(model, processor, vmtc=cfg) as h, torch.no_grad():
        batch = _batch(processor)
        got = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
            batch_num_images=batch["batch_num_images"],
        ).pooler_output  # fmt: skip
        video = model.model.get_video_features(pixel_values_videos=batch["pixel_values_videos"]).pooler_output[0]
        newline = model.model.image_newline
        grids = [_grid(model, (96, 96)), None, None, _grid(model, (50, 30))]
        for i, grid in enumerate(grids):
            tiles = batch["pixel_values"][i][: 1 + grid[0] * grid[1] if grid else 1]
            ref = _reference_pack(_reference_tiles(model, tiles, h), grid, newline)
            torch.testing.assert_close(got[i], ref)
    with torch.no_grad():  # the stock tower (removed VMTC): every patch of every frame
        frames = batch["pixel_values_videos"][0]
        out = model.model.vision_tower(frames, output_hidden_states=True, output_attentions=True)
        importance = out.attentions[h.active_stages[-1].layer].mean(1).mean(1)  # (frames, 16) received
        pooled = _bilinear_half(model.model.multi_modal_projector(out.hidden_states[-1]))
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
            _reference_tiles(model, tiles, h)
            if "vmtc" in kwargs
            else model.model.multi_modal_projector(
                model.model.vision_tower(tiles, output_hidden_states=True).hidden_states[-1]
            )
        )
        big = _batch(processor, PROMPTS[:1])  # 3x3 tiles
        interpolated, big_count = h.adapter.image_key_map(h, big), _counts(model, big)[0][0]
    assert len(keys) == len(packed) == _counts(model, batch)[0][0]
    expected = torch.stack([model.model.image_newline if key is None else per_tile[key] for key in keys])
    torch.testing.assert_close(packed, expected)
    assert len(interpolated) == big_count
    if "cmai" in kwargs:  # stock interpolates the 12x12 grid to 8x8: those keys hold no single tile token
        assert interpolated[16:] == [None] * (8 * 9)


def test_vmtc_cmai_cached_decode_equals_full_and_batch_equals_single_on_images_and_videos():
    model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    assert_cached_equals_full_and_batch_equals_single(
        model, processor, PROMPTS[:3], vmtc=VMTCConfig(), cmai=CMAIConfig()
    )


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
