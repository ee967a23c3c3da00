"""The prefix rule: how a task prefix, text and images become one model input.

Two paths must render exactly the same tokens:

* training and explicit formatting: ``format_input(task, text, images)`` puts the prefix literally at the
  start of the user's text (``"<ocr> what does the sign say?"``), or makes it the whole text when there is
  none;
* inference with stock sentence-transformers: ``model.encode(inputs, prompt_name=task)``. For chat-capable
  models sentence-transformers turns a prompt into a *system* message. The chat template saved with every
  viOmni model (:data:`CHAT_TEMPLATE`) recognises a system message that is exactly a task prefix and renders
  it where ``format_input`` puts it: at the start of the first user text.

Within a turn the template renders images (and videos) before text, whatever the order of the content
items, as Qwen2-VL's own prompts do. It drops Qwen2-VL-Instruct's default system turn ("You are a helpful assistant."): an embedding
input is what the user gave plus the task prefix, nothing else. A system message that is not a task prefix
is rendered as an ordinary system turn.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .tasks import PREFIXES, get_task

ImageLike = Any  # PIL.Image.Image | str | os.PathLike | bytes | {"bytes": ..., "path": ...}


def _build_chat_template() -> str:
    prefix_list = "[" + ", ".join(f"'{prefix}'" for prefix in PREFIXES.values()) + "]"
    # Whitespace control ({%- -%}) everywhere: the template must emit nothing but the turns.
    return (
        "{%- set task_prefixes = " + prefix_list + " -%}\n"
        "{%- set ns = namespace(prefix='', prefix_done=false) -%}\n"
        "{%- macro text_of(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}{%- for item in content -%}{%- if item.type == 'text' -%}{{ item.text }}{%- endif -%}{%- endfor -%}"
        "{%- endif -%}"
        "{%- endmacro -%}\n"
        "{%- for message in messages -%}\n"
        "{%- if message.role == 'system' and not ns.prefix and text_of(message.content) in task_prefixes -%}\n"
        "{%- set ns.prefix = text_of(message.content) -%}\n"
        "{%- else -%}\n"
        "<|im_start|>{{ message.role }}\n"
        "{%- if message.content is string -%}\n"
        "{%- if message.role == 'user' and ns.prefix and not ns.prefix_done -%}"
        "{{ '\\n' ~ ns.prefix ~ (' ' ~ message.content if message.content else '') }}"
        "{%- set ns.prefix_done = true -%}"
        "{%- else -%}{{ '\\n' ~ message.content }}{%- endif -%}\n"
        "{%- else -%}\n"
        "{{ '\\n' }}"
        # Images and videos first, then the text, whatever the order of the content items (a dict's key order
        # decides it in sentence-transformers): the same input renders the same tokens either way.
        "{%- for item in message.content -%}\n"
        "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{%- elif item.type == 'video' or 'video' in item -%}"
        "<|vision_start|><|video_pad|><|vision_end|>"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- for item in message.content -%}\n"
        "{%- if item.type == 'text' -%}"
        "{%- if message.role == 'user' and ns.prefix and not ns.prefix_done -%}"
        "{{ ns.prefix ~ (' ' ~ item.text if item.text else '') }}"
        "{%- set ns.prefix_done = true -%}"
        "{%- else -%}{{ item.text }}{%- endif -%}"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if message.role == 'user' and ns.prefix and not ns.prefix_done -%}"
        "{{ ns.prefix }}{%- set ns.prefix_done = true -%}"
        "{%- endif -%}\n"
        "{%- endif -%}\n"
        "<|im_end|>{{ '\\n' }}"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}<|im_start|>assistant{{ '\\n' }}{%- endif -%}\n"
    )


CHAT_TEMPLATE: str = _build_chat_template()
"""Qwen2-VL-style chat template that places a task prefix given as a system message at the start of the
first user text (see the module docstring)."""


MAX_ASPECT_RATIO = 200
"""Largest ratio of an image's long side to its short side that Qwen2-VL takes: its image processor's
``smart_resize`` (``transformers.models.qwen2_vl.image_processing_qwen2_vl``) raises for anything above 200."""

# EXIF orientations that rotate by 90 or 270 degrees (ImageOps.exif_transpose swaps width and height).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112


def load_image(image: ImageLike, *, name: str = "image") -> Image.Image:
    """Load and normalise one image to an RGB ``PIL.Image`` with EXIF orientation applied.

    Accepts a PIL image, a file path, raw encoded bytes, or a ``datasets.Image()`` dict
    (``{"bytes": ..., "path": ...}``). RGBA/LA/palette images with transparency are composited on white;
    grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB (see :func:`_integer_to_8_bit` for
    32-bit integer images).

    Args:
        image: The image.
        name: How to name this image in an error message (e.g. ``"images[1]"``).

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: Bytes or a file that cannot be decoded as an image, an image over Pillow's pixel limit
            (``Image.MAX_IMAGE_PIXELS``; decoding it could exhaust memory), an image Qwen2-VL cannot take
            (no pixels, or an aspect ratio above :data:`MAX_ASPECT_RATIO`), or an unsupported type.
    """
    if isinstance(image, Image.Image):
        _check_size(image.size, name, "image")
        try:
            image.load()
        except (OSError, SyntaxError) as error:
            raise ValueError(f"{name}: cannot decode image: {error}") from None
        return _to_rgb(image)
    with _open(image, name) as (opened, what):
        try:
            opened.load()
            image = _to_rgb(opened)
        except (OSError, SyntaxError) as error:
            raise ValueError(f"{name}: cannot decode {what}: {error}") from None
        # The file closes with the with-block: keep a copy, not the lazily backed original.
        return image.copy() if image is opened else image


def image_size(image: ImageLike, *, name: str = "image") -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`load_image` returns it (EXIF orientation applied), from a
    PIL image's size or a file's, bytes' or ``{"bytes", "path"}`` dict's header, without decoding pixels (but
    a PIL image opened lazily from a PNG is decoded for its EXIF, as :func:`load_image` decodes it anyway).

    It refuses what :func:`load_image` refuses before decoding, with the same errors. One difference, for
    PNG only: Pillow finds EXIF (or XMP) metadata stored *after* a PNG's pixel data only by decoding them,
    so the orientation here is the one in the metadata before the pixels (where Pillow and exiftool write
    it), while :func:`load_image`, which decodes anyway, also honours metadata after them. For such a rare
    file the size here has width and height swapped.

    Raises:
        FileNotFoundError, ValueError: As :func:`load_image`.
    """
    if isinstance(image, Image.Image):
        _check_size(image.size, name, "image")
        try:
            return _oriented(image.size, image.getexif())
        except (OSError, SyntaxError) as error:  # a lazily opened PNG that fails to decode
            raise ValueError(f"{name}: cannot decode image: {error}") from None
    with _open(image, name) as (opened, what):
        try:
            # PngImageFile.getexif() decodes the whole image to look for metadata after the pixel data; the
            # base class reads what the header pass found.
            exif = Image.Image.getexif(opened) if isinstance(opened, PngImagePlugin.PngImageFile) else opened.getexif()
        except (OSError, SyntaxError) as error:
            raise ValueError(f"{name}: cannot decode {what}: {error}") from None
        return _oriented(opened.size, exif)


