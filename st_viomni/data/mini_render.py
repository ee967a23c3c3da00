"""Drawing for the mini mixture: synthetic shape scenes and images of rendered text.

Images are small on purpose: Qwen2-VL spends one visual token per 28x28 pixels, and the tiny test model
takes 4 to 64 tokens per image. A scene is 112x112 pixels (16 tokens); a text image is 56 pixels high and
as wide as its text needs, in steps of 28 pixels (at most 280, so at most 20 tokens).

Text is drawn with DejaVu Sans, which ships with matplotlib (a dependency of st-viomni) and covers every
Vietnamese letter with its diacritics (``ắ ầ ẩ ễ ệ ố ờ ở ữ ự ỳ đ ...``).
"""

from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SCENE_SIZE = 112
TEXT_HEIGHT = 56
TEXT_MAX_WIDTH = 280
PATCH = 28  # pixels per Qwen2-VL visual token side


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene: ``column`` 0 (left), 1 (middle) or 2 (right)."""

    shape: str  # "circle" | "square" | "triangle"
    colour: tuple[int, int, int]
    column: int


def font_path(bold: bool = False) -> str:
    """Path of matplotlib's bundled DejaVu Sans (bold or regular)."""
    import matplotlib

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)
    if not os.path.isfile(path):
        # An unusual matplotlib install: ask its font manager (slower: it may build a font cache first).
        from matplotlib import font_manager

        path = font_manager.findfont(
            font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal"),
            fallback_to_default=False,
        )
    return path


@lru_cache(maxsize=64)
def _font(size: int, bold: bool) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(bold), size)


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, channel + rng.randint(-amount, amount))) for channel in colour)


def draw_scene(objects: list[SceneObject], rng: random.Random, size: int = SCENE_SIZE) -> Image.Image:
    """Draw shapes on a light background, one per column, with a little random jitter in place, size and hue
    (so that no two scenes are pixel-identical and a model must look at shape and colour, not exact pixels)."""
    background = tuple(rng.randint(228, 250) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for item in objects:
        # Shapes nearly fill their column: the more pixels carry colour and shape, the less an image's
        # embedding is dominated by its (uninformative) background.
        radius = rng.uniform(0.13, 0.155) * size
        centre_x = (item.column + 0.5) * cell + rng.uniform(-0.02, 0.02) * size
        centre_y = rng.uniform(0.32, 0.68) * size
        fill = _jitter(item.colour, rng, 12)
        box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
        if item.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif item.shape == "square":
            side = radius * 0.9
            draw.rectangle((centre_x - side, centre_y - side, centre_x + side, centre_y + side), fill=fill)
        elif item.shape == "triangle":
            draw.polygon(
                [
                    (centre_x, centre_y - radius),
                    (centre_x - radius, centre_y + radius * 0.8),
                    (centre_x + radius, centre_y + radius * 0.8),
                ],
                fill=fill,
            )
        else:
            raise ValueError(f"unknown shape {item.shape!r}")
    return image


def draw_text(text: str, rng: random.Random) -> Image.Image:
    """Render one line of text, dark on light or light on dark, 56 px high, as wide as needed (<= 280 px)."""
    bold = rng.random() < 0.5
    dark_on_light = rng.random() < 0.75
    light = tuple(rng.randint(220, 255) for _ in range(3))
    dark = tuple(rng.randint(10, 60) for _ in range(3))
    background, ink = (light, dark) if dark_on_light else (dark, light)
    padding = 8
    size = rng.randint(20, 24)
    while True:
        font = _font(size, bold)
        left, top, right, bottom = font.getbbox(text)
        if right - left + 2 * padding <= TEXT_MAX_WIDTH or size <= 10:
            break
        size -= 1
    width = min(TEXT_MAX_WIDTH, max(2 * PATCH, math.ceil((right - left + 2 * padding) / PATCH) * PATCH))
    image = Image.new("RGB", (width, TEXT_HEIGHT), background)
    draw = ImageDraw.Draw(image)
    x = (width - (right - left)) / 2 - left
    y = (TEXT_HEIGHT - (bottom - top)) / 2 - top + rng.uniform(-3, 3)
    draw.text((x, y), text, font=font, fill=ink)
    return image


def png_bytes(image: Image.Image) -> dict[str, bytes | None]:
    """Encode an image as PNG, in the ``{"bytes", "path"}`` form ``datasets.Image()`` stores."""
    buffer = io.BytesIO()
    # Fast compression: these images are tiny and generated often; size hardly changes.
    image.save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}
