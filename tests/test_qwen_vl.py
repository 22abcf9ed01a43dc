"""Qwen2.5-VL and Qwen3-VL beyond the shared contract: dynamic resolution, several images, videos, M-RoPE, VMTC.

References are independent of the code under test: stock transformers (3-D positions, identity stages, the stock
tower's features and positions at the kept grid cells), the naive Eq. 9-11 loop (`reference.py`), the block's
own eager attention weights (importance, windows), one uncached forward over the generated tokens, and each
sample run alone.
"""

import numpy as np
import pytest
import torch
from helpers import assert_cached_equals_full, assert_sample_equals_alone, extend, logits, random_image
from reference import reference_logits
from transformers import AttentionInterface
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.video_utils import VideoMetadata
from transformers.vision_utils import get_vision_window_index

import unclutter
from unclutter import CMAIConfig, VMTCConfig
from unclutter.cmai import gamma_schedule
from unclutter.integrations.qwen_vl import replay
from unclutter.models.tiny import tiny_vlm

pytestmark = pytest.mark.exact
FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
RECORD = "unclutter_test_record_eager"


def video(seed: int, frames: int = 4, height: int = 32, width: int = 48) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (frames, height, width, 3)).astype("uint8")


def turn(question: str, *media: str) -> str:
    """One user turn in Qwen's format, one ``<|vision_start|>pad<|vision_end|>`` per image / video, in order."""
    pads = "".join(f"<|vision_start|><|{m}_pad|><|vision_end|>" for m in media)
    return f"<|im_start|>user {pads}{question}<|im_end|><|im_start|>assistant"


def encode(processor, texts, images=None, videos=None):
    extra = {}
    if videos is not None:  # fixed frames with timestamps: no sampling, no fps guess
        extra = dict(do_sample_frames=False, video_metadata=[_metadata(v) for v in videos])
    return processor(text=texts, images=images, videos=videos, return_tensors="pt", padding=True, **extra)


def _metadata(frames: np.ndarray) -> VideoMetadata:
    return VideoMetadata(total_num_frames=len(frames), fps=2.0, frames_indices=list(range(len(frames))))


def build(name: str):
    spec = tiny_vlm(name)
    torch.manual_seed(0)
    return spec.model(), spec.processor()


def media_counts(model, batch) -> list[int]:
    ids = torch.tensor([model.config.image_token_id, model.config.video_token_id])
    return torch.isin(batch["input_ids"], ids).sum(dim=1).tolist()


# ---- CMAI: 3-D positions, dynamic resolution, several images, videos --------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_processor_feeds_3d_positions_to_the_llm(name):
    model, processor = build(name)
    batch = encode(processor, [turn("how many ?", "image")], [random_image(0, 48, 64)])
    assert {"mm_token_type_ids", "image_grid_thw"} <= set(batch)
    seen = {}

    def grab(module, args, kwargs):
        seen["positions"] = kwargs["position_ids"]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        logits(model, batch)
    hook.remove()
    positions = seen["positions"][-3:, 0]  # (t, h, w) rows
    pads = batch["input_ids"][0] == model.config.image_token_id
    h, w = positions[1, pads], positions[2, pads]  # 48x64 px -> 3x4 grid cells
    assert h.unique().numel() == 3 and w.unique().numel() == 4
    assert not torch.equal(h, w)


