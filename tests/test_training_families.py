"""`unclutter train` on LLaVA-NeXT with VMTC + CMAI active: anyres tiles of several grids in one batch, the
processor's compressed placeholder count per image, a tiny end-to-end finetune that learns, reloads and evaluates."""

import json

import pytest
import torch
from helpers import StopAt
from PIL import Image
from transformers import TrainerCallback

import unclutter
from unclutter.config import CMAIConfig, VMTCConfig
from unclutter.methods import resolve
from unclutter.models.tiny import tiny_vlm
from unclutter.training.families import LOOSE_FILE, ProcessorImageDataset, collate_tiles, make_dataset
from unclutter.training.trainer import TrainConfig, train

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SIZES = [(64, 64), (64, 32), (32, 96), (48, 64)]  # (width, height): 2x2, 1x2, 3x1 ... tile grids


def make_data(tmp_path, n=12):
    images = tmp_path / "images"
    images.mkdir()
    recs = []
    for i in range(n):
        color = list(COLORS)[i % 4]
        Image.new("RGB", SIZES[i % len(SIZES)], COLORS[color]).save(images / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nwhat is the color ?"}, {"from": "gpt", "value": color}]
        recs.append({"id": f"s{i}", "image": f"{i}.png", "conversations": conv})
    recs.append(
        {"id": "t", "conversations": [{"from": "human", "value": "what is red ?"}, {"from": "gpt", "value": "a color"}]}
    )
    path = tmp_path / "data.json"
    path.write_text(json.dumps(recs))
    return path, images, recs


@pytest.fixture
def next_dir(tmp_path):
    spec = tiny_vlm("llava_next")
    spec.model().save_pretrained(tmp_path / "base")
    spec.processor().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_items_carry_the_compressed_count_of_their_own_grid(tmp_path):
    """Each item's <image> run is what the patched processor writes for that image, and the model accepts the batch."""
    data, images, recs = make_data(tmp_path, n=4)
    spec = tiny_vlm("llava_next")
    model, processor = spec.model(), spec.processor()
    with unclutter.apply(model, processor, vmtc=VMTCConfig(), cmai=CMAIConfig()) as handle:
        dataset = make_dataset(recs, model, processor, images, fmt="v1", image_tokens=handle.num_image_tokens,
                               max_length=512)  # fmt: skip
        assert isinstance(dataset, ProcessorImageDataset)
        image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
        counts = []
        for i, rec in enumerate(recs[:4]):  # the image records (the fifth is text-only)
            with Image.open(images / rec["image"]) as im:
                expect = processor(images=[im.convert("RGB")], text=["<image>"], return_tensors="pt")["input_ids"]
            counts.append(int((dataset[i]["input_ids"] == image_id).sum()))
            assert counts[-1] == int((expect == image_id).sum())
        assert len(set(counts)) > 1  # different grids, different counts
        batch = collate_tiles([dataset[i] for i in range(5)], processor.tokenizer.pad_token_id)
        assert batch["pixel_values"].shape[:2] == (4, 5) and batch["image_sizes"].tolist()[1] == [32, 64]
        out = model(**batch)  # the adapter's placeholder check passes and the loss is finite
        assert torch.isfinite(out.loss)


def test_llava_next_finetune_learns_reloads_and_evaluates(next_dir, tmp_path):
    data, images, _ = make_data(tmp_path)
    out = train(TrainConfig(stage="finetune", model=str(next_dir), data=str(data), images=str(images),
                            output=str(tmp_path / "ft"), max_steps=10, batch_size=4, per_device_batch_size=4,
                            learning_rate=3e-3, warmup_ratio=0.0))  # fmt: skip
    log = json.loads((out / "train_log.json").read_text())["log"]
    losses = [h["loss"] for h in log]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    from transformers import LlavaNextForConditionalGeneration

    base = LlavaNextForConditionalGeneration.from_pretrained(next_dir)
    tuned = LlavaNextForConditionalGeneration.from_pretrained(out)
    assert tuned.config.unclutter["method"] == "vmtc+cmai"
    assert not torch.equal(base.model.image_newline, tuned.model.image_newline)  # trained with the projector
    for name in ("vision_tower", "multi_modal_projector", "language_model"):
        same = all(
            torch.equal(a, b)
            for a, b in zip(
                getattr(base.model, name).parameters(), getattr(tuned.model, name).parameters(), strict=True
            )
        )
        assert same == (name == "vision_tower"), name
    from unclutter.evaluation.runner import run_eval

    bench = tmp_path / "gqa.jsonl"
    bench.write_text(
        json.dumps({"question_id": "q", "image": "1.png", "question": "what is the color ?", "answer": "green"}) + "\n"
    )
    m = run_eval(model_name=str(out), method="checkpoint", bench="gqa", data=bench, images=images, out=tmp_path / "ev",
                 max_new_tokens=2, device="cpu")  # fmt: skip
    assert m["num_errors"] == 0 and m["family"] == "LLaVA-NeXT"


class Capture(TrainerCallback):
    """At the end of training (before the merge): the in-memory model's logits on ``batch`` and its newline."""

    def __init__(self, batch):
        self.batch = batch

    def on_train_end(self, args, state, control, model=None, **kw):
        model.eval()
        with torch.no_grad():
            self.logits = model(**self.batch).logits
        self.newline = model.get_base_model().model.image_newline.detach().clone()


def test_llava_next_lora_trains_saves_resumes_and_merges_the_newline(next_dir, tmp_path):
    """LoRA stage 2: PEFT's adapter checkpoints leave out ``image_newline`` (no module of its own), so it must still
    train with the projector, travel in each checkpoint, come back on resume, and land in the merged checkpoint."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    data, images, _ = make_data(tmp_path, n=8)
    configs = resolve("vmtc+cmai")
    processor = LlavaNextProcessor.from_pretrained(next_dir)
    base = LlavaNextForConditionalGeneration.from_pretrained(next_dir)
    with unclutter.apply(base, processor, **configs), Image.open(images / "1.png") as im:  # the compressed count
        batch = processor(images=[im.convert("RGB")], text=["<image>\nwhat is the color ?"], return_tensors="pt")

    def config(name):
        return TrainConfig(stage="finetune", model=str(next_dir), data=str(data), images=str(images),
                           output=str(tmp_path / name), max_steps=4, batch_size=2, per_device_batch_size=2,
                           save_steps=2, learning_rate=1e-2, warmup_ratio=0.0, lora=True, lora_r=4, lora_alpha=8,
                           lora_dropout=0.0, method="vmtc+cmai")  # fmt: skip

    capture = Capture(batch)
    out = train(config("whole"), callbacks=[capture])
    tuned = LlavaNextForConditionalGeneration.from_pretrained(out)  # stock loading of the merged plain checkpoint
    assert not any("lora" in k or "modules_to_save" in k for k in tuned.state_dict())
    assert not torch.equal(base.model.image_newline, capture.newline)  # trained with the projector
    assert torch.equal(tuned.model.image_newline, capture.newline)  # saved, merged
    with unclutter.apply(tuned, processor, **resolve("checkpoint", recorded=tuned.config.unclutter)), torch.no_grad():
        logits = tuned.eval()(**batch).logits
    assert (logits - capture.logits).abs().max() <= 1e-5
    assert (out / "adapter" / LOOSE_FILE).is_file()  # the unmerged adapter ships with its newline

    with pytest.raises(KeyboardInterrupt):  # killed after step 3: resumes from checkpoint-2
        train(config("resumed"), callbacks=[StopAt(3)])
    assert (tmp_path / "resumed" / "checkpoint-2" / LOOSE_FILE).is_file()  # beside the adapter
    assert not (tmp_path / "resumed" / "config.json").exists()
    resumed = LlavaNextForConditionalGeneration.from_pretrained(train(config("resumed")))
    assert torch.allclose(resumed.model.image_newline, tuned.model.image_newline, atol=1e-6)
    key = "model.multi_modal_projector.linear_1.weight"
    assert torch.allclose(resumed.state_dict()[key], tuned.state_dict()[key], atol=1e-6)


def test_a_family_without_training_support_is_a_clear_cli_error(tmp_path):
    from typer.testing import CliRunner

    from unclutter.cli import app

    spec = tiny_vlm("qwen2_5_vl")
    spec.model().save_pretrained(tmp_path / "qwen")
    spec.processor().save_pretrained(tmp_path / "qwen")
    data, images, _ = make_data(tmp_path, n=2)
    result = CliRunner().invoke(app, ["train", "--stage", "finetune", "--model", str(tmp_path / "qwen"),
                                      "--data", str(data), "--images", str(images), "--output", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "not" in result.output and "Qwen" in result.output


@pytest.mark.parametrize("method", ["stock", "cmai", "vmtc+cmai"])
def test_a_record_too_long_for_its_image_is_named_before_training(next_dir, tmp_path, method):
    """LLaVA-NeXT items are tokenized lazily (the placeholder count depends on the image), so a record whose image
    tokens max_length would cut stopped the run only when first drawn, steps into training. The up-front count (from
    the image's header) equals each item's, and such a record is named when the dataset is built, before any step
    (also through the CLI's --max-length)."""
    from typer.testing import CliRunner

    from unclutter.cli import app
    from unclutter.evaluation.generation import load_model
    from unclutter.ifeval.scoring import DataError

    data, images, recs = make_data(tmp_path, n=4)
    model, processor = load_model(str(next_dir), dtype="float32", device="cpu")
    cfgs = {k: v for k, v in resolve(method).items() if v is not None}
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    with unclutter.apply(model, processor, **cfgs):
        dataset = make_dataset(recs, model, processor, images, fmt="v1", image_tokens=0, max_length=4096)
        ends = []  # each image record's last image token position
        for i, rec in enumerate(recs[:4]):
            with Image.open(images / rec["image"]) as im:
                size = [im.height, im.width]
            expect = processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens[0]
            ids = dataset[i]["input_ids"]
            assert int((ids == image_id).sum()) == expect
            ends.append(int((ids == image_id).nonzero().max()))
        limit = max(ends)  # cuts the last image token of (at least) the record whose image ends last
        named = rf"record \d \(id s\d, image \d\.png\): max_length {limit} would cut its image tokens"
        with pytest.raises(DataError, match=named):
            make_dataset(recs, model, processor, images, fmt="v1", image_tokens=0, max_length=limit)
        make_dataset(recs, model, processor, images, fmt="v1", image_tokens=0, max_length=limit + 1)
    result = CliRunner().invoke(app, ["train", "--stage", "finetune", "--model", str(next_dir), "--data", str(data),
                                      "--images", str(images), "--output", str(tmp_path / "o"), "--method", method,
                                      "--max-length", str(limit), "--batch-size", "1", "--per-device-batch-size", "1"])  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "would cut its image tokens" in " ".join(result.output.split())
    assert not (tmp_path / "o" / "train_log.json").exists()
