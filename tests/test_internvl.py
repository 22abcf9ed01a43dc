"""InternVL: tiles, the pixel shuffle, unit-wise VMTC, SPD, structural markers under CMAI, the processor.

References: stock transformers (features, pixel shuffle, counts), a layer-by-layer InternViT written here
with the 2x2 regrouping spelled out by index, the naive Eq. 9-11 loop (`reference.py`), one uncached
forward over the tokens cached `generate` produced, and each sample run alone.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_sample_equals_alone, extend, generate, logits, random_image, random_video
from reference import reference_logits
from transformers.models.internvl import modeling_internvl

import unclutter
from unclutter import CMAIConfig, SPDConfig, VMTCConfig
from unclutter.cmai import gamma_schedule
from unclutter.integrations.internvl import unit_order, units_to_tokens
from unclutter.models.tiny_internvl import TOKENS_PER_TILE, tiny_internvl, tiny_internvl_processor

pytestmark = pytest.mark.exact

SIDE = 8  # patch grid of a 56 px tile (patch 7)
# (height, width) -> 1 tile, 2x1 + thumbnail = 3 tiles, 1x2 + thumbnail = 3 tiles, 2x2 + thumbnail = 5 tiles
SIZES = [(56, 56), (56, 112), (112, 56), (112, 112)]
TILES = [1, 3, 3, 5]
QUESTIONS = ["what is the color of the shape ? please answer in one word .", "how many ?", "describe it .", "yes ?"]


def _prompt(processor, question: str, images: int = 1) -> str:
    return f"user : {' '.join([processor.image_token] * images)} {question} assistant :"


def _encode(processor, images, questions=QUESTIONS, per_sample=1):
    text = [_prompt(processor, q, per_sample) for q in questions[: len(images) // per_sample]]
    return processor(images=images, text=text, return_tensors="pt", padding=True)


@pytest.fixture
def model():
    return tiny_internvl()


@pytest.fixture
def processor():
    return tiny_internvl_processor()


@pytest.fixture(scope="module")
def images():
    return [random_image(i, *size) for i, size in enumerate(SIZES)]


def _counts(batch, token_id: int) -> list[int]:
    return (batch["input_ids"] == token_id).sum(dim=1).tolist()


def _features(model, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=pixel_values).pooler_output


# ---- the pixel shuffle, unit by unit -------------------------------------------------------------------


def test_unit_wise_shuffle_equals_the_stock_pixel_shuffle(model):
    for side in (SIDE, 12):
        grid = torch.randn(3, side, side, 5)
        stock = model.model.pixel_shuffle(grid, scale_factor=0.5).flatten(1, 2)
        ours = units_to_tokens(grid.flatten(1, 2)[:, unit_order(side, 2)], 2)
        assert torch.equal(ours, stock)
    # entry u*4 + a*2 + b of the unit order is patch (2i + a, 2j + b) of unit u = (i, j), row-major
    order = unit_order(SIDE, 2).tolist()
    for u, (i, j) in enumerate((i, j) for i in range(SIDE // 2) for j in range(SIDE // 2)):
        assert order[4 * u : 4 * u + 4] == [(2 * i + a) * SIDE + 2 * j + b for a in (0, 1) for b in (0, 1)]


def test_ratio_one_is_stock_bit_for_bit_on_multi_tile_batches(model, processor, images):
    batch = _encode(processor, images)
    stock_features = _features(model, batch["pixel_values"])
    with torch.no_grad():
        stock = model(**batch).logits
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=1.0), cmai=CMAIConfig(gamma_max=0.0)), torch.no_grad():
        again = _encode(processor, images)
        assert torch.equal(again["input_ids"], batch["input_ids"])
        assert torch.equal(_features(model, again["pixel_values"]), stock_features)
        assert torch.equal(model(**again).logits, stock)


def test_a_kept_unit_is_exactly_the_stock_post_shuffle_token(model, processor, images):
    """A single stage at the feature block: kept units saw only stock computation, so they equal stock tokens."""
    pixel_values = _encode(processor, images)["pixel_values"]
    stock = _features(model, pixel_values)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(layers=(3,), num_tokens=10, clusters=2)) as h:
        got = _features(model, pixel_values)
        info = h.stage_infos[0]
    assert got.shape == (sum(TILES), 10, stock.shape[-1]) and info.kept_index.shape == (sum(TILES), 8)
    kept = stock.gather(1, info.kept_index[..., None].expand(-1, -1, stock.shape[-1]))
    assert torch.equal(got[:, :8], kept)
    assert not torch.equal(got[:, 8:], stock[:, :2])  # the two merged tokens are new


# ---- VMTC against a layer-by-layer InternViT ----------------------------------------------------------


def _cls_attention(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N) head-mean softmax attention of the CLS query over the patches, from (B, T, E) q and k."""
    b, t, e = q.shape
    qh, kh = (x.view(b, t, heads, e // heads).transpose(1, 2) for x in (q, k))
    return ((qh[:, :, :1] @ kh.transpose(-1, -2)) / (e // heads) ** 0.5).softmax(-1).mean(1)[:, 0, 1:]


def _units_from_grid(patches: torch.Tensor, importance: torch.Tensor):
    """Regroup a row-major 8x8 grid into 2x2 units by index: (B, 16, 4D) tokens, (B, 16) mean importance."""
    b, _, d = patches.shape
    grid, imp = patches.view(b, SIDE, SIDE, d), importance.view(b, SIDE, SIDE)
    blocks = [(i, j) for i in range(0, SIDE, 2) for j in range(0, SIDE, 2)]
    tokens = torch.stack(
        [
            torch.cat([grid[:, i, j], grid[:, i, j + 1], grid[:, i + 1, j], grid[:, i + 1, j + 1]], -1)
            for i, j in blocks
        ],
        1,
    )
    return tokens, torch.stack([imp[:, i : i + 2, j : j + 2].mean((1, 2)) for i, j in blocks], 1)


def reference_vmtc(model, pixel_values, handle):
    """InternViT block by block with unit-wise VMTC; q/k for the importance taken after q_norm/k_norm.

    Returns the projected features and, per stage, the unit importance with and without the q/k norms.
    """
    tower, cfg = model.model.vision_tower, handle.vmtc
    stages = {s.layer: s for s in handle.active_stages}
    last = unclutter.vmtc.feature_block(len(tower.encoder.layer), model.config.vision_feature_layer)
    h, in_grid, importances = tower.embeddings(pixel_values), True, []
    for i, block in enumerate(tower.encoder.layer[: last + 1]):
        x, attn = block.layernorm_before(h), block.attention
        h = h + block.lambda_1 * attn(x)[0]
        if i in stages:
            s = stages[i]
            imp = _cls_attention(attn.q_norm(attn.q_proj(x)), attn.k_norm(attn.k_proj(x)), attn.num_heads)
            raw = _cls_attention(attn.q_proj(x), attn.k_proj(x), attn.num_heads)  # ignoring the norms (wrong)
            b, _, d = h.shape
            if in_grid:
                units, unit_imp = _units_from_grid(h[:, 1:], imp)
                raw_imp = _units_from_grid(h[:, 1:], raw)[1]
                in_grid = False
            else:
                units, unit_imp, raw_imp = h[:, 1:].reshape(b, -1, 4 * d), imp.view(b, -1, 4).mean(-1), None
            importances.append((unit_imp, raw_imp))
            units, _ = unclutter.vmtc.compress(
                units, unit_imp, s.keep, s.clusters, merge=cfg.merge, normalize=cfg.normalize, has_cls=False
            )
            h = torch.cat([h[:, :1], units.reshape(b, -1, d)], 1)
        h = h + block.lambda_2 * block.mlp(block.layernorm_after(h))
    if model.config.vision_feature_layer == -1:
        h = tower.layernorm(h)
    return model.model.multi_modal_projector(h[:, 1:].reshape(h.shape[0], -1, 4 * h.shape[-1])), importances


@pytest.mark.parametrize(
    "feature_layer, cfg",
    [
        (-1, VMTCConfig()),
        (-1, VMTCConfig(num_tokens=5, num_stages=2, merge="drop")),
        (-1, VMTCConfig(ratio=0.25, merge="single")),
        (-2, VMTCConfig(num_tokens=6, layers=(0, 2), stage_tokens=(11, 6), clusters=(3, 2), normalize=False)),
    ],
)
def test_vmtc_equals_layer_by_layer_reference(processor, images, feature_layer, cfg):
    model = tiny_internvl(vision_feature_layer=feature_layer)
    pixel_values = _encode(processor, images)["pixel_values"]
    with unclutter.apply(model, processor, vmtc=cfg) as h, torch.no_grad():
        got = _features(model, pixel_values)
        ref, importances = reference_vmtc(model, pixel_values, h)
        budget = cfg.num_tokens or round(cfg.ratio * TOKENS_PER_TILE)
        assert h.num_image_tokens == budget and got.shape[:2] == (sum(TILES), budget)
        assert [i.kept_index.shape[1] + i.num_clusters for i in h.stage_infos] == [s.tokens_out for s in h.stages]
        first, raw = importances[0]
        torch.testing.assert_close(h.stage_infos[0].importance, first, atol=1e-6, rtol=1e-5)
        assert (first - raw).abs().max() > 1e-3, "the q/k norms must matter for this test to discriminate"
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_vmtc_batch_of_tiles_equals_each_image_alone(model, processor, images):
    with unclutter.apply(model, processor, vmtc=VMTCConfig()):
        together = _features(model, _encode(processor, images)["pixel_values"])
        alone = _features(model, _encode(processor, images[3:], QUESTIONS[3:])["pixel_values"])  # the 5-tile image
    torch.testing.assert_close(together[sum(TILES[:3]) :], alone, atol=1e-6, rtol=1e-5)


# ---- counts: processor, model, per tile ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, per_tile",
    [
        ({}, TOKENS_PER_TILE),
        ({"vmtc": VMTCConfig(ratio=0.5)}, 8),
        ({"spd": SPDConfig(grid=2)}, 4),
        ({"spd": SPDConfig(grid=3)}, 9),
    ],
)
def test_per_tile_counts_processor_and_model_agree(model, processor, images, kwargs, per_tile):
    tok = processor.tokenizer
    # What stock counts per image changed upstream (5.24 counts <img> and </img>, 5.25 only the context tokens):
    # the patched count must keep stock's convention and move by exactly the tokens the method removed.
    stock = processor._get_num_multimodal_tokens(image_sizes=SIZES)
    markers = [n - TOKENS_PER_TILE * t for n, t in zip(stock.num_image_tokens, TILES, strict=True)]
    assert len(set(markers)) == 1 and markers[0] in (0, 2), stock.num_image_tokens
    with unclutter.apply(model, processor, **kwargs) as h, torch.no_grad():
        batch = _encode(processor, images)
        assert h.num_image_tokens == per_tile
        assert _counts(batch, model.config.image_token_id) == [per_tile * t for t in TILES]
        assert _counts(batch, tok.start_image_token_id) == _counts(batch, tok.end_image_token_id) == [1] * 4
        expected = processor._get_num_multimodal_tokens(image_sizes=SIZES)
        assert expected.num_image_patches == TILES
        assert expected.num_image_tokens == [per_tile * t + markers[0] for t in TILES]
        features = _features(model, batch["pixel_values"])
        assert features.shape[:2] == (sum(TILES), per_tile)
        model(**batch)  # stock InternVL checks that the features fill the placeholders exactly


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_spd_pools_the_stock_grid_of_tokens_to_grid_x_grid(model, processor, images, grid):
    """As on every family, grid x grid tokens per tile reach the LLM (it pooled the patch grid before the shuffle,
    giving (grid / 2)^2 tokens and refusing odd grids)."""
    pixel_values = _encode(processor, images)["pixel_values"]
    with torch.no_grad():
        patches = model.model.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]
        shuffled = model.model.pixel_shuffle(patches.reshape(len(patches), SIDE, SIDE, -1))  # (tiles, 4, 4, 4D)
        pooled = F.adaptive_avg_pool2d(shuffled.permute(0, 3, 1, 2), grid).flatten(2).transpose(1, 2)
        expected = model.model.multi_modal_projector(pooled)
        assert expected.shape[1] == grid * grid
        with unclutter.apply(model, processor, spd=SPDConfig(grid=grid)):
            got = _features(model, pixel_values)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_video_frames_are_tiles(model, processor):
    video = random_video(0, 3, 56, 56)
    text = [f"user : {processor.image_token} and {processor.video_token} what is it ? assistant :"]
    image = random_image(1, 56, 112)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()), torch.no_grad():
        batch = processor(images=[image], videos=[video], text=text, return_tensors="pt")
        assert batch["pixel_values"].shape[0] == 3 + 3  # image tiles + frames
        assert _counts(batch, model.config.image_token_id) == [8 * 6]
        assert _counts(batch, processor.tokenizer.start_image_token_id) == [1 + 3]  # one <img> per image and frame
        model(**batch)


# ---- CMAI: structural markers, multi-tile, cached decoding, batches -------------------------------------


def test_markers_are_structural_neither_keys_nor_text(model, processor, images):
    batch = _encode(processor, [images[0], images[1], images[3], images[2]], per_sample=2)  # two images a sample
    tok = processor.tokenizer
    with unclutter.apply(model, processor, cmai=CMAIConfig()) as h, torch.no_grad():
        assert h.adapter.structural_token_ids() == [tok.start_image_token_id, tok.end_image_token_id]
        model(**batch, use_cache=False)
        state = h.cmai_state
    ids, pad = batch["input_ids"], batch["attention_mask"].bool()
    markers = (ids == tok.start_image_token_id) | (ids == tok.end_image_token_id)
    image = ids == model.config.image_token_id
    for b in range(2):
        first = int(image[b].nonzero()[0])
        assert bool(markers[b, first + 1 :].any()), "some markers follow the first image: they could be text"
        text = [p for p in range(ids.shape[1]) if p > first and pad[b, p] and not image[b, p] and not markers[b, p]]
        assert state.text_pos[b, : int(state.text_count[b])].tolist() == text
        assert state.image_pos[b, state.image_valid[b]].tolist() == image[b].nonzero().flatten().tolist()
    # the naive loop of Eq. 9-11 (markers excluded the same way) on two multi-tile images per sample
    gammas = gamma_schedule(model.config.text_config.num_hidden_layers, 0.6)
    expected = reference_logits(model, batch, gammas)
    with unclutter.apply(model, cmai=CMAIConfig()), torch.no_grad():  # no processor: InternVL's id layout
        got = model(**batch, use_cache=False).logits
    torch.testing.assert_close(got[pad], expected[pad].float(), atol=5e-5, rtol=1e-4)


def test_a_run_without_markers_is_a_clear_error(model, processor, images):
    tok = processor.tokenizer
    batch = _encode(processor, images[:2])
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == tok.end_image_token_id, tok.eos_token_id)
    with unclutter.apply(model, processor, cmai=CMAIConfig()), pytest.raises(ValueError, match="not enclosed"):
        model(**batch)


