"""Pictures for every family with recorded VMTC stages: the adapter's tiles and image-key layout match what the LLM
really receives (checked against the projector's outputs and the LLM's input embeddings), and `unclutter visualize`
draws one row per tile."""

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image
from transformers.video_utils import VideoMetadata
from typer.testing import CliRunner

import unclutter
from unclutter.cli import app
from unclutter.config import CMAIConfig, VMTCConfig
from unclutter.models.tiny import tiny_vlm
from unclutter.viz import tile_image, trace_groups

pytestmark = pytest.mark.exact


@pytest.mark.parametrize(
    "family, tiles, size",
    [
        ("llava", 1, None),
        ("llava_next", 5, None),
        ("llava_next", 5, (50, 70)),  # 2x2 tiles, 2 of 8 patch rows padding: the high-res share compresses again
        ("llava_onevision", 10, None),
        ("gemma3", 1, None),
        ("internvl", 5, None),
        ("idefics3", 1, None),
        ("qwen2_5_vl", 1, None),
        ("qwen3_vl", 1, None),
    ],
)
def test_image_key_map_is_what_the_llm_receives(family, tiles, size):
    """Every key the adapter maps to (tile t, token j) holds exactly the projector's output t, j; the others
    (LLaVA-NeXT's row newlines) hold no tile token. Tiles are the rows VMTC ranked."""
    spec = tiny_vlm(family)
    model, processor = spec.model(), spec.processor()
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5)) as handle:
        image = random_image(3) if size is None else random_image(3, *size)
        inputs = spec.batch(processor, [image], ["what is the color ?"])
        grabbed = {}

        def keep(name):
            def hook(module, args, *rest):  # the projector's output, or the LLM's keyword inputs
                grabbed.setdefault(name, rest[0] if name == "tiles" else rest[0]["inputs_embeds"])

            return hook

        projector = handle.adapter.vision_modules()[1]
        hooks = [
            projector.register_forward_hook(keep("tiles")),
            handle.adapter.language_model.register_forward_pre_hook(keep("embeds"), with_kwargs=True),
        ]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        found = handle.adapter.vision_tiles(handle, inputs)
        keys = handle.adapter.image_key_map(handle, inputs)
    projected = grabbed["tiles"].reshape(len(found), -1, grabbed["tiles"].shape[-1])  # (tiles, tokens, E)
    assert len(found) == tiles == len(handle.stage_infos[0].importance)
    assert [t.row for t in found] == list(range(tiles))
    units = handle.stage_infos[0].importance.shape[1]
    assert all(t.grid[0] * t.grid[1] == units for t in found)
    media = torch.tensor(handle.adapter.media_token_ids())
    positions = torch.isin(inputs["input_ids"][0], media).nonzero().flatten()
    assert len(keys) == len(positions)
    embeds = grabbed["embeds"][0]
    every_token = projected.reshape(-1, projected.shape[-1])
    sent = [_after_tower(projected[t], handle.post_infos.get(t)) for t in range(tiles)]
    # OneVision's 3x3 tiles: a share of stock's 8x8; a padded LLaVA-NeXT image: a share of its unpadded grid
    assert bool(handle.post_infos) == (family == "llava_onevision" or size is not None)
    for key, pos in zip(keys, positions.tolist(), strict=True):
        if key is None:
            assert not (embeds[pos] == every_token).all(-1).any()
        elif handle.post_infos:
            torch.testing.assert_close(embeds[pos], sent[key[0]][key[1]])
        else:
            torch.testing.assert_close(embeds[pos], projected[key], rtol=0, atol=0)
    held = sorted(k for k in keys if k is not None)
    assert held == [(t, j) for t in range(tiles) for j in range(len(sent[t]))]  # each tile token exactly once