def _oriented(size: tuple[int, int], exif: Image.Exif) -> tuple[int, int]:
    width, height = size
    return (height, width) if exif.get(_ORIENTATION_TAG, 1) in _SWAPPING_ORIENTATIONS else (width, height)


@contextmanager
def _open(image: ImageLike, name: str) -> Iterator[tuple[Image.Image, str]]:
    """The image (a path, bytes or ``{"bytes", "path"}`` dict) opened, its header read and its size checked,
    and how to name it in an error (``"image file '...'"``); the file closes when the block ends."""
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            image = image["bytes"]
        elif image.get("path") is not None:
            image = image["path"]
        else:
            raise ValueError(f"{name}: image dict has neither 'bytes' nor 'path'")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: image file not found: {path!r}")
        source, what = path, f"image file {path!r}"
    elif isinstance(image, (bytes, bytearray, memoryview)):
        source, what = io.BytesIO(bytes(image)), f"image bytes ({len(image)} bytes)"
    else:
        raise ValueError(
            f"{name}: expected a PIL image, a path, bytes or a {{'bytes', 'path'}} dict, got {type(image).__name__}"
        )
    try:
        opened = Image.open(source)  # reads the header only
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name}: {what} is too large to decode: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{name}: cannot decode {what}: {error}") from None
    with opened:
        _check_size(opened.size, name, what)
        yield opened, what


