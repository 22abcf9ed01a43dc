"""`unclutter.apply` on a tiny LLaVA: VMTC and SPD against references, remove(), budgets, bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPTS, encode, image_features
from reference import written_out_output_importance
from transformers import LlamaConfig, LlamaForCausalLM

import unclutter
from unclutter import CMAIConfig, SPDConfig, VMTCConfig
from unclutter.methods import resolve
from unclutter.models.tiny import tiny_llava

pytestmark = pytest.mark.exact  # the exactness suite CI runs on both ends of the transformers range


def stock_features(model, pixel_values):
    """(images, patches, vision_hidden) CLIP features LLaVA feeds its projector, CLS dropped."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def reference_vmtc_features(model, pixel_values, handle, with_importance: bool = False):
    """Layer-by-layer CLIP with compression; importance from the weights eager attention returns.

    ``with_importance``: also return each output patch token's importance after the last stage, written out: a
    kept patch's own, a merged token's the sum over its members."""
    tower = model.model.vision_tower
    h = tower.pre_layrnorm(tower.embeddings(pixel_values))
    by_layer = {s.layer: s for s in handle.stages}
    last = unclutter.vmtc.feature_block(len(tower.encoder.layers), model.config.vision_feature_layer)
    out_importance = None
    for i, block in enumerate(tower.encoder.layers[: last + 1]):
        attn_out, weights = block.self_attn(block.layer_norm1(h))
        h = h + attn_out
        if i in by_layer:
            s = by_layer[i]
            imp = weights.mean(1)[:, 0, 1:]
            cfg = handle.vmtc
            h, info = unclutter.vmtc.compress(h, imp, s.keep, s.clusters, merge=cfg.merge, normalize=cfg.normalize)
            out_importance = written_out_output_importance(info, imp, s.keep, h.shape[1] - 1)  # CLS first in h
        h = h + block.mlp(block.layer_norm2(h))
    return (h[:, 1:], out_importance) if with_importance else h[:, 1:]


@pytest.mark.parametrize(
    "cfg",
    [
        VMTCConfig(),
        VMTCConfig(num_tokens=9, num_stages=2),
        VMTCConfig(num_tokens=16, num_stages=1, merge="drop"),  # Table 4: last-layer pruning
        VMTCConfig(ratio=0.25, merge="single"),
        VMTCConfig(num_tokens=20, layers=(1, 3), stage_tokens=(40, 20), clusters=(5, 4), normalize=False),
    ],
)
def test_vmtc_features_equal_layerwise_reference(processor, images, cfg):
    model = tiny_llava(attn_implementation="eager")  # eager returns the weights the reference needs
    batch = encode(processor, images)
    with unclutter.apply(model, processor, vmtc=cfg) as h, torch.no_grad():
        batch = encode(processor, images)
        model(**batch)  # the prompt's placeholders match the compressed count
        got = image_features(model, batch)
        ref = model.model.multi_modal_projector(reference_vmtc_features(model, batch["pixel_values"], h))
        budget = cfg.num_tokens or round(cfg.ratio * 64)
        assert h.num_image_tokens == budget
        assert got.shape == (2, budget, model.config.text_config.hidden_size)
        assert [i.kept_index.shape[1] + max(i.num_clusters, 0) for i in h.stage_infos] == [
            s.tokens_out for s in h.stages
        ]
        assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 2 * budget
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_vmtc_importance_is_the_blocks_cls_attention(processor, images):
    model = tiny_llava(attn_implementation="eager")
    pixel_values = encode(processor, images)["pixel_values"]
    with torch.no_grad():
        attentions = model.model.vision_tower(pixel_values, output_attentions=True).attentions
    with unclutter.apply(model, processor, vmtc=VMTCConfig(layers=(2, 4))) as h, torch.no_grad():
        model(**encode(processor, images))
        torch.testing.assert_close(h.stage_infos[0].importance, attentions[2].mean(1)[:, 0, 1:])


