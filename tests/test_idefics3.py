"""Idefics3 and SmolVLM: tiles, image tags, several images, videos, and VMTC in pixel-shuffle units.

What the shared contract suite (tests/test_families.py) does not cover: prompts whose images are split into
tiles + a global image (different tile counts per sample), the structural tags, two images in one sample,
SmolVLM videos, the connector's unit-wise shuffle, VMTC against a layer-by-layer reference (padded patches
included), and the errors that name a fix. References: stock transformers, the naive Eq. 9-11 loop
(`reference.py`), one uncached forward, single samples, and a raster-order tower written here.
"""

import pytest
import torch
from helpers import (
    assert_cached_equals_full,
    assert_sample_equals_alone,
    logits,
    random_image,
    random_video,
    units_by_index,
)
from reference import reference_logits
from transformers.video_utils import VideoMetadata

import unclutter
from unclutter import CMAIConfig, VMTCConfig
from unclutter import vmtc as vmtc_math
from unclutter.cmai import gamma_schedule
from unclutter.integrations.idefics3 import to_units, unit_major
from unclutter.models import tiny_idefics3, tiny_smolvlm

pytestmark = pytest.mark.exact

FAMILIES = {"idefics3": tiny_idefics3, "smolvlm": tiny_smolvlm}
STOCK = tiny_idefics3.TOKENS_PER_TILE  # 16 image tokens per tile


def _prompt(question: str, images: int = 1) -> str:
    return "user : " + "<image> " * images + f"{question} <end_of_utterance> \n assistant :"


def _split_batch(processor):
    """Sample 0: a square image -> 2x2 tiles + global; sample 1: a 2:1 image -> 1x2 tiles + global."""
    images = [[random_image(0, 64, 64)], [random_image(1, 32, 64)]]
    text = [_prompt("what color ?"), _prompt("how many ?")]  # short: the naive reference loops over text rows
    return processor(images=images, text=text, return_tensors="pt", padding=True)


def _sample(batch, i: int):
    """Sample i of a processor batch alone, without its padding (left) and its padding tiles (all zero)."""
    keep = batch["attention_mask"][i].bool()
    real = (batch["pixel_values"][i].flatten(1) != 0).any(dim=1)
    return {
        "input_ids": batch["input_ids"][i : i + 1, keep],
        "attention_mask": batch["attention_mask"][i : i + 1, keep],
        "pixel_values": batch["pixel_values"][i : i + 1, real],
        "pixel_attention_mask": batch["pixel_attention_mask"][i : i + 1, real],
    }


def _assert_cached_equals_full_and_batch_equals_single(model, batch):
    gen, _ = assert_cached_equals_full(model, batch)
    for i in range(batch["input_ids"].shape[0]):
        assert_sample_equals_alone(model, gen, i, _sample(batch, i))


# ---- CMAI (issue 22) --------------------------------------------------------------------------------------


def test_cmai_on_split_images_with_different_tile_counts():
    model, processor = tiny_idefics3.tiny_model(), tiny_idefics3.tiny_processor(longest_edge=64)
    batch = _split_batch(processor)
    image = model.config.image_token_id
    assert (batch["input_ids"] == image).sum(dim=1).tolist() == [5 * STOCK, 3 * STOCK]
    gammas = gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    expected = reference_logits(model, batch, gammas)
    stock = logits(model, batch)
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        got = logits(model, batch)
        _assert_cached_equals_full_and_batch_equals_single(model, batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)
    assert (got[valid] - stock[valid]).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_structural_tags_are_neither_image_keys_nor_text_queries(name):
    tiny = FAMILIES[name]
    model, processor = tiny.tiny_model(), tiny.tiny_processor(longest_edge=64)
    tok = processor.tokenizer
    tags = sorted(tok.convert_tokens_to_ids(tiny_idefics3.TAGS))
    batch = _split_batch(processor)
    with unclutter.apply(model, processor, cmai=CMAIConfig()) as handle:
        assert sorted(handle.cmai_state.structural_token_ids) == tags
        logits(model, batch)
        state = handle.cmai_state
    ids = batch["input_ids"]
    for b in range(2):
        text = set(state.text_pos[b, : state.text_count[b]].tolist())
        keys = set(state.image_pos[b, state.image_valid[b]].tolist())
        assert keys == set((ids[b] == model.config.image_token_id).nonzero().flatten().tolist())
        first = min(keys)
        # text queries: every token after the first image that is neither an image key nor a tag
        assert text == {p for p in range(first, ids.shape[1]) if ids[b, p].item() not in tags and p not in keys}
        newlines = (ids[b] == tok.convert_tokens_to_ids("\n")).nonzero().flatten().tolist()
        assert all(p in text for p in newlines), "newlines between tile rows stay text"

    # one unsplit image: everything up to the closing tag is prefix, image keys or tags, so CMAI leaves it as stock
    model, processor = tiny.tiny_model(), tiny.tiny_processor()
    batch = processor(images=[[random_image(0, 32, 32)]], text=[_prompt("how many ?")], return_tensors="pt")
    closing = int((batch["input_ids"][0] == tok.convert_tokens_to_ids("<fake_token_around_image>")).nonzero().max())
    stock = logits(model, batch)
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        got = logits(model, batch)
    torch.testing.assert_close(got[0, : closing + 1], stock[0, : closing + 1], atol=1e-6, rtol=1e-6)
    assert (got[0, closing + 1 :] - stock[0, closing + 1 :]).abs().max() > 1e-3


