"""Loading vision-language models and generating answers in batches (shared by the runner and the lmms-eval plugin).

Any family `unclutter.apply` supports loads through `AutoModelForImageTextToText`; a class it does not
support is refused by `apply` with the list of supported ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str) -> str:
    """``device`` checked against what this machine has ("auto": CUDA if present, else the CPU)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"--device {device!r} is not a device name torch knows (cpu, cuda, cuda:1, mps, ...)."
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise ValueError(
                f"--device {device} asked for, but this machine has {count} CUDA device(s); use --device cpu."
            )
    elif dev.type != "cpu":
        here = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if here is None or here.type != dev.type:
            raise ValueError(
                f"--device {device} asked for, but this machine has no {dev.type} device; use --device cpu."
            )
    return device


def load_dtype(dtype: str, device: str) -> torch.dtype | str:
    """The dtype `load_model` loads in on ``device`` (a resolved one): "auto" is float32 on the CPU (half precision
    matmuls are slow or missing on many CPUs) and the checkpoint's own dtype ("auto") elsewhere."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}.")
    return torch.float32 if DTYPES[dtype] == "auto" and device == "cpu" else DTYPES[dtype]


def local_or_hub(name: str) -> str:
    """A model name as it stays the same model from any directory: an existing local folder by its absolute path, a
    hub id as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_model(name: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """(model, processor) from a hub id or a local directory, safetensors weights only."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(device)
    torch_dtype = load_dtype(dtype, device)
    path = Path(name).expanduser()
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name):
        raise ValueError(f"no model folder {name}: give an existing checkpoint folder or a hub id (owner/name).")
    if path.exists() and not any(path.glob("*.safetensors")):
        raise ValueError(f"{name} holds no .safetensors weights; unclutter never loads pickled checkpoints.")
    if path.exists():
        name = str(path)  # the folder as found (~ expanded), not a hub id
    model = AutoModelForImageTextToText.from_pretrained(
        name, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    ).to(device)
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"  # batched generation needs left padding
    return model.eval(), processor


class ImagesRefused(ValueError):
    """The processor refuses some images of a batch (Qwen2.5-VL's aspect ratio limit, say) though it takes a plain
    image in their place: the fault is theirs, not the run's. ``refused`` maps each prompt's index to the message."""

    def __init__(self, refused: dict[int, str]) -> None:
        super().__init__("; ".join(f"image {i}: {message}" for i, message in refused.items()))
        self.refused = refused


def _encode(processor, prompts: list[str], images: list[list[Image.Image]] | None):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def _refused_images(processor, prompts: list[str], images: list[list[Image.Image]]) -> dict[int, str]:
    """The prompts whose images the processor refuses, each tried alone and then with plain images in their place
    (a prompt that fails either way is not the images' fault)."""
    refused = {}
    for i, (prompt, ims) in enumerate(zip(prompts, images, strict=True)):
        try:
            _encode(processor, [prompt], [ims])
        except (ValueError, TypeError) as exc:
            try:
                _encode(processor, [prompt], [[Image.new("RGB", (224, 224))] * len(ims)])
            except (ValueError, TypeError):
                continue
            refused[i] = str(exc)
    return refused


def _model_inputs(model, processor, prompts: list[str], images: list[list[Image.Image]] | None):
    """The processor's batch on the model's device, pixels in the model's dtype; `ImagesRefused` names images the
    processor refuses."""
    try:
        inputs = _encode(processor, prompts, images)
    except (ValueError, TypeError):  # what processors raise for inputs they cannot take: whose fault?
        refused = _refused_images(processor, prompts, images) if images else {}
        if not refused:
            raise
        raise ImagesRefused(refused) from None
    inputs = inputs.to(model.device)
    for key, value in inputs.items():
        if key.startswith("pixel_values") and value.is_floating_point():
            inputs[key] = value.to(model.dtype)
    return inputs


def continuation_logprob(
    model, processor, prompt: str, continuation: str, images: list[Image.Image] | None = None
) -> tuple[float, bool]:
    """A loglikelihood request as lm-eval and lmms-eval define it: the sum of the log-probabilities of
    ``continuation``'s tokens after ``prompt`` (a chat-formatted prompt, as `build_prompt` writes, with its
    ``images``), and whether greedy decoding continues with exactly those tokens.

    The continuation is tokenized on its own (no special tokens) and appended to the processor's encoding of the
    prompt, so the prompt is exactly what `generate` would see and no token straddles the two; the appended tokens
    are text (attention 1, token types 0). One uncached forward scores them all: with the method applied, CMAI
    inhibits the continuation's rows as cached decoding would (the exactness contract)."""
    ids = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError(f"the continuation {continuation!r} has no tokens; a loglikelihood needs at least one.")
    inputs = _model_inputs(model, processor, [prompt], [list(images)] if images else None)
    prompt_ids = inputs["input_ids"]
    ids = ids.to(prompt_ids.device)
    for name, value in list(inputs.items()):  # every per-token input grows by the continuation
        if isinstance(value, torch.Tensor) and value.shape == prompt_ids.shape and name != "input_ids":
            fill = torch.ones_like if name == "attention_mask" else torch.zeros_like
            inputs[name] = torch.cat([value, fill(ids, dtype=value.dtype)], dim=1)
    inputs["input_ids"] = torch.cat([prompt_ids, ids], dim=1)
    with torch.inference_mode():
        logits = model(**inputs, use_cache=False).logits[0, prompt_ids.shape[1] - 1 : -1].float()  # (n, vocab)
    target = ids[0].to(logits.device)
    total = logits.log_softmax(dim=-1).gather(1, target[:, None]).sum()
    return float(total), bool((logits.argmax(dim=-1) == target).all())


def build_prompt(processor, question: str, with_image: bool | int = True) -> str:
    """The processor's chat template when it has one, else the LLaVA-1.5 (Vicuna v1) conversation with the
    processor's image placeholder. ``with_image``: whether the question comes with an image, or how many."""
    images = int(with_image)
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if template:
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    placeholders = f"{processor.image_token}\n" * images
    return f"{LLAVA_SYSTEM} USER: {placeholders}{question} ASSISTANT:"


def generate(
    model,
    processor,
    prompts: list[str],
    images: list[Image.Image] | list[list[Image.Image]] | None,
    *,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    num_beams: int = 1,
) -> list[str]:
    """Answers for a batch of chat-formatted prompts, each with one image (``images[i]``), several
    (``images[i]`` a list), or none (``images=None``). Greedy unless ``do_sample`` (then ``temperature`` and
    ``top_p``); ``num_beams`` > 1 is beam search. Images the processor refuses raise `ImagesRefused`."""
    # one image list per prompt: Gemma 3 and SmolVLM read a flat list as one sample's images. The processor runs
    # outside inference mode: its tensors stay ordinary ones (an adapter may track them across calls).
    nested = [im if isinstance(im, list) else [im] for im in images] if images else None
    inputs = _model_inputs(model, processor, prompts, nested)
    tok = processor.tokenizer
    kwargs = {
        "do_sample": do_sample, "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
        "num_beams": num_beams,
    }  # fmt: skip
    if do_sample:
        kwargs["temperature"] = temperature
        if top_p is not None:
            kwargs["top_p"] = top_p
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