def test_vmtc_batch_equals_single(model, processor, images):
    with unclutter.apply(model, processor, vmtc=VMTCConfig()), torch.no_grad():
        together = image_features(model, encode(processor, images))
        for i in range(2):
            alone = image_features(model, encode(processor, images[i : i + 1], PROMPTS[i : i + 1]))
            torch.testing.assert_close(together[i : i + 1], alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grid", [4, 3, 8])
def test_spd_equals_average_pooling_of_stock_features(model, processor, images, grid):
    batch = encode(processor, images)
    with torch.no_grad():
        feats = stock_features(model, batch["pixel_values"])
        pooled = F.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(2, -1, 8, 8), grid).flatten(2).transpose(1, 2)
        expected = model.model.multi_modal_projector(pooled)
        with unclutter.apply(model, processor, spd=SPDConfig(grid=grid)) as h:
            got = image_features(model, encode(processor, images))
    assert h.num_image_tokens == grid * grid
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def hook_table(model):
    return [(name, list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()]


def snapshot(model, processor, images):
    with torch.no_grad():
        batch = encode(processor, images)
        return batch["input_ids"], model(**batch).logits


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"vmtc": VMTCConfig(), "cmai": CMAIConfig()},
        {"spd": SPDConfig(grid=4), "cmai": CMAIConfig(focus="sum")},
    ],
)
def test_remove_restores_model_and_processor_exactly(model, processor, images, kwargs):
    ids0, logits0 = snapshot(model, processor, images)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    attn0 = model.config.text_config._attn_implementation
    hooks0 = hook_table(model)
    handle = unclutter.apply(model, processor, **kwargs)
    with torch.no_grad():
        model.generate(**encode(processor, images), max_new_tokens=3, do_sample=False)
    handle.remove()
    ids1, logits1 = snapshot(model, processor, images)
    assert torch.equal(ids0, ids1) and torch.equal(logits0, logits1)
    assert model.config.text_config._attn_implementation == attn0
    assert all(torch.equal(state0[k], v) for k, v in model.state_dict().items())
    for module in model.modules():
        assert "forward" not in vars(module) and "_unclutter_cmai" not in vars(module)
    assert hook_table(model) == hooks0
    assert "replace_image_token" not in vars(processor)
    unclutter.apply(model, processor, **kwargs).remove()  # can be applied again after remove


@pytest.mark.parametrize("kwargs, tokens", [({"vmtc": VMTCConfig()}, 32), ({"spd": SPDConfig(grid=3)}, 9)])
def test_processor_counts_the_compressed_tokens(model, processor, kwargs, tokens):
    """`_get_num_multimodal_tokens` (what serving code such as vLLM uses to count) agrees with the expansion."""
    stock = processor._get_num_multimodal_tokens(image_sizes=[(64, 64), (80, 48)])
    with unclutter.apply(model, processor, **kwargs):
        got = processor._get_num_multimodal_tokens(image_sizes=[(64, 64), (80, 48)])
    assert stock.num_image_tokens == [64, 64] and got.num_image_tokens == [tokens, tokens]
    assert processor._get_num_multimodal_tokens(image_sizes=[(64, 64)]).num_image_tokens == [64]


def test_nothing_enabled_equals_stock(model, processor, images):
    _, logits0 = snapshot(model, processor, images)
    with unclutter.apply(model, processor):
        _, logits1 = snapshot(model, processor, images)
    assert torch.equal(logits0, logits1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vmtc_cmai_generate_without_nan(processor, images, dtype):
    model = tiny_llava(dtype=dtype)
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()), torch.no_grad():
        batch = encode(processor, images)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        out = model.generate(
            **batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert all(torch.isfinite(step).all() for step in out.logits)


# ---- bad input ----------------------------------------------------------------------------------


def test_wrong_model_class():
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    )
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        unclutter.apply(llama, cmai=CMAIConfig())