def test_vmtc_cmai_multi_tile_cached_equals_full_and_batch_equals_single(model, processor, images):
    steps = 4
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()) as h, torch.no_grad():
        batch = _encode(processor, images)
        gen = generate(model, batch, steps)
        assert h.cmai_state.num_image_tokens.tolist() == [8 * t for t in TILES]  # different counts per sample
        full = logits(model, extend(batch, gen.sequences[:, :-1]))
        first = gen.sequences.shape[1] - 1 - steps
        for t in range(steps):
            torch.testing.assert_close(gen.logits[t], full[:, first + t], atol=1e-4, rtol=1e-4)
        alone = _encode(processor, images[1:2], QUESTIONS[1:2])  # 3 tiles, left-padded
        assert_sample_equals_alone(model, gen, 1, alone)
    with unclutter.apply(model, processor, vmtc=VMTCConfig()):
        vmtc_only = generate(model, batch, steps)  # same tokens, no inhibition: CMAI must act at every step
    assert all((a - b).abs().amax() > 1e-4 for a, b in zip(gen.logits, vmtc_only.logits, strict=True))


# ---- remove(), bad input, layout checks ---------------------------------------------------------------


def test_remove_restores_model_and_processor(model, processor, images):
    batch = _encode(processor, images)
    with torch.no_grad():
        stock = model(**batch).logits
    counts = processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    for kwargs in ({"vmtc": VMTCConfig(), "cmai": CMAIConfig()}, {"spd": SPDConfig(grid=2)}):
        handle = unclutter.apply(model, processor, **kwargs)
        with torch.no_grad():
            model(**_encode(processor, images))
        handle.remove()
        for name in ("replace_image_token", "replace_video_token", "_get_num_multimodal_tokens"):
            assert name not in vars(processor)
        assert "get_image_features" not in vars(model.model)
        assert all("forward" not in vars(m) for m in model.modules())
        again = _encode(processor, images)
        assert torch.equal(again["input_ids"], batch["input_ids"])
        assert processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens == counts
        with torch.no_grad():
            assert torch.equal(model(**again).logits, stock)


