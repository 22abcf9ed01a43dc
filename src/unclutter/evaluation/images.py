"""Reading images as the models take them: 8-bit RGB, or an error that names the file (numpy and Pillow only, so the
data tools can use it without loading torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def open_image(path: Path) -> Image.Image:
    """An RGB image, or an error that names the file (corrupt and missing files, unsupported pixel modes)."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except Exception as exc:  # PIL raises many types for broken files
        raise ValueError(f"cannot read image {path}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale (``I;16*``) is scaled to 8 bits: Pillow's own conversion clips every value above 255,
    which turns an ordinary 16-bit picture white. 32-bit integer or float pixels (``I``, ``F``) have no range to
    scale from, so they are refused."""
    if image.mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.float64) / 257.0  # 65535 -> 255
        return Image.fromarray(np.rint(grey).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("I", "F"):
        raise ValueError(
            f"{image.mode!r} pixels (32-bit {'integer' if image.mode == 'I' else 'float'}) have no known range; "
            "save the image as 8- or 16-bit"
        )
    return image.convert("RGB")
