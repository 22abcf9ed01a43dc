"""The shapes world: images of 1-4 coloured shapes on cluttered, textured backgrounds, with ground truth.

Shapes sit in distinct cells of a 3x3 grid (so "where is ..." has one answer) with jitter; every
(colour, shape) pair is unique in an image. The background is low-saturation texture and clutter
(noise, stripes, small dots and strokes): most patches carry nothing a question needs, which is
the redundancy VMTC and CMAI are about. Everything is drawn from ``random.Random(seed)`` streams,
so a seed gives the same images and questions on every machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 210, 20),
    "purple": (145, 40, 190),
    "orange": (250, 125, 10),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
POSITIONS = (  # row-major names of the 3x3 cells
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
IMAGE_SIZE = 96
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    row: int  # grid cell, 0..2 from the top
    col: int  # 0..2 from the left
    cx: float  # centre and radius in pixels of the final image
    cy: float
    radius: float

    @property
    def position(self) -> str:
        return POSITIONS[self.row][self.col]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background_seed: int

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) | {"position": o.position} for o in self.objects], "seed": self.background_seed}


def sample_scene(rng: random.Random, size: int = IMAGE_SIZE) -> Scene:
    """1-4 objects in distinct grid cells, distinct (colour, shape) pairs, sizes and jitter."""
    n = rng.randint(1, 4)
    cells = rng.sample(range(9), n)
    pairs: set[tuple[str, str]] = set()
    objects = []
    cell = size / 3
    for c in cells:
        while True:
            pair = (rng.choice(list(COLORS)), rng.choice(SHAPES))
            if pair not in pairs:
                pairs.add(pair)
                break
        radius = rng.uniform(0.40, 0.48) * cell
        slack = cell / 2 - radius
        row, col = divmod(c, 3)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        objects.append(Obj(pair[1], pair[0], row, col, cx, cy, radius))
    objects.sort(key=lambda o: (o.row, o.col))  # reading order
    return Scene(tuple(objects), rng.randrange(2**31))


def _background(seed: int, size: int) -> Image.Image:
    """Muted texture: a base tone, value noise, faint stripes or checks, and small grey-ish clutter."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    base = np.array([rng.randint(90, 190)] * 3, dtype=np.float32) + np.array(
        [rng.randint(-18, 18) for _ in range(3)], dtype=np.float32
    )
    img = np.broadcast_to(base, (size, size, 3)).copy()
    coarse = nprng.normal(0, 14, (size // 8 + 1, size // 8 + 1, 1)).repeat(8, 0).repeat(8, 1)[:size, :size]
    img += coarse + nprng.normal(0, 9, (size, size, 1))
    yy, xx = np.mgrid[0:size, 0:size]
    kind = rng.choice(("stripes", "checks", "waves", "plain"))
    period = rng.uniform(5, 12)
    angle = rng.uniform(0, math.pi)
    if kind == "stripes":
        img += 12 * np.sign(np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period))[..., None]
    elif kind == "checks":
        img += 10 * (((xx // int(period)) + (yy // int(period))) % 2 * 2 - 1)[..., None]
    elif kind == "waves":
        img += 12 * np.sin(xx / period + 3 * np.sin(yy / (2 * period)))[..., None]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.randint(15, 40)):  # clutter: small, desaturated marks
        g = rng.randint(40, 230)
        tone = tuple(int(min(255, max(0, g + rng.randint(-20, 20)))) for _ in range(3))
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        if rng.random() < 0.5:
            r = rng.uniform(0.5, 1.8)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tone)
        else:
            a, length = rng.uniform(0, math.pi), rng.uniform(2, 7)
            draw.line((x, y, x + length * math.cos(a), y + length * math.sin(a)), fill=tone, width=1)
    return pil


def _polygon(o: Obj, scale: float) -> list[tuple[float, float]] | None:
    cx, cy, r = o.cx * scale, o.cy * scale, o.radius * scale
    if o.shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if o.shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if o.shape == "star":
        return [
            (cx + rr * math.cos(-math.pi / 2 + k * math.pi / 5), cy + rr * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
            for rr in [r if k % 2 == 0 else r * 0.45]
        ]
    if o.shape == "cross":
        a, b = r * 0.95, r * 0.33
        return [
            (cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
            (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b),
        ]  # fmt: skip
    return None  # circle


def _layers(scene: Scene, size: int) -> tuple[Image.Image, Image.Image]:
    """(coverage mask "L", colour layer "RGB") of the scene's shapes, drawn supersampled and resized to ``size``
    (so edges are anti-aliased)."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    layer = Image.new("RGB", (big, big), (0, 0, 0))
    dm, dl = ImageDraw.Draw(mask), ImageDraw.Draw(layer)
    for o in scene.objects:
        rgb = COLORS[o.color]
        poly = _polygon(o, _SUPERSAMPLE)
        if poly is None:
            r, cx, cy = o.radius * 0.9 * _SUPERSAMPLE, o.cx * _SUPERSAMPLE, o.cy * _SUPERSAMPLE
            box = (cx - r, cy - r, cx + r, cy + r)
            dm.ellipse(box, fill=255)
            dl.ellipse(box, fill=rgb)
        else:
            dm.polygon(poly, fill=255)
            dl.polygon(poly, fill=rgb)
    return mask.resize((size, size), Image.Resampling.LANCZOS), layer.resize((size, size), Image.Resampling.LANCZOS)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image."""
    image = _background(scene.background_seed, size)
    mask, layer = _layers(scene, size)
    image.paste(layer, (0, 0), mask)
    return image


def object_coverage(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) float in [0, 1]: how much of each pixel the shapes cover (the mask `render` pastes with)."""
    return np.asarray(_layers(scene, size)[0], dtype=np.float32) / 255.0