@pytest.mark.parametrize("name", FAMILIES)
def test_cmai_images_of_different_sizes_and_several_per_prompt(name):
    model, processor = build(name)
    texts = [turn("what is the color of the shape ?", "image"), turn("how many ?", "image", "image")]
    images = [random_image(0, 64, 64), random_image(1, 48, 64), random_image(2, 32, 48)]
    batch = encode(processor, texts, images)
    assert media_counts(model, batch) == [16, 12 + 6]  # dynamic resolution: CMAI pads the image keys internally
    expected = reference_logits(model, batch, gamma_schedule(3, 0.6))
    stock = logits(model, batch)
    valid = batch["attention_mask"].bool()
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        got = logits(model, batch)
        together, _ = assert_cached_equals_full(model, batch)
        for i, imgs in enumerate([images[:1], images[1:]]):
            assert_sample_equals_alone(model, together, i, encode(processor, texts[i : i + 1], imgs), tokens=False)
    torch.testing.assert_close(got[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)
    assert (got[valid] - stock[valid]).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_cmai_a_video_and_an_image_in_one_batch(name):
    model, processor = build(name)
    texts = [turn("what is the color ?", "image"), turn("how many ?", "video")]
    batch = encode(processor, texts, [random_image(0, 64, 64)], [video(3)])
    assert "video_grid_thw" in batch and media_counts(model, batch) == [16, 2 * 6]  # 2 frames of 2x3 cells
    expected = reference_logits(model, batch, gamma_schedule(3, 0.6))
    valid = batch["attention_mask"].bool()
    with unclutter.apply(model, processor, cmai=CMAIConfig()):
        got = logits(model, batch)
        assert_cached_equals_full(model, batch)
    torch.testing.assert_close(got[valid], expected[valid].float(), atol=5e-5, rtol=1e-4)


# ---- VMTC ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_vmtc_with_every_stage_keeping_everything_is_the_stock_model(name):
    """num_tokens above every frame's size: the compressed tower, positions and processor run, and change nothing."""
    model, processor = build(name)
    texts = [turn("what is the color ?", "image"), turn("how many ?", "image", "video")]
    args = texts, [random_image(0, 64, 64), random_image(1, 48, 64)], [video(3)]
    stock_batch = encode(processor, *args)
    stock = logits(model, stock_batch)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(num_tokens=100)) as handle:
        batch = encode(processor, *args)
        assert torch.equal(batch["input_ids"], stock_batch["input_ids"])
        assert torch.equal(logits(model, batch), stock)
        assert [r.layer for r in handle.adapter.records] == handle.adapter.budget.layers


def record_attention(model) -> list:
    """Run the vision tower's attention through eager attention that records ``(module, weights)`` per call."""
    store = []

    def record(module, query, key, value, attention_mask, **kwargs):
        out, w = modeling_qwen2_5_vl.eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        store.append((module, w))
        return out, w

    AttentionInterface.register(RECORD, record)
    model.model.visual.set_attn_implementation(RECORD)
    return store


def features(model, batch):
    with torch.no_grad():
        return model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])


def received(weights, module) -> torch.Tensor:
    """(N,) mean head-averaged attention each patch receives, per sequence of the block's calls, concatenated."""
    return torch.cat([w.float().mean(1)[0].mean(0) for m, w in weights if m is module])


