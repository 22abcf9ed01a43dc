"""Helpers shared by the family test files: random inputs, greedy decoding, and the two decoding checks
(cached decoding == one uncached forward over its tokens; a sample in a batch == that sample alone)."""

import os

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

# the device the family contract runs on: cpu here and in CI; UNCLUTTER_TEST_DEVICE=cuda on a GPU machine
# (scripts/gpu_bench.sh runs tests/test_families.py so when a lease has time left)
DEVICE = os.environ.get("UNCLUTTER_TEST_DEVICE", "cpu")


def random_image(seed: int, height: int = 80, width: int | None = None) -> Image.Image:
    """A uniform-noise RGB image of ``height`` x ``width`` pixels (square without ``width``)."""
    pixels = np.random.RandomState(seed).rand(height, height if width is None else width, 3)
    return Image.fromarray((pixels * 255).astype("uint8"))


def random_video(seed: int, frames: int, height: int, width: int) -> np.ndarray:
    """(frames, height, width, 3) uniform-noise uint8 frames."""
    return (np.random.RandomState(seed).rand(frames, height, width, 3) * 255).astype("uint8")


def logits(model, batch) -> torch.Tensor:
    """The logits of one uncached forward."""
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def generate(model, batch, steps: int = 4, **kwargs):
    """Greedy decoding of exactly ``steps`` tokens, with each step's logits (``kwargs`` go to `generate`)."""
    with torch.no_grad():
        return model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **kwargs,
        )  # fmt: skip


def extend(batch, sequences):
    """The processor's inputs for one uncached forward over prompt + generated tokens: every per-token input
    grows by the generated length (the attention mask with ones, token types with zeros: new tokens are text)."""
    ids = batch["input_ids"]
    extra = sequences.shape[1] - ids.shape[1]
    out = dict(batch)
    out["input_ids"] = sequences
    for name, value in batch.items():
        if name != "input_ids" and isinstance(value, torch.Tensor) and value.shape[:2] == ids.shape:
            fill = torch.ones if name == "attention_mask" else torch.zeros
            out[name] = torch.cat([value, fill(ids.shape[0], extra, dtype=value.dtype, device=value.device)], dim=1)
    return out


def assert_cached_equals_full(model, batch, steps: int = 4, **kwargs):
    """Cached greedy decoding == one uncached forward over its tokens; returns (generate output, full logits)."""
    gen = generate(model, batch, steps, **kwargs)
    full = logits(model, extend(batch, gen.sequences[:, :-1]))
    first = gen.sequences.shape[1] - 1 - steps
    for t in range(steps):
        torch.testing.assert_close(gen.logits[t], full[:, first + t], atol=1e-4, rtol=1e-4)
    return gen, full


def assert_sample_equals_alone(model, together, i: int, alone_batch, *, tokens: bool = True) -> None:
    """Sample ``i`` of a batch's greedy decoding (``together``) == ``alone_batch``, that sample by itself, decoded
    alone: the same logits at every step and, with ``tokens``, the same tokens."""
    steps = len(together.logits)
    alone = generate(model, alone_batch, steps)
    if tokens:
        assert torch.equal(together.sequences[i, -steps:], alone.sequences[0, -steps:])
    for t in range(steps):
        torch.testing.assert_close(together.logits[t][i], alone.logits[t][0], atol=5e-5, rtol=1e-4)


def units_by_index(side: int, kernel: int) -> torch.Tensor:
    """Raster indices of a ``side`` x ``side`` patch grid, unit after unit of ``kernel`` x ``kernel`` patches (a
    pooling or pixel-shuffle unit; units and the patches in each in raster order), written out, not reshaped."""
    t = side // kernel
    return torch.tensor(
        [
            (i * kernel + r) * side + j * kernel + c
            for i in range(t)
            for j in range(t)
            for r in range(kernel)
            for c in range(kernel)
        ]
    )


class StopAt(TrainerCallback):
    """Raises KeyboardInterrupt at the end of training step ``step``: a killed run, for resume tests."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")
