"""The two-stage recipe at tiny scale on CPU, with VMTC + CMAI active."""

import json
import math

import pytest
import torch
from conftest import random_image
from helpers import StopAt
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    TrainerCallback,
)

import unclutter
from unclutter.ifeval.scoring import DataError
from unclutter.models.tiny import tiny_llava, tiny_tokenizer
from unclutter.training.data import IGNORE_INDEX, encode_record, load_image, load_llava_json, modality_length_order
from unclutter.training.trainer import TrainConfig, train

COLORS = ["red", "green", "blue", "yellow"]


def make_data(tmp_path, n=16, stage="pretrain"):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    recs = []
    for i in range(n):
        color = COLORS[i % 4]
        rgb = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}[color]
        from PIL import Image

        Image.new("RGB", (70, 60), rgb).save(images / f"{i}.png")  # not square: exercises pad-to-square
        if stage == "pretrain":
            conv = [{"from": "human", "value": "<image>\ndescribe"}, {"from": "gpt", "value": f"a {color} image"}]
        else:
            conv = [
                {"from": "human", "value": "<image>\nwhat is the color ?"},
                {"from": "gpt", "value": color},
                {"from": "human", "value": "yes or no ?"},
                {"from": "gpt", "value": "yes"},
            ]
        recs.append({"id": f"s{i}", "image": f"{i}.png", "conversations": conv})
    recs.append(
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "what is red ?"}, {"from": "gpt", "value": "a color"}],
        }
    )
    path = tmp_path / f"{stage}.json"
    path.write_text(json.dumps(recs))
    return path, images


@pytest.fixture
def base_dir(model_dir):
    return model_dir


def losses(out):
    return [h["loss"] for h in json.loads((out / "train_log.json").read_text())["log"]]


def test_two_stage_recipe_learns_reloads_and_generates(base_dir, tmp_path):
    data1, images = make_data(tmp_path, stage="pretrain")
    s1 = train(TrainConfig(stage="pretrain", model=str(base_dir), data=str(data1), images=str(images), output=str(tmp_path / "s1"),
                           max_steps=12, batch_size=8, per_device_batch_size=8, learning_rate=5e-3, warmup_ratio=0.0))  # fmt: skip
    l1 = losses(s1)
    assert len(l1) == 12 and sum(l1[-3:]) / 3 < sum(l1[:3]) / 3
    data2, _ = make_data(tmp_path, stage="finetune")
    s2 = train(TrainConfig(stage="finetune", model=str(s1), data=str(data2), images=str(images), output=str(tmp_path / "s2"),
                           max_steps=12, batch_size=8, per_device_batch_size=4, learning_rate=3e-3, warmup_ratio=0.0,
                           group_by_modality_length=True, overrides=["vmtc.num_tokens=16"]))  # fmt: skip
    l2 = losses(s2)
    assert sum(l2[-3:]) / 3 < sum(l2[:3]) / 3
    # stage 2 trained the LLM, stage 1 did not touch it; the vision tower stays frozen throughout
    base = LlavaForConditionalGeneration.from_pretrained(base_dir)
    m1 = LlavaForConditionalGeneration.from_pretrained(s1)
    m2 = LlavaForConditionalGeneration.from_pretrained(s2)
    lm_key = "model.language_model.layers.0.mlp.up_proj.weight"
    sd0, sd1, sd2 = base.state_dict(), m1.state_dict(), m2.state_dict()
    assert torch.equal(sd0[lm_key], sd1[lm_key]) and not torch.equal(sd1[lm_key], sd2[lm_key])
    assert not torch.equal(
        sd0["model.multi_modal_projector.linear_1.weight"], sd1["model.multi_modal_projector.linear_1.weight"]
    )
    vis = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(sd0[vis], sd2[vis])
    # the method is recorded and evaluation can re-apply it
    assert m2.config.unclutter["method"] == "vmtc+cmai"
    cfgs = unclutter.methods.resolve("checkpoint", recorded=m2.config.unclutter)
    assert cfgs["vmtc"].num_tokens == 16 and cfgs["cmai"].gamma_max == 0.6
    from unclutter.evaluation.generation import load_model

    model, processor = load_model(str(s2), device="cpu")
    with unclutter.apply(model, processor, **cfgs) as h, torch.no_grad():
        batch = processor(
            images=[random_image(0)], text=["user : <image> what is the color ? assistant :"], return_tensors="pt"
        )
        out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert h.num_image_tokens == 16 and out.shape[1] == batch["input_ids"].shape[1] + 3


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_killed_training_resumes_from_last_checkpoint(base_dir, tmp_path, stage):
    """A killed full-weight run, rerun, ends as the uninterrupted run: the same losses and bit-identical weights (the
    checkpoint's tensors are loaded under their saved names); rerunning the finished command changes nothing."""
    data, images = make_data(tmp_path, n=8, stage=stage)

    def config(name: str) -> TrainConfig:
        return TrainConfig(stage=stage, model=str(base_dir), data=str(data), images=str(images), output=str(tmp_path / name),
                           max_steps=6, batch_size=2, per_device_batch_size=2, save_steps=2, learning_rate=1e-3,
                           method="vmtc+cmai", group_by_modality_length=stage == "finetune")  # fmt: skip

    straight = train(config("straight"))
    with pytest.raises(KeyboardInterrupt):
        train(config("o"), callbacks=[StopAt(5)])
    assert (tmp_path / "o" / "checkpoint-4").is_dir() and not (tmp_path / "o" / "config.json").exists()
    resumed = train(config("o"))
    log = json.loads((resumed / "train_log.json").read_text())
    assert [h["step"] for h in log["log"]] == list(range(1, 7)) and log["summary"]["train_runtime"] > 0
    assert losses(resumed) == losses(straight)  # steps 1-4 from the checkpoint's history, 5-6 trained again
    weights = LlavaForConditionalGeneration.from_pretrained(straight).state_dict()
    for again in (resumed, train(config("o"))):  # the resumed run, then the finished command rerun
        assert all(
            torch.equal(v, weights[k])
            for k, v in LlavaForConditionalGeneration.from_pretrained(again).state_dict().items()
        )


