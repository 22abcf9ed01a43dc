import numpy as np
import pytest
import torch
from PIL import Image

from unclutter.models.tiny import tiny_llava, tiny_processor

PROMPTS = [
    "user : <image> what is the color of the shape ? please answer in one word . assistant :",
    "user : <image> how many ? assistant :",
]


def random_image(seed: int, size: int = 80) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def images():
    return [random_image(0), random_image(1)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny LLaVA and its processor saved as a checkpoint directory (safetensors)."""
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_llava().save_pretrained(d)
    tiny_processor().save_pretrained(d)
    return d


@pytest.fixture
def model():
    torch.manual_seed(0)
    return tiny_llava()


@pytest.fixture
def processor():
    return tiny_processor()


def encode(processor, images, prompts=PROMPTS):
    return processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