def _after_tower(tokens: torch.Tensor, info) -> torch.Tensor:
    """(T, E) projected tile tokens -> what the tile sends after a recorded compression after the tower (written
    out: kept tokens, then each cluster's importance-weighted mean); unchanged without one."""
    if info is None:
        return tokens
    weights = info.importance[0]
    kept = [tokens[i] for i in info.kept_index[0].tolist()]
    merged = []
    for c in range(info.num_clusters):
        members = [
            i for i, cid in zip(info.merged_index[0].tolist(), info.cluster[0].tolist(), strict=True) if cid == c
        ]
        w = weights[members]
        merged.append((w[:, None] * tokens[members]).sum(0) / w.sum())
    return torch.stack(kept + merged)


def test_visualize_draws_every_tile(tmp_path):
    spec = tiny_vlm("llava_next")
    model, processor = spec.model(), spec.processor()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    random_image(5).save(tmp_path / "x.png")
    res = CliRunner().invoke(
        app, ["visualize", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"),
              "--prompt", "what is the color of the shape ?", "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    big = (tmp_path / "o" / "vmtc_tokens.png").stat().st_size
    assert big > 60000 and (tmp_path / "o" / "cmai_inhibition.png").stat().st_size > 20000  # five rows of tiles


def test_inhibited_share_follows_gamma(tmp_path):
    """The drawn CMAI keys are the traced ones: per layer, gamma's share of the image keys (newlines included)."""
    from unclutter.viz import visualize

    spec = tiny_vlm("internvl")
    cmai = CMAIConfig(gamma_max=0.5)
    out = visualize(spec.model(), spec.processor(), random_image(2), "what is it ?", tmp_path, cmai=cmai)
    assert out["tiles"] == [f"tile {i}" for i in range(5)]
    keys = 5 * 8  # five tiles of 8 tokens (16 units at ratio 0.5)
    for layer, share in out["inhibited_keys"].items():
        gamma = 0.5 * layer / 2
        assert abs(share - gamma) <= 1.5 / keys, (layer, share, gamma)
    assert out["inhibited"][0] == 0.0 and out["inhibited"][2] > 0.3


# ---- Qwen2.5-VL / Qwen3-VL: one picture per image (per video frame), in 2x2 merge units -----------------------------

QWEN = ["qwen2_5_vl", "qwen3_vl"]


def _qwen_turn(*media: str) -> str:
    pads = "".join(f"<|vision_start|><|{m}_pad|><|vision_end|>" for m in media)
    return f"<|im_start|>user {pads}what is it ?<|im_end|><|im_start|>assistant"


def _assert_traced_like_the_llm(handle, inputs, layouts, units_per_frame):
    """Every stage's groups partition the frame's units, as many as the stage's budget (the first stage's kept ones
    single units); the LLM token at cell c (`Layout.units`) is drawn on the group holding c."""
    adapter = handle.adapter
    tiles = adapter.vision_tiles(handle, inputs)
    plan = [s for s in adapter.budget.stages(units_per_frame) if not s.identity]
    assert [i.kept_index.shape[1] + i.num_clusters for i in handle.stage_infos] == [s.tokens_out for s in plan]
    assert adapter.stage_blocks(handle) == [s.layer for s in plan] and len(plan) > 1
    keys = adapter.image_key_map(handle, inputs)
    finals = []
    for t in tiles:
        assert t.grid[0] * t.grid[1] == units_per_frame and sorted(t.units) == list(range(units_per_frame))
        stages = trace_groups(handle.stage_infos, units_per_frame, t.row, t.units, t.orders)
        for groups, stage in zip(stages, plan, strict=True):
            assert len(groups) == stage.tokens_out and sum(g.kept for g in groups) == stage.keep
            assert sorted(p for g in groups for p in g.patches) == list(range(units_per_frame))
        assert all(len(g.patches) == 1 for g in stages[0] if g.kept)
        finals.append(stages[-1])
    cells = [c for layout in layouts for cells in layout.frames() for c in cells.tolist()]  # LLM order
    assert len([k for k in keys if k is not None]) == len(cells)
    for (t, j), cell in zip([k for k in keys if k is not None], cells, strict=True):
        assert cell in finals[t][j].patches
    return tiles, keys


@pytest.mark.parametrize("family", QWEN)
def test_qwen_images_are_traced_per_image_in_merge_units(family):
    """Two 48x64 images in one prompt: one tile each, the processor's pixels unpacked back to the image (3x4 units of
    16 px), every stage's kept + merged units the frame's budget, and each LLM token drawn where it sits."""
    spec = tiny_vlm(family)
    model, processor = spec.model(), spec.processor()
    images = [random_image(3, 48, 64), random_image(4, 48, 64)]
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5, layers=(0, 1, 3))) as handle:
        inputs = processor(images=images, text=[_qwen_turn("image", "image")], return_tensors="pt")
        with torch.no_grad():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        tiles, keys = _assert_traced_like_the_llm(handle, inputs, out.unclutter_layouts, 12)
    assert [t.name for t in tiles] == ["image 0", "image 1"] and [t.row for t in tiles] == [0, 1]
    for tile, image in zip(tiles, images, strict=True):
        np.testing.assert_allclose(tile_image(processor, tile.pixels), np.asarray(image) / 255, atol=1e-6)
    if family == "qwen2_5_vl":  # the tower ranks units window by window (windows of 2x2 units)
        assert tiles[0].units == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 10, 11]
    else:
        assert tiles[0].units == list(range(12))