def test_lora_finetune_merges_into_a_plain_checkpoint(base_dir, tmp_path):
    """LoRA adapters on the LLM, merged into a plain checkpoint; --tune decides what else trains (the projector by
    default, the vision tower too when named, the projector not when left out)."""
    data, images = make_data(tmp_path, n=4, stage="finetune")
    base = LlavaForConditionalGeneration.from_pretrained(base_dir).state_dict()
    keys = {"llm": "model.language_model.layers.1.self_attn.q_proj.weight",
            "projector": "model.multi_modal_projector.linear_1.weight",
            "vision": "model.vision_tower.encoder.layers.0.mlp.fc1.weight"}  # fmt: skip
    for name, tune in (("l", None), ("lv", ["vision", "projector", "llm"]), ("ll", ["llm"])):
        out = train(TrainConfig(stage="finetune", model=str(base_dir), data=str(data), images=str(images), output=str(tmp_path / name),
                                max_steps=2, batch_size=2, per_device_batch_size=2, lora=True, lora_r=4, lora_alpha=8,
                                method="vmtc+cmai", gradient_checkpointing=True, tune=tune))  # fmt: skip
        model = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
        assert not any("lora" in k for k in model)
        changed = {part for part, key in keys.items() if not torch.equal(model[key], base[key])}
        assert changed == set(tune or ["projector", "llm"]), (tune, changed)


def test_bf16_mixed_precision_trains_on_cpu_over_fp32_weights(base_dir, tmp_path):
    """``bf16: true`` is autocast over fp32 master weights (the Trainer refused bf16 on CPU without use_cpu,
    and bf16 weights would drop AdamW's small updates); the checkpoint stays fp32."""
    from safetensors import safe_open

    data, images = make_data(tmp_path, n=8, stage="finetune")
    out = train(TrainConfig(stage="finetune", model=str(base_dir), data=str(data), images=str(images), output=str(tmp_path / "b"),
                            max_steps=6, batch_size=4, per_device_batch_size=4, learning_rate=3e-3, warmup_ratio=0.0,
                            bf16=True))  # fmt: skip
    history = losses(out)
    assert all(torch.isfinite(torch.tensor(history))) and history[-1] < history[0]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = f.keys()
        assert {f.get_slice(name).get_dtype() for name in names} == {"F32"}
    base = LlavaForConditionalGeneration.from_pretrained(base_dir)
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(LlavaForConditionalGeneration.from_pretrained(out).state_dict()[key], base.state_dict()[key])


class ProjectorGrads(TrainerCallback):
    """Whether each optimizer step's projector gradient is all zeros."""

    def __init__(self):
        self.zero = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.model.multi_modal_projector.parameters()]
        self.zero.append(all(g is not None and not g.any() for g in grads))


