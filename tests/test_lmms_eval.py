"""The lmms-eval plugin on families other than LLaVA-1.5: chat-template prompts, batches, several images a prompt."""

import pytest
from conftest import random_image
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model

from unclutter.models.tiny import tiny_vlm

CHAT = (
    "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


def saved(tmp_path, family: str, marker: str | None = None):
    spec = tiny_vlm(family)
    processor = spec.processor()
    processor.chat_template = CHAT.replace("IMAGE", marker or processor.image_token)
    spec.model().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path


def request(i: int, text: str, images: int = 1) -> Instance:
    visuals = lambda doc: [doc["image"]] * images  # noqa: E731
    args = (text, {"max_new_tokens": 2, "until": ["</s>"]}, visuals, i, "toy", "test")
    return Instance("generate_until", args, idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})


@pytest.mark.parametrize(
    "family, name, marker, images",
    [
        ("qwen2_5_vl", "Qwen2.5-VL", "<|vision_start|><|image_pad|><|vision_end|>", 1),
        ("gemma3", "Gemma 3", None, 1),
        ("idefics3", "Idefics3", None, 2),
    ],
)
def test_plugin_generates_on_other_families(tmp_path, family, name, marker, images):
    args = f"pretrained={saved(tmp_path, family, marker)},method=vmtc+cmai,device=cpu,batch_size=2"
    lm = get_model("unclutter").create_from_arg_string(args)
    assert lm.handle.adapter.family == name and lm.handle.vmtc is not None and lm.handle.cmai_state is not None
    lm.task_dict = {"toy": {"test": [{"image": random_image(i)} for i in range(3)]}}
    seen = []
    cls = type(lm.processor)
    original = cls.__call__

    def spy(self, *args, **kwargs):  # what the plugin hands the processor
        seen.append((kwargs.get("text"), kwargs.get("images")))
        return original(self, *args, **kwargs)

    cls.__call__ = spy
    try:
        outs = lm.generate_until([request(i, "<image>\nwhat is the color ?", images) for i in range(3)])
    finally:
        cls.__call__ = original
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert [len(text) for text, _ in seen] == [2, 1]  # batches of 2, then 1
    marker = marker or lm.processor.image_token
    assert seen[0][0][0] == f"user : {(marker + ' ') * images}what is the color ? assistant :"  # the chat template
    assert [len(per_prompt) for per_prompt in seen[0][1]] == [images, images]