def test_tag_ids_come_from_the_processor_or_the_config_and_are_required():
    model, processor = tiny_idefics3.tiny_model(), tiny_idefics3.tiny_processor()
    batch = processor(images=[[random_image(0, 32, 32)]], text=[_prompt("how many ?")], return_tensors="pt")
    with unclutter.apply(model, cmai=CMAIConfig()):  # tag ids from the config
        from_config = logits(model, batch)
    for field in unclutter.integrations.idefics3.CONFIG_TAG_FIELDS:
        delattr(model.config, field)
    with pytest.raises(ValueError, match="pass the processor"):
        unclutter.apply(model, cmai=CMAIConfig())
    with unclutter.apply(model, processor, cmai=CMAIConfig()):  # tag ids from the processor
        assert torch.equal(logits(model, batch), from_config)
    model.config.fake_image_token_id = 0  # a config that disagrees with the processor
    with pytest.raises(ValueError, match="differ from the model config"):
        unclutter.apply(model, processor, cmai=CMAIConfig())


def test_two_images_in_one_sample():
    model, processor = tiny_smolvlm.tiny_model(), tiny_smolvlm.tiny_processor()  # one global image each
    images = [[random_image(2, 32, 32), random_image(3, 32, 32)], [random_image(4, 32, 32)]]
    text = [_prompt("what is the color of the shape ?", images=2), _prompt("how many ?")]
    batch = processor(images=images, text=text, return_tensors="pt", padding=True)
    assert batch["pixel_values"].shape[1] == 2  # sample 1 is padded with an all-zero image
    assert (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [2 * STOCK, STOCK]
    gammas = gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    expected = reference_logits(model, batch, gammas)
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        got = logits(model, batch)
        _assert_cached_equals_full_and_batch_equals_single(model, batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)


# ---- VMTC (issue 23) --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale, side", [(2, 8), (3, 6), (4, 8)])
def test_unit_shuffle_is_the_connectors_pixel_shuffle_bit_for_bit(scale, side):
    model = tiny_idefics3.tiny_model()
    x = torch.randn(3, side * side, 5)
    assert torch.equal(to_units(x, scale), model.model.connector.pixel_shuffle(x, scale))
    assert torch.equal(unit_major(x, scale), to_units(x, scale).reshape(x.shape))


@pytest.mark.parametrize("name", FAMILIES)
def test_vmtc_ratio_one_is_stock_on_split_images(name):
    tiny = FAMILIES[name]
    model, processor = tiny.tiny_model(), tiny.tiny_processor(longest_edge=64)
    batch = _split_batch(processor)
    stock = logits(model, batch)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=1.0)) as handle:
        assert "forward" in vars(model.model.connector)  # the unit-wise connector runs, and changes nothing
        assert torch.equal(_split_batch(processor)["input_ids"], batch["input_ids"])
        assert torch.equal(logits(model, batch), stock)
    assert handle.active_stages == []


def _runs(ids: list[int], image: int) -> tuple[list, list[int]]:
    """The sequence with each run of image tokens collapsed to one marker, and the runs' lengths."""
    layout, runs = [], []
    for token in ids:
        if token == image and layout and layout[-1] == "IMG":
            runs[-1] += 1
        elif token == image:
            layout.append("IMG")
            runs.append(1)
        else:
            layout.append(token)
    return layout, runs


