"""A tiny random SmolVLM and its processor (images and videos), the same shapes as `tiny_idefics3`.

SmolVLM is Idefics3's layout under its own classes (it does not subclass Idefics3): 32 px tiles of 4 px
patches, ``scale_factor`` 2, 16 ``<image>`` tokens per tile or video frame. Its processor expands a
``<video>`` into a "frame from MM:SS" line plus one global-image block per frame.
"""

from __future__ import annotations

from transformers import (
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
    SmolVLMVisionConfig,
)

from .tiny import TinyVLM
from .tiny_idefics3 import TILE, TOKENS_PER_TILE, build_model, image_processor_kwargs, prompt
from .tiny_idefics3 import tiny_tokenizer as _idefics3_tokenizer


def tiny_tokenizer():
    tok = _idefics3_tokenizer()
    tok.video_token = "<video>"  # the attributes SmolVLMProcessor reads, with the family's spellings
    tok.global_image_token = "<global-img>"
    return tok


def tiny_model(**kwargs) -> SmolVLMForConditionalGeneration:
    """A random SmolVLM (keyword arguments: `tiny_idefics3.build_model`'s)."""
    return build_model(SmolVLMForConditionalGeneration, SmolVLMConfig, SmolVLMVisionConfig, **kwargs)


def tiny_processor(longest_edge: int = TILE) -> SmolVLMProcessor:
    """A SmolVLM processor for `tiny_model` (video frames are squared to one tile)."""
    return SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(**image_processor_kwargs(longest_edge)),
        tokenizer=tiny_tokenizer(),
        video_processor=SmolVLMVideoProcessor(**image_processor_kwargs(longest_edge)),
        image_seq_len=TOKENS_PER_TILE,
    )


SPEC = TinyVLM("smolvlm", tiny_model, tiny_processor, prompt, nested_images=True, vmtc=True, spd=True, image_size=TILE)
