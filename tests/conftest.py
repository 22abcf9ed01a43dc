import pytest
import torch
from helpers import random_image

import unclutter
from unclutter.models.tiny import tiny_llava, tiny_processor


def pytest_configure(config):
    """`make test-lowest` / `make compat` run the suite on another transformers: make sure it is the one imported."""
    import os

    import transformers

    expected = os.environ.get("UNCLUTTER_EXPECT_TRANSFORMERS")
    if expected and transformers.__version__ != expected:
        raise pytest.UsageError(
            f"expected transformers {expected} (overlay on PYTHONPATH) but imported {transformers.__version__} "
            f"from {transformers.__file__}"
        )


PROMPTS = [
    "user : <image> what is the color of the shape ? please answer in one word . assistant :",
    "user : <image> how many ? assistant :",
]


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


def image_features(model, batch) -> torch.Tensor:
    """(images, tokens, hidden) projected features, through the public `get_image_features` of both releases."""
    return torch.stack(unclutter.compat.image_features(model.model, batch["pixel_values"]))