def _check_size(size: tuple[int, int], name: str, what: str) -> None:
    """Refuse an image that Qwen2-VL's image processor cannot resize (see :data:`MAX_ASPECT_RATIO`)."""
    width, height = size
    if min(width, height) < 1:
        raise ValueError(f"{name}: {what} has no pixels ({width}x{height})")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"{name}: {what} is {width}x{height}, an aspect ratio of {ratio:g}; Qwen2-VL takes at most "
            f"{MAX_ASPECT_RATIO}"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with EXIF orientation applied; an image that is already that is returned as is (no copy)."""
    orientation = image.getexif().get(_ORIENTATION_TAG, 1) if hasattr(image, "getexif") else 1
    if image.mode == "RGB" and orientation in (None, 1):
        return image
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = _integer_to_8_bit(image)
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _integer_to_8_bit(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer grayscale image as 8-bit ``"L"``, scaled instead of clipped at 255.

    ``I;16*`` images hold 16-bit values (16-bit PNGs and TIFFs open so): 0..65535 is scaled to 0..255. Mode
    ``"I"`` (32-bit signed) says nothing about the range its values use, so the values decide: all within
    0..255 are 8-bit values and kept as they are (``Image.fromarray`` of an int32 array, some TIFFs); all
    within 0..65535 are 16-bit values, scaled as above (a 16-bit image converted to ``"I"``); anything else
    (negative values or more than 16 bits) is stretched from its minimum..maximum to 0..255. A 16-bit image
    in mode ``"I"`` whose values all happen to be at most 255 (nearly black) is thus taken as 8-bit.
    """
    low, high = image.getextrema()
    if image.mode == "I" and 0 <= low and high <= 255:
        return image.convert("L")
    if 0 <= low and high <= 65535:
        scale, offset = 255 / 65535, 0.0
    else:
        scale = 255 / max(high - low, 1)
        offset = -low * scale
    return image.point(lambda value: value * scale + offset).convert("L")


def format_input(task: str, text: str | None = None, images: Sequence[ImageLike] = ()) -> str | dict[str, Any]:
    """Render one sample as the input that viOmni models are trained and queried with.

    The task prefix is placed literally at the start of the user's text (``"<vqa_single> What colour?"``);
    with images and no text the text part is the prefix alone. Images come before the text, as in
    Qwen2-VL's own prompts. ``model.encode(format_input(task, text, images))`` renders the same token ids as
    ``model.encode(<the same content>, prompt_name=task)``.

    Args:
        task: A task name from :mod:`st_viomni.tasks` (``"text_pair"``, ``"instr"``, ``"ocr"``,
            ``"vqa_single"``, ``"vqa_multi"``).
        text: The user's text, or None for an image-only input.
        images: Any number of images: PIL images, file paths, encoded bytes or ``datasets.Image()`` dicts.
            They are decoded, EXIF-oriented and converted to RGB here, so a bad image fails now, naming its
            index, rather than inside a batch.

    Returns:
        A string for text-only input, else ``{"image": [PIL images...], "text": "<prefix> text"}``.

    Example:
        ::

            from st_viomni import format_input

            format_input("text_pair", "The cat sat on the mat.")
            # '<text_pair> The cat sat on the mat.'
            format_input("vqa_single", "What colour is the square?", ["scene.png"])
            # {'image': [<PIL.Image.Image ...>], 'text': '<vqa_single> What colour is the square?'}
    """
    prefix = get_task(task).prefix
    if text is not None and not isinstance(text, str):
        raise ValueError(f"text must be a string or None, got {type(text).__name__}")
    if isinstance(images, (str, bytes, os.PathLike, Image.Image, dict)):
        images = [images]
    if not text and not images:
        raise ValueError(f"An input for task {task!r} needs text or at least one image; got neither")
    if text and text.lstrip().startswith(tuple(PREFIXES.values())):
        raise ValueError(f"text already starts with a task prefix; pass the bare text: {text[:60]!r}")
    rendered_text = f"{prefix} {text}" if text else prefix
    if not images:
        return rendered_text
    loaded = [load_image(image, name=f"images[{index}]") for index, image in enumerate(images)]
    return {"image": loaded, "text": rendered_text}
