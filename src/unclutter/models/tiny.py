"""Tiny random LLaVA-1.5-shaped models and processors built from configs (no download).

They have the real architecture (CLIP ViT with CLS, 2-layer GELU projector, LLaMA decoder,
`vision_feature_layer=-2`, "default" feature selection), only small, so tests and CPU benchmarks
exercise the same code paths as `llava-hf/llava-1.5-7b-hf`.

The other families' tiny models (`tiny_vlm`, one ``tiny_<family>`` module each) build on the pieces here:
`word_tokenizer` and the `text_kwargs` / `vision_kwargs` shapes of the small decoders and vision towers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORDS = (
    "user assistant what is the color of shape in image a an red green blue yellow circle square triangle star "
    "how many are there left right top bottom yes no answer question please describe one two three four"
).split()
PUNCTUATION = [":", "?", ".", ","]


def word_tokenizer(
    specials: list[str],
    extra_words: Sequence[str] = (),
    symbols: Sequence[str] = (),
    *,
    additional_special_tokens: list[str],
    pre_tokenizer: pre_tokenizers.PreTokenizer | None = None,
    **tokens,
) -> PreTrainedTokenizerFast:
    """A left-padding word-level tokenizer, the one every tiny family builds on.

    Ids in this order: ``specials``, the sorted `WORDS` + ``extra_words``, `PUNCTUATION`, ``symbols``. ``tokens``
    (``bos_token``, ``extra_special_tokens`` ...) go to `PreTrainedTokenizerFast`. The default pre-tokenizer
    splits on whitespace and punctuation.
    """
    vocab = specials + sorted(set(WORDS + list(extra_words))) + PUNCTUATION + list(symbols)
    backend = Tokenizer(models.WordLevel(vocab={tok: i for i, tok in enumerate(vocab)}, unk_token="<unk>"))
    if pre_tokenizer is None:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.pre_tokenizer = pre_tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)
    tok.add_special_tokens({"additional_special_tokens": additional_special_tokens})
    tok.padding_side = "left"
    return tok


def tiny_tokenizer(extra_words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with LLaVA's special tokens (``<image>`` included)."""
    return word_tokenizer(
        SPECIALS,
        extra_words or [],
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        additional_special_tokens=["<image>"],
    )


def text_kwargs(tok: PreTrainedTokenizerFast, *, layers: int = 3, intermediate: int = 128, **extra) -> dict:
    """The tiny families' decoder: hidden 64, 4 query / 2 key-value heads, 4096 positions, ``tok``'s vocabulary."""
    return dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **extra,
    )


def vision_kwargs(image_size: int, patch_size: int, layers: int, *, intermediate: int = 64, **extra) -> dict:
    """The tiny families' vision tower: hidden 32, 4 heads, ``layers`` blocks over ``image_size`` px images."""
    return dict(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        **extra,
    )


def tiny_llava(
    *,
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 6,
    text_hidden: int = 64,
    text_layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LlavaForConditionalGeneration:
    """A random LLaVA-1.5-shaped model; ``(image_size // patch_size) ** 2`` patches per image."""
    tok = tiny_tokenizer()
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 3,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.to(dtype).eval()


def tiny_processor(image_size: int = 64, patch_size: int = 8) -> LlavaProcessor:
    """A LLaVA processor matching `tiny_llava` (CLIP normalisation, resize + center crop)."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


# ---- one tiny model per supported family --------------------------------------------------------


@dataclass(frozen=True)
class TinyVLM:
    """A tiny random model of one family, its processor, and how that family's prompts and batches look.

    ``model(seed=0, dtype=torch.float32, attn_implementation="sdpa")`` builds the ``*ForConditionalGeneration``
    from configs only; ``processor()`` builds the matching processor (a word-level tokenizer with the
    family's special tokens and chat template); ``prompt(processor, question)`` is one user turn with one
    image, ready for generation. ``nested_images``: the processor reads a flat image list as one sample's
    images (Gemma 3, SmolVLM), so a batch passes ``[[image], [image]]``. ``vmtc``/``spd``: token reduction
    is supported on this family (else CMAI only).
    """

    family: str
    model: Callable[..., PreTrainedModel]
    processor: Callable[[], ProcessorMixin]
    prompt: Callable[[ProcessorMixin, str], str]
    nested_images: bool = False
    vmtc: bool = False
    spd: bool = False
    image_size: int = 64  # a size the processor handles without tiling, for the shared tests

    def batch(self, processor, images: list, questions: list[str]):
        """Processor outputs for one image per question, left-padded."""
        imgs = [[im] for im in images] if self.nested_images else list(images)
        text = [self.prompt(processor, q) for q in questions]
        return processor(images=imgs, text=text, return_tensors="pt", padding=True)


# Every family `unclutter.apply` supports; `tiny_vlm(name)` imports `unclutter.models.tiny_<name>` (its `SPEC`).
FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_5_vl",
    "qwen3_vl",
    "gemma3",
    "internvl",
    "idefics3",
    "smolvlm",
)


def tiny_vlm(family: str) -> TinyVLM:
    if family not in FAMILIES:
        raise ValueError(f"no tiny model for {family!r}; families: {', '.join(FAMILIES)}.")
    if family == "llava":
        return LLAVA
    return importlib.import_module(f"unclutter.models.tiny_{family}").SPEC


def llava_prompt(processor, question: str) -> str:
    """One user turn with one image, the prompt of the LLaVA families (LLaVA, LLaVA-NeXT, LLaVA-OneVision)."""
    return f"user : <image> {question} assistant :"


LLAVA = TinyVLM("llava", tiny_llava, tiny_processor, llava_prompt, vmtc=True, spd=True)