@pytest.mark.parametrize("name", FAMILIES)
def test_vmtc_keeps_the_top_units_by_the_blocks_eager_attention(name):
    """One drop stage after the last block's attention: the kept units are each frame's top units by the received
    attention of that block's eager weights, and their features, DeepStack features and M-RoPE positions are the
    stock model's at those grid cells."""
    model, processor = build(name)
    weights = record_attention(model)
    texts = [turn("what is the color ?", "image"), turn("how many ?", "image")]
    images = [random_image(0, 64, 64), random_image(1, 48, 64)]
    stock_batch = encode(processor, texts, images)
    stock = features(model, stock_batch)
    last = model.config.vision_config.depth - 1
    tokens = received(weights, model.model.visual.blocks[last].attn).view(-1, 4).mean(1)  # raster = tower order
    if name == "qwen2_5_vl":  # this tower works in window order: back to raster order
        index, _ = get_vision_window_index(stock_batch["image_grid_thw"], 2, 32, 8)
        tokens = tokens[torch.argsort(index)]
    with unclutter.apply(model, processor, vmtc=VMTCConfig(num_tokens=5, layers=(last,), merge="drop")) as handle:
        batch = encode(processor, texts, images)
        got = features(model, batch)
        with torch.no_grad():
            positions, _ = model.model.get_rope_index(
                batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
            )  # fmt: skip
        logits(model, batch)  # the prompt's placeholders match the compressed count
    stock_positions, _ = model.model.get_rope_index(
        stock_batch["input_ids"], stock_batch["mm_token_type_ids"], stock_batch["image_grid_thw"],
        attention_mask=stock_batch["attention_mask"],
    )  # fmt: skip
    for i, (cells, start) in enumerate(zip([16, 12], [0, 16], strict=True)):
        top = torch.sort(torch.topk(tokens[start : start + cells], 5).indices).values
        layout = got.unclutter_layouts[i]
        assert torch.equal(layout.units, top)
        torch.testing.assert_close(got.pooler_output[i], stock.pooler_output[i][top], atol=1e-5, rtol=1e-5)
        deepstack = zip(getattr(got, "deepstack_features", []), getattr(stock, "deepstack_features", []), strict=True)
        for ours, theirs in deepstack:
            torch.testing.assert_close(ours[i], theirs[i][top], atol=1e-5, rtol=1e-5)
        stock_pads = (stock_batch["input_ids"][i] == model.config.image_token_id).nonzero().flatten()
        pads = (batch["input_ids"][i] == model.config.image_token_id).nonzero().flatten()
        assert torch.equal(positions[:, i, pads], stock_positions[:, i, stock_pads[top]])
        tail = batch["input_ids"].shape[1] - int(pads[-1]) - 1  # text after the image: stock positions
        assert torch.equal(positions[:, i, -tail:], stock_positions[:, i, -tail:])
    assert [r.layer for r in handle.adapter.records] == [last]
    assert len(getattr(got, "deepstack_features", [])) == (2 if name == "qwen3_vl" else 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_vmtc_importance_is_the_received_eager_attention_within_each_blocks_pattern(name):
    """Every stage ranks by the attention its block's eager weights give (windows included, on compressed input);
    Qwen2.5-VL: a windowed block after a stage attends within the windows of the units left."""
    model, processor = build(name)
    weights = record_attention(model)
    visual = model.model.visual
    texts = [turn("what is the color ?", "image"), turn("how many ?", "image")]
    batch = encode(processor, texts, [random_image(0, 64, 64), random_image(1, 48, 64)])
    cfg = VMTCConfig(layers=(0, 1, 3)) if name == "qwen2_5_vl" else VMTCConfig(num_stages=3)
    with unclutter.apply(model, processor, vmtc=cfg) as handle:
        features(model, batch)
        records = handle.adapter.records
        assert [r.layer for r in records] == list(handle.adapter.budget.layers)
        for r in records:
            torch.testing.assert_close(
                r.importance, received(weights, visual.blocks[r.layer].attn), atol=1e-6, rtol=1e-5
            )
    if name == "qwen2_5_vl":  # block 0 is windowed: the first stage ranked within windows of 2x2 units
        assert torch.equal(records[0].cu_seqlens, get_vision_window_index(batch["image_grid_thw"], 2, 32, 8)[1])
        # block 2 (windowed) ran after the stage at block 1: one sequence per window of the units left
        with unclutter.apply(model, processor, vmtc=VMTCConfig(layers=(1,))):
            weights.clear()
            got = features(model, batch)
        index, cu = get_vision_window_index(batch["image_grid_thw"], 2, 32, 8)
        window_of_cell = torch.empty_like(index)
        window_of_cell[index] = torch.searchsorted(cu[1:].long() // 4, torch.arange(index.numel()), right=True)
        cells = torch.cat([x.units + offset for x, offset in zip(got.unclutter_layouts, [0, 16], strict=True)])
        per_window = torch.bincount(window_of_cell[cells])
        lengths = [w.shape[-1] for m, w in weights if m is visual.blocks[2].attn]
        assert lengths == (4 * per_window[per_window > 0]).tolist() and len(lengths) > 4


def test_deepstack_features_are_merged_like_the_stage_that_removed_their_units():
    """Qwen3-VL, one stage at block 1 merging all redundant units into one: DeepStack block 0's feature of the
    merged token is its merger applied to the importance-weighted mean (block 1's eager weights) of the redundant
    units' block-0 hidden states; kept tokens get the stock DeepStack features."""
    model, processor = build("qwen3_vl")
    weights = record_attention(model)
    visual = model.model.visual
    batch = encode(processor, [turn("how many ?", "image")], [random_image(1, 48, 64)])
    hidden = {}
    hook = visual.blocks[0].register_forward_hook(lambda m, a, out: hidden.setdefault("h", out))
    stock = features(model, batch)
    hook.remove()
    unit = received(weights, visual.blocks[1].attn).view(-1, 4).mean(1)
    keep = torch.sort(torch.topk(unit, 5).indices).values
    rest = torch.tensor([c for c in range(12) if c not in keep.tolist()])
    w = unit[rest] / unit[rest].sum()
    merged = (w[:, None] * hidden["h"].view(12, -1)[rest]).sum(0)
    expected = visual.deepstack_merger_list[0](merged.view(4, -1))[0]
    with unclutter.apply(model, processor, vmtc=VMTCConfig(num_tokens=6, layers=(1,), merge="single")):
        got = features(model, batch)
    layout = got.unclutter_layouts[0]
    rep = rest[unit[rest].argmax()]  # the merged token sits at its most important member's grid cell
    assert torch.equal(layout.units, torch.sort(torch.cat([keep, rep[None]])).values)
    slot = int((layout.units == rep).nonzero())
    ours = got.deepstack_features[0][0]
    torch.testing.assert_close(ours[slot], expected, atol=1e-5, rtol=1e-4)
    kept_slots = [i for i in range(6) if i != slot]
    torch.testing.assert_close(ours[kept_slots], stock.deepstack_features[0][0][keep], atol=1e-5, rtol=1e-5)


def test_replaying_a_stage_on_its_own_input_reproduces_it():
    torch.manual_seed(0)
    x, importance = torch.randn(3, 20, 8), torch.rand(3, 20)
    for merge in ("cluster", "single", "drop"):
        for normalize in (True, False):
            out, info = unclutter.vmtc.compress(x, importance, 6, 4, merge=merge, normalize=normalize, has_cls=False)
            assert torch.equal(replay(x, info, normalize), out)


@pytest.mark.parametrize("name", FAMILIES)
def test_vmtc_per_frame_budgets_for_images_and_a_video_cached_and_batched(name):
    """Each image and each video frame keeps half its units; the processor (and its token counter) agree with the
    features; VMTC + CMAI cached decoding equals one full forward and each sample alone."""
    model, processor = build(name)
    texts = [turn("what is the color of the shape ?", "image"), turn("how many ?", "image", "video")]
    images, videos = [random_image(0, 64, 64), random_image(1, 48, 64)], [video(3)]
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()):
        batch = encode(processor, texts, images, videos)
        assert media_counts(model, batch) == [8, 6 + 2 * 3]  # 16 -> 8, 12 -> 6, 2 frames x (6 -> 3)
        counted = processor._get_num_multimodal_tokens(image_sizes=[(64, 64), (48, 64)], video_sizes=[(4, 32, 48)])
        assert counted.num_image_tokens == [8, 6] and counted.num_video_tokens == [6]
        pads = (batch["input_ids"][1] == model.config.video_token_id).int().tolist()
        runs = [len(r) for r in "".join(map(str, pads)).split("0") if r]
        assert runs == ([3, 3] if name == "qwen3_vl" else [6])  # Qwen3-VL: one <|vision_start|> block per frame
        together, _ = assert_cached_equals_full(model, batch)
        for i, (imgs, vids) in enumerate([(images[:1], None), (images[1:], videos)]):
            alone = encode(processor, texts[i : i + 1], imgs, vids)
            assert_sample_equals_alone(model, together, i, alone, tokens=False)
        single = encode(processor, texts[1:], images[1:], videos)  # beams repeat the encoded features per beam
        with torch.no_grad():
            beams = model.generate(
                **single, max_new_tokens=3, min_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False,
                length_penalty=0.0, output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
        prompt = single["input_ids"].shape[1]
        for i in range(2):  # beam scores under cached VMTC + CMAI = log-probs of one uncached forward
            seq = beams.sequences[i : i + 1]
            logp = logits(model, extend(single, seq))[0, prompt - 1 : -1].log_softmax(-1)
            torch.testing.assert_close(
                beams.sequences_scores[i], logp.gather(1, seq[0, prompt:, None]).sum(), atol=1e-4, rtol=1e-4
            )


@pytest.mark.parametrize("name", FAMILIES)
def test_vmtc_features_encoded_before_generate_keep_their_own_cells(name):
    """``generate(mm_encoder_outputs=...)`` with features computed earlier (stock transformers: exactly the pixels'
    run): the prompt's 3-D positions come from the cells those features kept, even after another image of the same
    size was encoded; features the compressed tower did not make are refused."""
    model, processor = build(name)
    texts = [turn("what is it ?", "image")]
    first, second = random_image(0, 48, 80), random_image(1, 48, 80)  # same size, different content
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")

    def from_features(batch, features):
        with torch.no_grad():
            return model.generate(
                **{k: batch[k] for k in keys}, mm_encoder_outputs={"image": features}, max_new_tokens=3,
                min_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip

    def encoded(batch):
        with torch.no_grad():
            return model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])

    stock = encoded(encode(processor, texts, [first]))
    with unclutter.apply(model, processor, vmtc=VMTCConfig()):
        batch, other = encode(processor, texts, [first]), encode(processor, texts, [second])
        features = encoded(batch)
        assert not torch.equal(features.unclutter_layouts[0].units, encoded(other).unclutter_layouts[0].units)
        with torch.no_grad():
            from_pixels = model.generate(
                **batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        encoded(other)  # the last image encoded is now another one of the same size
        reference = from_features(batch, features)
        assert torch.equal(reference.sequences, from_pixels.sequences)
        for a, b in zip(reference.logits, from_pixels.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="not encoded by the compressed tower"):
            from_features(batch, stock)


def test_explicit_clusters_are_capped_per_frame_as_num_tokens_is():
    """One ``clusters`` setting serves images of every size: a small frame whose stages output fewer tokens than
    the clusters asked for merges into as many as it outputs (not an error at the processor call), a large one
    takes the setting as given; cached decoding stays exact."""
    model, processor = build("qwen2_5_vl")
    texts = [turn("what is it ?", "image"), turn("how many ?", "image")]
    images = [random_image(0, 32, 32), random_image(1, 64, 64)]  # 4 and 16 merge units
    with unclutter.apply(model, processor, vmtc=VMTCConfig(ratio=0.25, clusters=3)) as handle:
        batch = encode(processor, texts, images)
        assert media_counts(model, batch) == [1, 4]
        small, large = handle.adapter.budget.stages(4), handle.adapter.budget.stages(16)
        assert [s.clusters for s in small] == [min(3, s.tokens_out) for s in small] and small[-1].clusters == 1
        assert all(s.clusters == 3 for s in large)
        assert_cached_equals_full(model, batch, steps=2)


def test_vmtc_fails_loudly_on_a_stale_prompt_and_impossible_plans():
    model, processor = build("qwen2_5_vl")
    batch = encode(processor, [turn("how many ?", "image")], [random_image(0, 64, 64)])  # the stock 16 pads
    with unclutter.apply(model, vmtc=VMTCConfig()), pytest.raises(ValueError, match="pass processor="):
        logits(model, batch)
    with unclutter.apply(model, processor, vmtc=VMTCConfig()):
        batch = encode(processor, [turn("how many ?", "image")], [random_image(0, 64, 64)])
        without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}  # would be silent 1-D positions
        with pytest.raises(ValueError, match="mm_token_type_ids is missing"):
            logits(model, without)
        with pytest.raises(RuntimeError, match="without the images being encoded"):  # which cells were kept?
            model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"])
    with pytest.raises(ValueError, match="stage_tokens"):
        unclutter.apply(model, processor, vmtc=VMTCConfig(num_tokens=4, stage_tokens=(8, 4)))
    with pytest.raises(ValueError, match=r"full-attention|places stages on"):
        unclutter.apply(model, processor, vmtc=VMTCConfig(num_stages=3))  # two full-attention blocks
    with pytest.raises(ValueError, match="no CLS token"):
        unclutter.apply(model, processor, vmtc=VMTCConfig(importance="cls"))
    # the stage count is known at apply (frames are planned later, per size): a wrong-length clusters fails there
    with pytest.raises(ValueError, match="clusters has 5 values"):
        unclutter.apply(model, processor, vmtc=VMTCConfig(clusters=(1, 1, 1, 1, 1)))
    assert "get_rope_index" not in vars(model.model)  # failed applies leave nothing behind


def test_torch_compile_with_vmtc_and_cmai():
    """torch.compile traced the stage block's per-call qkv hook wrongly ("its qkv projection did not run" at the second
    stage); the stage block runs eagerly now, and the compiled model equals eager (aot_eager: the tracing is what
    broke; inductor's kernels are checked on LLaVA)."""
    model, processor = build("qwen2_5_vl")
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()), torch.no_grad():
        batch = encode(processor, [turn("how many ?", "image")] * 2, [random_image(0, 48, 64), random_image(1, 32, 48)])
        expected = model(**batch).logits
        got = torch.compile(model, backend="aot_eager")(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