def test_wrong_config_type(model):
    with pytest.raises(TypeError, match="VMTCConfig"):
        unclutter.apply(model, vmtc=CMAIConfig())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: VMTCConfig(num_tokens=0), "num_tokens must be >= 1"),
        (lambda: VMTCConfig(ratio=0.0), r"ratio must be in \(0, 1\]"),
        (lambda: CMAIConfig(gamma_max=1.0), r"must be in \[0, 1\)"),
        (lambda: CMAIConfig(gamma_max=-0.1), r"must be in \[0, 1\)"),
        (lambda: CMAIConfig(gammas=(0.2, 1.2)), r"must be in \[0, 1\)"),
        (lambda: VMTCConfig(merge="mean"), "merge must be"),
        (lambda: VMTCConfig(clusters=0), "clusters must be an integer >= 1"),
        (lambda: VMTCConfig(num_tokens=8, clusters=(0, 1, 1, 1)), "clusters must be an integer >= 1"),
        (lambda: VMTCConfig(clusters=(2, 1.5)), "clusters must be an integer >= 1"),
        # counts and indices that are not integers failed in the processor or inside the forward
        (lambda: VMTCConfig(num_tokens=20.0), r"num_tokens takes integers, got 20.0"),
        (lambda: VMTCConfig(stage_tokens=(50.5, 40, 35, 32)), "stage_tokens takes integers"),
        (lambda: VMTCConfig(layers=(1.5, 4)), "layers takes integers"),
        (lambda: VMTCConfig(num_stages=True), "num_stages takes integers"),
        (lambda: VMTCConfig(ratio="0.5"), "ratio must be a number"),
        (lambda: CMAIConfig(layers=(0.5, 2)), "layers takes integers"),
        (lambda: CMAIConfig(discount="0.9"), "discount must be a number"),
        (lambda: SPDConfig(grid=4.0), "grid takes integers"),
        (lambda: SPDConfig(grid=None), "grid takes an integer >= 1"),  # was a TypeError comparing None with 1
        (lambda: VMTCConfig(ratio=0.25, num_tokens=40), "give ratio or num_tokens, not both"),  # 40 won silently
        (lambda: VMTCConfig(normalize="no"), "normalize is True or False"),  # a non-empty string was True
    ],
)
def test_bad_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_budget_override_replaces_the_other_budget_field():
    """--set vmtc.ratio on a checkpoint recorded with num_tokens kept num_tokens: the last budget given wins."""
    recorded = {"configs": {"vmtc": {"num_tokens": 16}}}
    assert resolve("checkpoint", ["vmtc.ratio=0.25"], recorded=recorded)["vmtc"].num_tokens is None
    cfg = resolve("vmtc", ["vmtc.ratio=0.25", "vmtc.num_tokens=9"])["vmtc"]
    assert (cfg.num_tokens, cfg.ratio) == (9, 0.5)
    cfg = resolve("vmtc", ["vmtc.ratio=0.25", "vmtc.num_tokens=null"])["vmtc"]  # clearing one keeps the other
    assert (cfg.num_tokens, cfg.ratio) == (None, 0.25)
    # configs recorded before both fields were refused together: num_tokens decided the budget, and still does
    old = resolve("checkpoint", recorded={"configs": {"vmtc": {"ratio": 0.25, "num_tokens": 16}}})["vmtc"]
    assert (old.num_tokens, old.ratio) == (16, 0.5)


def test_budget_larger_than_patches(model):
    with pytest.raises(ValueError, match="impossible for 64 patches"):
        unclutter.apply(model, vmtc=VMTCConfig(num_tokens=65))
    with pytest.raises(ValueError, match="larger than the 8x8"):
        unclutter.apply(model, spd=SPDConfig(grid=9))
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\]"):
        unclutter.apply(model, vmtc=VMTCConfig(layers=(2, 5)))
    with pytest.raises(ValueError, match="clusters"):
        unclutter.apply(model, vmtc=VMTCConfig(num_tokens=4, num_stages=1, clusters=5))
    assert "_unclutter_handle" not in vars(model.model)  # a failed apply leaves nothing behind


def test_vmtc_with_spd_and_applying_twice(model):
    with pytest.raises(ValueError, match="cannot be combined"):
        unclutter.apply(model, vmtc=VMTCConfig(), spd=SPDConfig())
    with unclutter.apply(model, cmai=CMAIConfig()), pytest.raises(ValueError, match="already applied"):
        unclutter.apply(model, vmtc=VMTCConfig())


def test_stock_placeholders_without_processor(model, processor, images):
    batch = encode(processor, images)  # stock expansion: 64 per image
    with unclutter.apply(model, vmtc=VMTCConfig()):
        with pytest.raises(ValueError, match="Pass processor="):
            model(**batch)
        with pytest.raises(ValueError, match="Pass processor="):
            model.generate(**batch, max_new_tokens=2)


def test_missing_image_token(model, processor, images):
    batch = encode(processor, images)
    ids = processor.tokenizer(["user : what is the color ? assistant :"] * 2, return_tensors="pt")
    with unclutter.apply(model, cmai=CMAIConfig()), pytest.raises(ValueError, match="no image token"):
        model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=batch["pixel_values"])


def test_text_only_prompt_runs_under_cmai(model, processor):
    ids = processor.tokenizer(["user : what is the color ? assistant :"], return_tensors="pt")
    with torch.no_grad():
        stock = model(**ids).logits
        with unclutter.apply(model, cmai=CMAIConfig()):
            got = model(**ids).logits
    torch.testing.assert_close(got, stock)


# ---- the model object around apply: PEFT, accelerate, copies, attention implementation --------------------------