@pytest.mark.parametrize("method", ["stock", "vmtc+cmai"])
def test_a_text_only_batch_in_stage_one_steps_with_zero_gradients(base_dir, tmp_path, method):
    """Stage 1 tunes only the projector, which a batch of text-only samples never reaches: backward() failed deep in
    torch. As in LLaVA (an empty slice of image features passes through), the step runs with zero gradients."""
    data, images = make_data(tmp_path, n=3, stage="pretrain")  # 3 image samples and 1 text-only, one per step
    grads = ProjectorGrads()
    out = train(TrainConfig(stage="pretrain", model=str(base_dir), data=str(data), images=str(images), output=str(tmp_path / "p"),
                            epochs=1, batch_size=1, per_device_batch_size=1, method=method),
                callbacks=[grads])  # fmt: skip
    assert len(losses(out)) == 4 and all(math.isfinite(v) for v in losses(out))
    assert sorted(grads.zero) == [False, False, False, True]


def test_label_masking():
    tok = tiny_tokenizer()
    rec = {"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is the color ?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many ?"}, {"from": "gpt", "value": "two"},
    ]}  # fmt: skip
    enc = encode_record(rec, tok, "v1", image_tokens=5, max_length=512)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == 5
    targets = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(targets) == "red</s> two</s>" or tok.convert_ids_to_tokens(targets) == [
        "red",
        "</s>",
        "two",
        "</s>",
    ]
    plain = encode_record(rec, tok, "plain", image_tokens=5, max_length=512)
    assert (
        tok.convert_ids_to_tokens(
            [t for t, lab in zip(plain.input_ids, plain.labels, strict=True) if lab != IGNORE_INDEX]
        )[0]
        == "red"
    )
    with pytest.raises(DataError, match="would cut its image tokens"):
        encode_record(rec, tok, "v1", image_tokens=5, max_length=10)
    # the placeholder anywhere in the first turn, not only as LLaVA writes it ("<image>\n" first): every format
    # expands it to the full count
    template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    template += "{% if add_generation_prompt %}assistant :{% endif %}"
    late = {
        **rec,
        "conversations": [{"from": "human", "value": "what is the color ? <image>"}, *rec["conversations"][1:]],
    }
    for fmt in ("v1", "chat"):
        enc = encode_record(late, tok, fmt, image_tokens=5, max_length=512, chat_template=template)
        assert enc.input_ids.count(image_id) == 5, fmt


