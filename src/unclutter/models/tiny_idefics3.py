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
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from .tiny import WORDS, TinyVLM

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
    words = sorted(set(WORDS + EXTRA_WORDS))
    vocab = {t: i for i, t in enumerate(SPECIALS + ["\n"] + words + [":", "?", ".", ",", "[", "]"])}
    vocab.update({str(d): len(vocab) + d for d in range(10)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),  # keep newlines as tokens
            pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    tok.padding_side = "left"
    return tok


def tag_ids(tok: PreTrainedTokenizerFast) -> dict:
    """The tags' ids as config fields (`Idefics3Adapter.structural_token_ids` reads them)."""
    return {
        "fake_image_token_id": tok.convert_tokens_to_ids("<fake_token_around_image>"),
        "global_image_token_id": tok.convert_tokens_to_ids("<global-img>"),
        "row_col_token_ids": tok.convert_tokens_to_ids(ROW_COL),
    }


def tiny_configs(tok: PreTrainedTokenizerFast, *, vision_layers: int, text_layers: int) -> tuple:
    """(vision kwargs, Llama text config) shared by the Idefics3 and SmolVLM tiny models."""
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=TILE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return vision, text


def tiny_model(
    *,
    vision_layers: int = 4,
    text_layers: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> Idefics3ForConditionalGeneration:
    """A random Idefics3 with 16 image tokens per 32 px tile."""
    tok = tiny_tokenizer()
    vision, text = tiny_configs(tok, vision_layers=vision_layers, text_layers=text_layers)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**vision),
        text_config=text,
        scale_factor=SCALE,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        **tag_ids(tok),
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype).eval()


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
