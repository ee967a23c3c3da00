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
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

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


def load_image(image: ImageLike, *, name: str = "image") -> Image.Image:
    """Load and normalise one image to an RGB ``PIL.Image`` with EXIF orientation applied.

    Accepts a PIL image, a file path, raw encoded bytes, or a ``datasets.Image()`` dict
    (``{"bytes": ..., "path": ...}``). RGBA/LA/palette images with transparency are composited on white;
    grayscale, palette, CMYK and 16-bit images are converted to 8-bit RGB.

    Args:
        image: The image.
        name: How to name this image in an error message (e.g. ``"images[1]"``).

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: Bytes or a file that cannot be decoded as an image, or an unsupported type.
    """
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
        return _decode(path, f"{name}: cannot decode image file {path!r}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(image)), f"{name}: cannot decode image bytes ({len(image)} bytes)")
    if isinstance(image, Image.Image):
        try:
            image.load()
        except (OSError, SyntaxError) as error:
            raise ValueError(f"{name}: cannot decode image: {error}") from None
        return _to_rgb(image)
    raise ValueError(
        f"{name}: expected a PIL image, a path, bytes or a {{'bytes', 'path'}} dict, got {type(image).__name__}"
    )


def _decode(source: str | io.BytesIO, error_message: str) -> Image.Image:
    try:
        with Image.open(source) as opened:
            opened.load()
            image = _to_rgb(opened)
            # The file closes with the with-block: keep a copy, not the lazily backed original.
            return image.copy() if image is opened else image
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{error_message}: {error}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with EXIF orientation applied; an image that is already that is returned as is (no copy)."""
    orientation = image.getexif().get(0x0112, 1) if hasattr(image, "getexif") else 1
    if image.mode == "RGB" and orientation in (None, 1):
        return image
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer images: rescale to 8 bits instead of clipping everything above 255 to white.
        image = image.point(lambda value: value * (255 / 65535)).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


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