@pytest.mark.parametrize(
    "rec, match",
    [
        (
            {
                "id": "a",
                "image": "0.png",
                "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}],
            },
            "exactly one '<image>'",
        ),
        ({"id": "b", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "alternate"),
        (
            {"id": "c", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
            "no 'image' field",
        ),
        (
            {
                "id": "d",
                "image": "missing.png",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
            },
            "not found",
        ),
        ({"id": "e"}, "needs 'conversations'"),
        (
            {
                "id": "f",
                "image": ["0.png"],
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
            },
            "must be one file name",
        ),
    ],
)
def test_malformed_records_named_before_training(tmp_path, rec, match):
    data, images = make_data(tmp_path, n=2)
    recs = json.loads(data.read_text()) + [rec]
    data.write_text(json.dumps(recs))
    with pytest.raises(DataError, match=rf"record 3 \(id {rec['id']}\).*{match}"):
        load_llava_json(data, images)


def test_unreadable_images_and_odd_line_separators(tmp_path):
    """A file that is no image is named before training; one damaged past its header when its sample is loaded; a
    JSONL whose strings hold U+2028 (a line separator to str.splitlines, not to JSON Lines) loads."""
    data, images = make_data(tmp_path, n=2)
    recs = json.loads(data.read_text())
    picture = (images / "1.png").read_bytes()
    (images / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"record 1 \(id s1\).*cannot read image"):
        load_llava_json(data, images)
    (images / "1.png").write_bytes(picture[: len(picture) // 2])  # the header survives
    assert len(load_llava_json(data, images)) == 3
    with pytest.raises(DataError, match=r"record 1: cannot read image .*1.png"):
        load_image(images / "1.png", "record 1")
    recs[0]["conversations"][1]["value"] = "a red\u2028image\x85"
    lines = tmp_path / "data.jsonl"
    lines.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    assert load_llava_json(lines, images)[0]["conversations"][1]["value"] == "a red\u2028image\x85"
    broken = lines.read_text(encoding="utf-8").split("\n")
    broken.insert(1, "")  # a blank line still counts
    broken[2] = broken[2][:-3]
    lines.write_text("\n".join(broken), encoding="utf-8")
    with pytest.raises(DataError, match=r"data.jsonl:3: not valid JSON"):
        load_llava_json(lines, images)


def test_assemble_from_vision_tower_and_llm(tmp_path):
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=3, num_attention_heads=2))  # fmt: skip
    vision.save_pretrained(tmp_path / "vision")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "vision"
    )
    tok = tiny_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) - 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, pad_token_id=0))  # fmt: skip
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    data, images = make_data(tmp_path, n=4)

    def run(name: str, seed: int) -> dict:
        torch.rand(97)  # move the global RNG between runs: only the config's seed may decide the init
        out = train(TrainConfig(stage="pretrain", vision=str(tmp_path / "vision"), llm=str(tmp_path / "llm"), data=str(data),
                                images=str(images), output=str(tmp_path / name), max_steps=2, batch_size=2,
                                per_device_batch_size=2, seed=seed))  # fmt: skip
        return LlavaForConditionalGeneration.from_pretrained(out).state_dict()

    first = run("a", 0)
    theirs = next(v for k, v in vision.state_dict().items() if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    assert torch.equal(first["model.vision_tower.encoder.layers.0.mlp.fc1.weight"], theirs)
    projector = "model.multi_modal_projector.linear_1.weight"
    assert first[projector].shape[1] == 16  # the projector reads the tower's hidden size

    # the fresh projector's init is seeded: the same config gives the same weights, another seed others
    again, other = run("b", 0), run("c", 1)
    assert all(torch.equal(v, again[k]) for k, v in first.items())
    assert not torch.equal(other[projector], again[projector])


def test_modality_length_grouping():
    lengths = [10, -5, 12, -7, 30, 31, -2, 11]
    order = modality_length_order(lengths, 2, seed=0)
    assert sorted(order) == list(range(8))
    for k in range(0, 6, 2):  # 3 full batches (2 image, 1 text-only), then the 2 leftovers
        pair = order[k : k + 2]
        assert len({lengths[i] > 0 for i in pair}) == 1  # one modality per full batch
    assert {order[6], order[7]} == {i for i in range(8) if i not in order[:6]}
    # the Trainer's sampler draws each epoch's order anew (Trainer calls set_epoch before every epoch)
    from unclutter.training.trainer import _EpochOrder

    many = [(-1) ** i * (i + 3) for i in range(40)]
    sampler = _EpochOrder(lambda epoch: modality_length_order(many, 4, seed=epoch), len(many))
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert orders[-1] == modality_length_order(many, 4, seed=epoch) and len(sampler) == 40
    assert len({tuple(o) for o in orders}) == 3


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="give --model"):
        TrainConfig(stage="pretrain", data="d", output="o")
    with pytest.raises(ValueError, match="stage must be"):
        TrainConfig(stage="sft", data="d", output="o", model="m")
    with pytest.raises(ValueError, match="prompt_format must be"):
        TrainConfig(stage="finetune", data="d", output="o", model="m", prompt_format="chatml")
    with pytest.raises(ValueError, match="not a multiple of the per-device batch 4"):
        TrainConfig(stage="finetune", data="d", output="o", model="m", batch_size=6, per_device_batch_size=4)
    with pytest.raises(ValueError, match="include llm in --tune"):
        TrainConfig(stage="finetune", data="d", output="o", model="m", lora=True, tune=["projector"])
    (tmp_path / "c.yaml").write_text("stage: pretrain\nmodel: m\ndata: d\noutput: o\nlr: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("batch_size", 0, "batch_size must be an integer >= 1"),  # was read as "the default" (128)
        ("per_device_batch_size", 0, "per_device_batch_size must be"),  # was a ZeroDivisionError
        ("learning_rate", -1e-5, "learning_rate must be a number >= 0"),
        ("epochs", -1, "epochs must be a number >= 0"),  # was 0 steps and an untrained "checkpoint"
        ("epochs", 0, "epochs must be > 0 when max_steps is not set"),
        ("max_steps", 0, "max_steps must be >= 1, or -1"),
        ("batch_size", 2.5, "batch_size must be an integer"),
        ("lora_dropout", 1.0, r"fractions in \[0, 1\)"),
        ("save_steps", True, "save_steps must be an integer"),
    ],
)
def test_numbers_out_of_range_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(stage="finetune", data="d", output="o", model="m", **{field: value})


