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


def test_plugin_follows_lmms_eval_request_semantics(tmp_path):
    """Per-request settings as lmms-eval's own models read them (num_beams, top_p, temperature 0 = greedy), text-only
    and image docs mixed in one batch, answers in request order, each equal to the request run alone; model_args
    are checked; `method=checkpoint` re-applies the configs a checkpoint recorded."""
    import torch

    from unclutter.methods import resolve, to_dict

    path = saved(tmp_path / "m", "llava")
    lm = get_model("unclutter").create_from_arg_string(f"pretrained={path},method=vmtc+cmai,device=cpu,batch_size=4")
    docs = [{"image": random_image(i)} for i in range(4)]
    lm.task_dict = {"toy": {"test": docs}}
    calls = []
    original = lm.model.generate

    def spy(**kwargs):
        calls.append({k: kwargs.get(k) for k in ("num_beams", "do_sample", "top_p", "temperature")})
        return original(**kwargs)

    lm.model.generate = spy

    def req(i: int, settings: dict, visual=True) -> Instance:
        see = (lambda doc: [doc["image"]]) if visual else (lambda doc: None)  # lmms-eval: None without a visual
        args = ("what is the color ?", {"max_new_tokens": 3, "until": ["</s>"], **settings}, see, i, "toy", "test")
        return Instance("generate_until", args, idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})

    requests = [
        req(0, {"num_beams": 2}),
        req(1, {}, visual=False),
        req(2, {"temperature": 0}),
        req(3, {"num_beams": 2}),
    ]
    torch.manual_seed(0)
    together = lm.generate_until(requests)
    assert {c["num_beams"] for c in calls} == {1, 2} and not any(c["do_sample"] for c in calls)
    alone = [lm.generate_until([r])[0] for r in requests]
    assert together == alone
    torch.manual_seed(0)
    lm.generate_until([req(0, {"temperature": 0.7, "top_p": 0.1})])
    assert calls[-1] == {"num_beams": 1, "do_sample": True, "top_p": 0.1, "temperature": 0.7}
    with pytest.raises(ValueError, match="videos given as paths"):
        video = ("q", {}, lambda doc: ["clip.mp4"], 0, "toy", "test")
        lm.generate_until(
            [Instance("generate_until", video, idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1})]
        )

    make = get_model("unclutter").create_from_arg_string
    with pytest.raises(ValueError, match=r"unknown model_args \['methd'\]"):
        make(f"pretrained={path},methd=stock,device=cpu")
    with pytest.raises(ValueError, match="join them with ';'"):  # lmms-eval splits model_args on ','
        make(f"pretrained={path},set=vmtc.num_tokens=16,cmai.gamma_max=0.5,device=cpu")
    for bad in ("0", "-2", "two"):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            make(f"pretrained={path},batch_size={bad},device=cpu")
    assert make(f"pretrained={path},batch_size=auto,device=cpu").batch_size == 1
    with pytest.raises(ValueError, match="num_tokens takes int"):
        make(f"pretrained={path},set=vmtc.num_tokens=abc,device=cpu")
    # a checkpoint that recorded its configs (as `unclutter train` and `unclutter model export` write them)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config.unclutter = {"method": "vmtc", "overrides": [], "configs": to_dict(resolve("vmtc", ["vmtc.num_tokens=16"]))}
    config.save_pretrained(path)
    recorded = make(f"pretrained={path},method=checkpoint,device=cpu")
    assert recorded.handle.num_image_tokens == 16 and recorded.handle.cmai_state is None


def test_an_image_the_processor_refuses_answers_empty_and_the_rest_are_answered(tmp_path):
    """Qwen2.5-VL's processor refuses an aspect ratio over 200: that request answers "" (as `unclutter eval` records
    an error row) and the batch's other requests are answered as alone; the whole task stopped before."""
    from PIL import Image

    path = saved(tmp_path, "qwen2_5_vl", "<|vision_start|><|image_pad|><|vision_end|>")
    lm = get_model("unclutter").create_from_arg_string(f"pretrained={path},method=cmai,device=cpu,batch_size=3")
    docs = [{"image": random_image(0)}, {"image": Image.new("RGB", (5000, 20), "white")}, {"image": random_image(2)}]
    lm.task_dict = {"toy": {"test": docs}}
    outs = lm.generate_until([request(i, "<image>\nwhat is the color ?") for i in range(3)])
    alone = [lm.generate_until([request(i, "<image>\nwhat is the color ?")])[0] for i in (0, 2)]
    assert outs[1] == "" and [outs[0], outs[2]] == alone


@pytest.mark.parametrize(
    "family, marker, method",
    [("llava", None, "vmtc+cmai"), ("qwen2_5_vl", "<|vision_start|><|image_pad|><|vision_end|>", "vmtc+cmai"),
     ("qwen3_vl", "<|vision_start|><|image_pad|><|vision_end|>", "vmtc+cmai"), ("gemma3", None, "vmtc+cmai"),
     ("llava_next", None, "vmtc+cmai"), ("llava_onevision", None, "vmtc+cmai"), ("internvl", None, "vmtc+cmai"),
     ("idefics3", None, "vmtc+cmai"), ("smolvlm", None, "vmtc+cmai")],
)  # fmt: skip
def test_loglikelihood_equals_the_scores_of_cached_greedy_decoding(tmp_path, family, marker, method):
    """lmms-eval's loglikelihood requests (multiple-choice and perplexity tasks): for the continuation greedy decoding
    writes, the sum of its tokens' log-probabilities equals the sum of `generate`'s own per-step scores (cached
    decoding under the method, a different path from the plugin's one uncached forward) and is greedy; a different
    last token scores lower and is not greedy; a target given as a function of the doc is read from the doc."""
    import torch

    lm = get_model("unclutter").create_from_arg_string(
        f"pretrained={saved(tmp_path, family, marker)},method={method},device=cpu"
    )
    lm.task_dict = {"toy": {"test": [{"image": random_image(i), "answer": None} for i in range(2)]}}
    visuals = lambda doc: [doc["image"]]  # noqa: E731
    tok = lm.processor.tokenizer
    for i in range(2):
        prompt, images = lm._prompt("<image>\nwhat is the color ?", visuals(lm.task_dict["toy"]["test"][i]), "toy")
        batch = lm.processor(images=[images], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = lm.model.generate(
                **batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
        new = out.sequences[0, batch["input_ids"].shape[1] :]
        text = tok.decode(new)
        assert tok(text, add_special_tokens=False)["input_ids"] == new.tolist()  # the continuation re-tokenizes alike
        # the raw logits (the scores are after min_new_tokens' processor, which hides the end token)
        expected = sum(float(s[0].log_softmax(-1)[t]) for s, t in zip(out.logits, new.tolist(), strict=True))
        lm.task_dict["toy"]["test"][i]["answer"] = text
        other = tok.decode(torch.cat([new[:-1], (new[-1:] + 1) % len(tok)]))
        requests = [
            Instance("loglikelihood", ("<image>\nwhat is the color ?", target, visuals, i, "toy", "test"), idx=k,
                     metadata={"task": "toy", "doc_id": i, "repeats": 1})
            for k, target in enumerate([text, lambda doc: doc["answer"], other])
        ]  # fmt: skip
        (got, greedy), (by_doc, greedy_by_doc), (worse, not_greedy) = lm.loglikelihood(requests)
        assert greedy and greedy_by_doc and not not_greedy
        assert got == pytest.approx(expected, abs=1e-4) and by_doc == got
        assert worse < got