@pytest.mark.parametrize("family", QWEN)
def test_qwen_video_frames_are_tiles(family):
    """A video and an image in one prompt: the last vision forward (the video's) gives one tile per frame; the
    image's pads hold no tile token."""
    spec = tiny_vlm(family)
    model, processor = spec.model(), spec.processor()
    frames = (np.random.RandomState(0).rand(4, 32, 48, 3) * 255).astype("uint8")
    meta = VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=list(range(4)))
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5, layers=(0, 1, 3))) as handle:
        inputs = processor(
            text=[_qwen_turn("image", "video")], images=[random_image(1, 64)], videos=[frames],
            video_metadata=[meta], do_sample_frames=False, return_tensors="pt",
        )  # fmt: skip
        with torch.no_grad():
            out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        tiles, keys = _assert_traced_like_the_llm(handle, inputs, out.unclutter_layouts, 6)
    assert [t.name for t in tiles] == ["video, frame 0", "video, frame 1"]
    images = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert keys[:images] == [None] * images


def test_qwen_frames_of_different_sizes_say_why_they_have_no_rows():
    spec = tiny_vlm("qwen3_vl")
    model, processor = spec.model(), spec.processor()
    images = [random_image(3, 48, 64), random_image(4, 64, 64)]
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5)) as handle:
        inputs = processor(images=images, text=[_qwen_turn("image", "image")], return_tensors="pt")
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        assert handle.stage_infos == []
        with pytest.raises(ValueError, match="different sizes"):
            handle.adapter.vision_tiles(handle, inputs)


@pytest.mark.parametrize("family", QWEN)
def test_visualize_draws_one_picture_per_qwen_image(family, tmp_path):
    """`unclutter visualize` on a saved tiny Qwen: one row (the image) in both pictures."""
    spec = tiny_vlm(family)
    spec.model().save_pretrained(tmp_path / "m")
    spec.processor().save_pretrained(tmp_path / "m")
    random_image(5, 48, 64).save(tmp_path / "x.png")
    res = CliRunner().invoke(
        app, ["visualize", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"),
              "--prompt", "what is the color ?", "--out", str(tmp_path / "o"), "--set", "vmtc.ratio=0.25"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for name in ("vmtc_tokens.png", "cmai_inhibition.png"):
        assert Image.open(tmp_path / "o" / name).height < 400  # one row of panels


def test_visualize_says_why_nothing_was_drawn(tmp_path):
    from unclutter.viz import visualize

    spec = tiny_vlm("qwen2_5_vl")
    with pytest.raises(ValueError, match="kept every unit"):
        visualize(
            spec.model(), spec.processor(), random_image(2, 48, 64), "what ?", tmp_path, vmtc=VMTCConfig(ratio=1.0)
        )