def test_a_zero_learning_rate_is_not_the_default(base_dir, tmp_path):
    data, images = make_data(tmp_path, n=4, stage="finetune")
    out = train(TrainConfig(stage="finetune", model=str(base_dir), data=str(data), images=str(images), output=str(tmp_path / "z"),
                            max_steps=2, batch_size=2, per_device_batch_size=2, learning_rate=0.0, method="stock"))  # fmt: skip
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(
        LlavaForConditionalGeneration.from_pretrained(out).state_dict()[key],
        LlavaForConditionalGeneration.from_pretrained(base_dir).state_dict()[key],
    )


def test_tune_selects_trained_modules():
    from unclutter.training.trainer import DEFAULT_TUNE, _freeze

    model = tiny_llava()

    def trained(part):
        return {p.requires_grad for p in part.parameters()}

    _freeze(model, DEFAULT_TUNE["pretrain"])  # LLaVA-1.5: projector only
    assert trained(model.model.multi_modal_projector) == {True}
    assert trained(model.model.vision_tower) == trained(model.model.language_model) == {False}
    _freeze(model, DEFAULT_TUNE["finetune"])
    assert trained(model.model.language_model) == {True} and trained(model.model.vision_tower) == {False}
    _freeze(model, ["vision", "projector", "llm"])  # a from-scratch tower (the shapes model)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="--tune takes"):
        TrainConfig(stage="pretrain", data="d", output="o", model="m", tune=["vit"])


def test_the_global_batch_must_divide_over_the_devices(tmp_path, monkeypatch):
    """96 over 16 per device passes TrainConfig, but on 4 devices accumulation cannot make 96 (it made 64)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = TrainConfig(stage="finetune", model="m", data="d", output=str(tmp_path / "o"), batch_size=96,
                      per_device_batch_size=16)  # fmt: skip
    with pytest.raises(ValueError, match="16 per device x 4 devices"):
        train(cfg)


@pytest.mark.parametrize(
    ("world_size", "devices", "accumulation"),
    [
        ("2", 0, 2),  # 2 CPU processes: accumulation was 4, so each step took 8 samples, not 4
        ("1", 4, 4),  # torchrun --nproc_per_node 1 on a 4-GPU machine: the process drives one GPU (n_gpu 1)
        (None, 4, 1),  # plain python on 4 GPUs: the Trainer's one process drives them all (DataParallel)
    ],
)
def test_accumulation_counts_the_devices_that_train(base_dir, tmp_path, monkeypatch, world_size, devices, accumulation):
    """The global batch is per-device x devices x accumulation, where the devices are the launcher's processes (every
    node's) or, without a launcher, the GPUs the one process drives."""
    import unclutter.training.trainer as trainer_module

    class Seen(Exception):
        pass

    def arguments(**kwargs):
        raise Seen(kwargs["gradient_accumulation_steps"])

    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(trainer_module, "TrainingArguments", arguments)
    data, images = make_data(tmp_path, n=4)
    with pytest.raises(Seen) as seen:
        train(TrainConfig(stage="pretrain", model=str(base_dir), data=str(data), images=str(images),
                          output=str(tmp_path / "o"), batch_size=4, per_device_batch_size=1))  # fmt: skip
    assert seen.value.args == (accumulation,)


def test_deepspeed_without_deepspeed_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name, *a)
    )
    cfg = TrainConfig(stage="pretrain", model="m", data="d", output=str(tmp_path / "o"),
                      deepspeed="configs/deepspeed/zero2.json")  # fmt: skip
    with pytest.raises(ValueError, match=r"unclutter\[deepspeed\]"):
        train(cfg)


def test_lora_without_peft_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    cfg = TrainConfig(stage="finetune", model="m", data="d", output=str(tmp_path / "o"), lora=True)
    with pytest.raises(ValueError, match=r"PEFT is not installed: pip install 'unclutter\[train\]'"):
        train(cfg)