def test_lora_wrapped_after_apply_ranks_with_the_adapted_queries(processor, images):
    """LoRA on the tower's q/k projections added after apply: VMTC ranks with the adapted projections (it kept the
    original module's output, without the LoRA term). Reference: the same LoRA merged, then the method applied."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    batch = encode(processor, images)
    torch.manual_seed(0)
    merged = tiny_llava()
    torch.manual_seed(1)
    merged = get_peft_model(merged, lora).merge_and_unload()
    with unclutter.apply(merged, processor, vmtc=VMTCConfig()) as h, torch.no_grad():
        batch = encode(processor, images)
        expected, kept = merged(**batch).logits, [info.kept_index for info in h.stage_infos]
    torch.manual_seed(0)
    model = tiny_llava()
    with unclutter.apply(model, processor, vmtc=VMTCConfig()) as h, torch.no_grad():
        torch.manual_seed(1)
        wrapped = get_peft_model(model, lora)
        got = wrapped(**batch).logits
        assert all(torch.equal(info.kept_index, k) for info, k in zip(h.stage_infos, kept, strict=True))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_model_dispatched_by_accelerate(model, processor, images, tmp_path):
    """device_map over several targets (here the CPU and disk offload) wraps each module's forward on the instance;
    apply replaced none of them ("already patched"). The dispatched model equals the plain one, then stock again."""
    from transformers import LlavaForConditionalGeneration

    model.save_pretrained(tmp_path / "m")
    device_map = {
        "model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model.embed_tokens": "cpu",
        "model.language_model.layers": "cpu", "model.language_model.rotary_emb": "cpu",
        "model.language_model.norm": "disk", "lm_head": "cpu",
    }  # fmt: skip
    dispatched = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "m", device_map=device_map, offload_folder=tmp_path / "offload"
    )
    wrapped = {name: m._old_forward for name, m in dispatched.named_modules() if "_old_forward" in vars(m)}
    assert wrapped  # accelerate's hooks are there
    batch = encode(processor, images)
    with torch.no_grad():
        stock = dispatched(**batch).logits
    for kwargs in ({"vmtc": VMTCConfig(), "cmai": CMAIConfig()}, {"spd": SPDConfig(grid=4)}):
        with torch.no_grad(), unclutter.apply(model, processor, **kwargs):
            expected = model(**encode(processor, images)).logits
        with torch.no_grad(), unclutter.apply(dispatched, processor, **kwargs):
            got = dispatched(**encode(processor, images)).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert {n: m._old_forward for n, m in dispatched.named_modules() if "_old_forward" in vars(m)} == wrapped
        with torch.no_grad():
            assert torch.equal(dispatched(**batch).logits, stock)


def test_accelerate_hooks_removed_before_remove(processor, images):
    """The user un-dispatches the model (accelerate's hooks removed) while unclutter is applied: remove() still takes
    unclutter's forward off (accelerate had made it the module's forward, and the model failed afterwards)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_submodules

    torch.manual_seed(0)
    model = tiny_llava()
    batch = encode(processor, images)
    with torch.no_grad():
        stock = model(**batch).logits
    for module in model.modules():
        add_hook_to_module(module, AlignDevicesHook(execution_device="cpu"))
    handle = unclutter.apply(model, processor, vmtc=VMTCConfig())
    remove_hook_from_submodules(model)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock)


def test_deepcopy_while_applied_is_refused(model, processor):
    """A copy would share CMAI's state with the original, and its handle's remove() would undo the original."""
    import copy

    handle = unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig())
    with pytest.raises(TypeError, match="remove\\(\\) first, copy, then"):
        copy.deepcopy(model)
    handle.remove()
    copy.deepcopy(model)


def test_switching_the_attention_implementation_after_apply(processor, images):
    """set_attn_implementation after apply turned CMAI off silently, and remove() then overwrote the user's choice."""
    model = tiny_llava()
    handle = unclutter.apply(model, processor, cmai=CMAIConfig())
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="turns CMAI off: call handle.remove"), torch.no_grad():
        model(**encode(processor, images))
    handle.remove()
    assert model.model.language_model.config._attn_implementation == "eager"


def test_generate_with_a_hand_tokenized_prompt_names_the_count(model, processor, images):
    """generate encodes the images before its first forward, so a wrong placeholder count was reported as features
    'encoded before this call (mm_encoder_outputs)', which the user never passed."""
    ids = processor.tokenizer(["user : <image> what is this ? assistant :"], return_tensors="pt")
    pixels = processor.image_processor(images[:1], return_tensors="pt")["pixel_values"]
    match = r"1 image tokens for 1 image\(s\); expected 32 per image"
    with unclutter.apply(model, processor, vmtc=VMTCConfig()), torch.no_grad(), pytest.raises(ValueError, match=match):
        model.generate(**ids, pixel_values=pixels, max_new_tokens=2)
