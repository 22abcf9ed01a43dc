"""A tiny random Idefics3 (SigLIP-style tower, pixel-shuffle connector, Llama decoder) and its processor.

The real layout, only small: 32 px tiles of 4 px patches (an 8x8 patch grid), ``scale_factor`` 2, so each
tile (and the global image) reaches the LLM as 16 ``<image>`` tokens. The processor resizes an image's
longest edge to ``longest_edge`` and splits it into 32 px tiles plus a global image when it is larger:
the default (32) never tiles (the shared contract suite), ``tiny_processor(longest_edge=64)`` tiles a
square image into 2x2 + global, a 2:1 image into 1x2 + global.

The tokenizer knows the family's tags as single tokens: ``<fake_token_around_image>``, ``<global-img>``,
``<row_i_col_j>`` (i, j <= 6), ``<end_of_utterance>``, and a ``\\n`` token (the processor puts newlines
between tile rows). The model config records the tags' ids (`tag_ids`), so CMAI knows its structural
tokens without the processor.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, pre_tokenizers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from .tiny import TinyVLM, text_kwargs, vision_kwargs, word_tokenizer

TILE = 32  # px: the vision tower's image_size and the processor's tile size
PATCH = 4
SCALE = 2
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // SCALE**2
ROW_COL = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
TAGS = ["<fake_token_around_image>", "<global-img>", *ROW_COL]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>", "<end_of_utterance>", *TAGS]
EXTRA_WORDS = "user assistant frame from video you are provided following series of frames You Frame H MM SS".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with the Idefics3/SmolVLM special tokens; ``\\n`` is a token of its own."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),  # keep newlines as tokens
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    return word_tokenizer(
        SPECIALS + ["\n"],
        EXTRA_WORDS,
        ["[", "]", *"0123456789"],
        pre_tokenizer=pre_tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:],
    )


def tag_ids(tok: PreTrainedTokenizerFast) -> dict:
    """The tags' ids as config fields (`Idefics3Adapter.structural_token_ids` reads them)."""
    return {
        "fake_image_token_id": tok.convert_tokens_to_ids("<fake_token_around_image>"),
        "global_image_token_id": tok.convert_tokens_to_ids("<global-img>"),
        "row_col_token_ids": tok.convert_tokens_to_ids(ROW_COL),
    }


def build_model(
    model_class: type[PreTrainedModel],
    config_class: type[PretrainedConfig],
    vision_class: type[PretrainedConfig],
    *,
    vision_layers: int = 4,
    text_layers: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A random model of the Idefics3 layout (Idefics3's or SmolVLM's classes) with 16 image tokens per 32 px tile."""
    tok = tiny_tokenizer()
    config = config_class(
        vision_config=vision_class(**vision_kwargs(TILE, PATCH, vision_layers)),
        text_config=LlamaConfig(**text_kwargs(tok, layers=text_layers)),
        scale_factor=SCALE,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        **tag_ids(tok),
    )
    torch.manual_seed(seed)
    model = model_class(config)
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype).eval()


def tiny_model(**kwargs) -> Idefics3ForConditionalGeneration:
    """A random Idefics3 (keyword arguments: `build_model`'s)."""
    return build_model(Idefics3ForConditionalGeneration, Idefics3Config, Idefics3VisionConfig, **kwargs)


def image_processor_kwargs(longest_edge: int) -> dict:
    return dict(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": TILE})


def tiny_processor(longest_edge: int = TILE) -> Idefics3Processor:
    """An Idefics3 processor for `tiny_model`; images larger than one tile after resizing are split."""
    return Idefics3Processor(
        image_processor=Idefics3ImageProcessor(**image_processor_kwargs(longest_edge)),
        tokenizer=tiny_tokenizer(),
        image_seq_len=TOKENS_PER_TILE,
    )


def prompt(processor, question: str) -> str:
    return f"user : <image> {question} <end_of_utterance> \n assistant :"


SPEC = TinyVLM("idefics3", tiny_model, tiny_processor, prompt, nested_images=True, vmtc=True, spd=True, image_size=TILE)