def test_stock_placeholders_without_processor(model, processor, images):
    batch = _encode(processor, images)
    with unclutter.apply(model, vmtc=VMTCConfig()), pytest.raises(ValueError, match="pass processor="):
        model(**batch)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spd": SPDConfig(grid=5)}, "larger than the 4x4 grid of tokens"),
        ({"vmtc": VMTCConfig(num_tokens=17)}, "impossible for 16 patches"),
    ],
)
def test_impossible_budgets(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        unclutter.apply(model, **kwargs)
    assert "_unclutter_handle" not in vars(model.model)


def test_processor_of_another_model_is_refused(model):
    processor = tiny_internvl_processor()
    processor.image_seq_length = 9
    with pytest.raises(ValueError, match="do not belong together"):
        unclutter.apply(model, processor, vmtc=VMTCConfig())


def test_a_changed_vision_layer_fails_loudly(model, monkeypatch):
    def forward(self, hidden_states):  # a release that dropped lambda_2
        hidden_states = hidden_states + self.lambda_1 * self.attention(self.layernorm_before(hidden_states))[0]
        return hidden_states + self.mlp(self.layernorm_after(hidden_states))

    monkeypatch.setattr(modeling_internvl.InternVLVisionLayer, "forward", forward)
    with pytest.raises(RuntimeError, match="no longer computes"):
        unclutter.apply(model, vmtc=VMTCConfig())
    assert "_unclutter_handle" not in vars(model.model)


def test_a_stage_block_offloaded_by_accelerate(model, processor, images, tmp_path):
    """A vision stage block offloaded to disk (accelerate keeps its weights on the meta device between calls): the
    layout check ran the block outside accelerate's wrapper and failed (cannot copy out of meta tensor)."""
    model.save_pretrained(tmp_path / "m")
    blocks = len(model.model.vision_tower.encoder.layer)
    device_map = {f"model.vision_tower.encoder.layer.{i}": "disk" if i == 1 else "cpu" for i in range(blocks)}
    device_map.update({name: "cpu" for name in ("model.vision_tower.embeddings", "model.multi_modal_projector",
                                                 "model.language_model", "lm_head")})  # fmt: skip
    dispatched = type(model).from_pretrained(tmp_path / "m", device_map=device_map, offload_folder=tmp_path / "off")
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()) as h, torch.no_grad():
        assert 1 in [s.layer for s in h.active_stages]
        expected = model(**_encode(processor, images)).logits
    with unclutter.apply(dispatched, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()), torch.no_grad():
        got = dispatched(**_encode(processor, images)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