@pytest.mark.parametrize("name", FAMILIES)
def test_vmtc_gives_every_tile_the_budget_with_the_tags_unchanged(name):
    tiny = FAMILIES[name]
    model, processor = tiny.tiny_model(), tiny.tiny_processor(longest_edge=64)
    stock_batch = _split_batch(processor)
    sizes = [(64, 64), (32, 64)]
    # Idefics3's processor counts for serving code; SmolVLM's does from transformers 5.25 (only image tokens there)
    counts = hasattr(processor, "_get_num_multimodal_tokens")
    assert counts or name == "smolvlm"
    stock_counts = processor._get_num_multimodal_tokens(image_sizes=sizes) if counts else None
    image = model.config.image_token_id
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5), cmai=CMAIConfig()) as handle:
        assert handle.num_image_tokens == STOCK // 2
        batch = _split_batch(processor)
        for b, tiles in enumerate([5, 3]):
            ids = batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist()
            stock_ids = stock_batch["input_ids"][b][stock_batch["attention_mask"][b].bool()].tolist()
            layout, runs = _runs(ids, image)
            assert layout == _runs(stock_ids, image)[0] and runs == [STOCK // 2] * tiles
            if counts:  # the count serving code reads moves by exactly the tokens the method removed
                assert processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens[b] == (
                    stock_counts.num_image_tokens[b] - tiles * STOCK // 2
                )
        features = model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
        assert [f.shape[0] for f in features] == [5 * STOCK // 2, 3 * STOCK // 2]
        assert [info.kept_index.shape[0] for info in handle.stage_infos] == [8] * len(handle.active_stages)
        _assert_cached_equals_full_and_batch_equals_single(model, batch)
        with pytest.raises(ValueError, match="Pass processor="):  # a prompt expanded by the stock processor
            logits(model, stock_batch)
    assert torch.equal(_split_batch(processor)["input_ids"], stock_batch["input_ids"])


def _reference_tile_features(model, pixels, valid, stages, cfg) -> torch.Tensor:
    """VMTC on tiles (N, 3, H, W) with patch validity (N, h, w), written plainly: units gathered by raster
    index, attention with an explicit key mask, importance from an explicit softmax over valid queries/keys."""
    vision, connector, s = model.model.vision_model, model.model.connector, model.config.scale_factor
    n, side = pixels.shape[0], valid.shape[1]
    u = s * s
    index = units_by_index(side, s)
    hidden = vision.embeddings(pixels, patch_attention_mask=valid)[:, index]  # (N, T, D) unit by unit
    ok = valid.reshape(n, -1)[:, index]
    by_layer = {stage.layer: stage for stage in stages}
    for number, layer in enumerate(vision.encoder.layers):
        bias = torch.zeros(n, 1, 1, ok.shape[1]).masked_fill(~ok[:, None, None], float("-inf"))
        normed = layer.layer_norm1(hidden)
        hidden = hidden + layer.self_attn(normed, attention_mask=bias.expand(-1, -1, ok.shape[1], -1))[0]
        if number in by_layer:
            stage, attn = by_layer[number], layer.self_attn
            heads = attn.num_heads
            q = attn.q_proj(normed).view(n, -1, heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(normed).view(n, -1, heads, attn.head_dim).transpose(1, 2)
            probs = ((q @ k.transpose(-1, -2)) * attn.scale + bias).softmax(-1) * ok[:, None, :, None]
            received = probs.sum(dim=(1, 2)) / (heads * ok.sum(1, keepdim=True))  # (N, T)
            okf = ok.view(n, -1, u).float()
            unit_imp = (received.view(n, -1, u) * okf).sum(-1) / okf.sum(-1).clamp_min(1)
            units, info = vmtc_math.compress(
                hidden.reshape(n, -1, u * hidden.shape[-1]), unit_imp, stage.keep, stage.clusters,
                merge=cfg.merge, normalize=cfg.normalize, iters=cfg.kmeans_iters, has_cls=False,
            )  # fmt: skip
            slots = ok.view(n, -1, u)
            new_ok = [[slots[t, j] for j in info.kept_index[t]] for t in range(n)]
            for t in range(n):
                for cluster in range(units.shape[1] - stage.keep):
                    members = info.merged_index[t][info.cluster[t] == cluster]
                    new_ok[t].append(slots[t, members].any(dim=0))
            ok = torch.stack([torch.stack(rows) for rows in new_ok]).reshape(n, -1)
            hidden = units.reshape(n, -1, hidden.shape[-1])
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    hidden = vision.post_layernorm(hidden)
    return connector.modality_projection(hidden.reshape(n, -1, u * hidden.shape[-1]))


@pytest.mark.parametrize("name", FAMILIES)
def test_vmtc_features_equal_a_plain_reference_with_padded_patches(name):
    model = FAMILIES[name].tiny_model()
    pixels = torch.randn(3, 3, 32, 32)
    pixel_mask = torch.ones(3, 32, 32, dtype=torch.long)
    pixel_mask[1, :, 12:] = 0  # tile 1: only the 3 left patch columns are real (3 of its 4 unit columns are padding)
    pixel_mask[2, 24:, :] = 0  # tile 2: the last 2 patch rows are padding (one unit row)
    valid = pixel_mask.unfold(1, 4, 4).unfold(2, 4, 4).sum(dim=(-1, -2)) > 0  # (3, 8, 8) as the model derives it
    cfg = VMTCConfig(ratio=0.25, num_stages=2)
    with unclutter.apply(model, vmtc=cfg) as handle, torch.no_grad():
        got = model.model.get_image_features(pixels[None], pixel_mask[None]).pooler_output[0]
        kept = handle.stage_infos[0].kept_index  # units kept at the first stage (input: 16 units per tile)
        alone = model.model.get_image_features(pixels[None, 1:2], pixel_mask[None, 1:2]).pooler_output[0]
        expected = _reference_tile_features(model, pixels, valid, handle.active_stages, cfg)
    torch.testing.assert_close(got, expected.reshape(-1, expected.shape[-1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, got[4:8], atol=1e-5, rtol=1e-5)  # the mask, not the batch, hides padding
    real_units = {1: {0, 1, 4, 5, 8, 9, 12, 13}, 2: set(range(12))}  # units with at least one real patch
    for tile, units in real_units.items():
        assert set(kept[tile].tolist()) <= units, "a padding unit (importance 0) must never outrank a real one"


def test_smolvlm_video_frames_are_compressed_and_inhibited():
    model, processor = tiny_smolvlm.tiny_model(), tiny_smolvlm.tiny_processor()
    video = random_video(5, 3, 40, 48)
    meta = VideoMetadata(total_num_frames=3, fps=1.0, duration=3.0, frames_indices=[0, 1, 2])

    def encode():
        text = ["user : <video> how many ? <end_of_utterance> \n assistant :"]
        return processor(videos=[video], text=text, video_metadata=[meta], return_tensors="pt")

    stock_batch = encode()
    image = model.config.image_token_id
    assert _runs(stock_batch["input_ids"][0].tolist(), image)[1] == [STOCK] * 3
    # SmolVLM's processor counts video tokens for serving code from transformers 5.25
    counts = hasattr(processor, "_get_num_multimodal_tokens")
    if counts:
        assert processor._get_num_multimodal_tokens(video_sizes=[(3, 40, 48)]).num_video_tokens == [3 * STOCK]
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5), cmai=CMAIConfig()) as handle:
        batch = encode()
        layout, runs = _runs(batch["input_ids"][0].tolist(), image)
        assert runs == [STOCK // 2] * 3 and layout == _runs(stock_batch["input_ids"][0].tolist(), image)[0]
        if counts:  # the count serving code reads is what the processor now emits
            assert processor._get_num_multimodal_tokens(video_sizes=[(3, 40, 48)]).num_video_tokens == [3 * STOCK // 2]
        assert_cached_equals_full(model, batch)
        assert int(handle.cmai_state.num_image_tokens[0]) == 3 * STOCK // 2
    assert torch.equal(encode()["input_ids"], stock_batch["input_ids"])


def test_serving_counts_under_vmtc_log_no_spurious_warning():
    """Idefics3's `_get_num_multimodal_tokens` takes no ``video_sizes``: the wrapper must not pass one (transformers
    warns about every unknown keyword, None included), and still counts the compressed tiles."""
    import logging

    from transformers.utils import logging as hf_logging

    model, processor = tiny_idefics3.tiny_model(), tiny_idefics3.tiny_processor()
    stock = processor._get_num_multimodal_tokens(image_sizes=[(32, 32)]).num_image_tokens[0]  # (5.23 counts more)
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger, keep = hf_logging.get_logger("transformers"), Keep()
    logger.addHandler(keep)
    try:
        with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.5)):
            assert processor._get_num_multimodal_tokens(image_sizes=[(32, 32)]).num_image_tokens == [stock - STOCK // 2]
    finally:
        logger.removeHandler(keep)
    assert not [m for m in messages if "video_sizes" in m], messages


def test_vmtc_errors_name_the_fix():
    model, processor = tiny_idefics3.tiny_model(), tiny_idefics3.tiny_processor()
    with pytest.raises(ValueError, match="importance='received'"):
        unclutter.apply(model, vmtc=VMTCConfig(importance="cls"))
    processor.image_seq_len = 9
    with pytest.raises(ValueError, match="processor and model do not match"):
        unclutter.apply(model, processor, vmtc=VMTCConfig())
    with unclutter.apply(model, vmtc=VMTCConfig()), pytest.raises(RuntimeError, match="call the vision model"):
        model.model.vision_model.encoder(torch.zeros(1, 64, 32))
    assert not any("forward" in vars(m) for m in model.modules())