def test_deepspeed_configs_are_checked_for_what_the_final_save_needs(tmp_path):
    """The shipped configs are ZeRO-2 and ZeRO-3; ZeRO-3 shards every weight, so the final checkpoint needs the
    engine's gathered weights (a config without stage3_gather_16bit_weights_on_model_save could write none whole),
    and LoRA's merge into sharded base weights is refused up front, before any model loads."""
    from unclutter.training.trainer import zero_stage

    def cfg(path, **kw):
        return TrainConfig(stage="finetune", model="m", data="d", output=str(tmp_path / "o"), deepspeed=str(path), **kw)

    assert zero_stage(cfg("configs/deepspeed/zero2.json")) == 2
    assert zero_stage(cfg("configs/deepspeed/zero3.json")) == 3
    assert zero_stage(cfg("configs/deepspeed/zero2.json", lora=True)) == 2
    assert zero_stage(TrainConfig(stage="finetune", model="m", data="d", output=str(tmp_path / "o"))) == 0
    with pytest.raises(ValueError, match="ZeRO-3, which shards the base weights that --lora merges"):
        train(cfg("configs/deepspeed/zero3.json", lora=True))
    no_gather = tmp_path / "z3.json"
    no_gather.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
        train(cfg(no_gather))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not a DeepSpeed JSON config"):
        train(cfg(broken))
    with pytest.raises(ValueError, match="no such DeepSpeed config file"):
        train(cfg(tmp_path / "missing.json"))


def test_only_the_main_process_writes_the_output(base_dir, tmp_path, monkeypatch):
    """Rank 1 of a torchrun job wrote the processor files, train_log.json and adapter/ beside rank 0."""
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "is_world_process_zero", lambda self: False)
    monkeypatch.setenv("RANK", "1")  # rank 1 of a torchrun job (rank 0 alone records the run's settings)
    data, images = make_data(tmp_path, n=2, stage="finetune")
    out = train(TrainConfig(stage="finetune", model=str(base_dir), data=str(data), images=str(images),
                            output=str(tmp_path / "o"), max_steps=1, batch_size=1, per_device_batch_size=1, lora=True,
                            lora_r=2, lora_alpha=4, save_steps=10))  # fmt: skip
    written = sorted(
        p.name for p in out.iterdir() if not p.name.startswith(".") and not p.name.startswith("checkpoint-")
    )
    assert written == []  # the Trainer's own checkpoints are rank 0's alone already (args.should_save)


DDP_SCRIPT = """
import sys
from unclutter.training.trainer import TrainConfig, train
stage, model, data, images, out, tune = sys.argv[1:7]
train(TrainConfig(stage=stage, model=model, data=data, images=images, output=out, max_steps=2, batch_size=2,
                  per_device_batch_size=1, learning_rate=1e-3, warmup_ratio=0.0, save_steps=10,
                  gradient_checkpointing=stage == "finetune", tune=tune.split(",") if tune else None))
"""


@pytest.mark.parametrize(("stage", "tune"), [("pretrain", ""), ("finetune", ""), ("finetune", "vision,projector,llm")])
def test_two_processes_with_text_only_samples_train_as_one(base_dir, tmp_path, stage, tune):
    """torchrun --nproc_per_node 2 (gloo, CPU): a rank whose micro-batch is text-only leaves the projector out of its
    forward. Stage 1 failed ("marked as ready twice": the zero-gradient term was added after DDP's forward); stage 2
    with gradient checkpointing (DDP without find_unused_parameters) hung, and so does a tuned tower even on image
    batches (LLaVA reads the penultimate block: the last one gets no gradient). Two processes at 1 per device equal
    one process at 2 per device."""
    import os
    import socket
    import subprocess
    import sys

    recs = json.loads(make_data(tmp_path, n=2, stage=stage)[0].read_text())
    data = tmp_path / "d.json"
    data.write_text(json.dumps(recs[:1] + recs[-1:] + recs[1:2] + recs[-1:]))  # image, text, image, text
    images = tmp_path / "images"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), stage, str(base_dir), str(data), str(images), str(tmp_path / "ddp"), tune]  # fmt: skip
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = run.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:  # a rank that never joins the gradient all-reduce hangs the job
        run.terminate()  # torchrun stops its workers on SIGTERM (they run in sessions of their own)
        output = run.communicate(timeout=60)[0]
    assert run.returncode == 0, output[-3000:]
    one = train(TrainConfig(stage=stage, model=str(base_dir), data=str(data), images=str(images),
                            output=str(tmp_path / "one"), max_steps=2, batch_size=2, per_device_batch_size=2,
                            learning_rate=1e-3, warmup_ratio=0.0, save_steps=10,
                            tune=tune.split(",") if tune else None))  # fmt: skip
    a = LlavaForConditionalGeneration.from_pretrained(tmp_path / "ddp").state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(one).state_dict()
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in b)
    assert worst[0] < 1e-4, worst  # Adam (lr 1e-3) amplifies float noise where a gradient is near its eps
    assert losses(tmp_path / "ddp") == pytest.approx(losses(one), rel=1e-5)
