"""Check and normalise a batch of encode/training inputs before sentence-transformers preprocesses it.

Stock sentence-transformers embeds a string naming a missing image file as plain text, fails inside
torchvision with a message naming no file for a missing or corrupt image in a dict, and rejects ``None`` without
saying which input it was. :func:`check_inputs` turns each of those into an error naming the input's index, and
decodes every image once to EXIF-oriented 8-bit RGB (see :func:`~st_viomni.formatting.load_image`).
"""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

from .formatting import load_image

# The extensions sentence-transformers recognises as image paths (base/modality.py).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tiff", ".webp")


def check_inputs(inputs: list[Any], offset: int = 0) -> list[Any]:
    """Return ``inputs`` with every image decoded to RGB, or raise an error naming the first bad input.

    Accepted forms, as in sentence-transformers: a string, a PIL image, an image path, a dict with ``"text"``
    and/or ``"image"`` (one image or a list), and chat messages (a list of ``{"role", "content"}`` dicts).

    Args:
        inputs: The batch.
        offset: Index of ``inputs[0]`` in the caller's list, so that errors name the caller's index.

    Raises:
        ValueError: ``None``, an unsupported type, a dict with no text and no image, or an image that cannot
            be decoded; the message starts with ``input <index>``.
        FileNotFoundError: A string that names an image file which does not exist (pass ``{"text": ...}`` to
            embed such a string as text).
    """
    return [_check_input(value, f"input {offset + index}") for index, value in enumerate(inputs)]


def describe_input(value: Any) -> str:
    """A short description of an input for error messages: its text (shortened) and its number of images."""
    text, images = "", 0
    if isinstance(value, str):
        text = value
    elif isinstance(value, Image.Image):
        images = 1
    elif isinstance(value, dict) and "role" not in value:
        text = value.get("text") or ""
        image = value.get("image")
        images = len(image) if isinstance(image, (list, tuple)) else int(image is not None)
    elif isinstance(value, (list, tuple)):
        for message in value:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                text += content
            elif isinstance(content, list):
                text += "".join(item.get("text", "") for item in content if isinstance(item, dict))
                images += sum(1 for item in content if isinstance(item, dict) and item.get("type") == "image")
    shown = text if len(text) <= 60 else text[:57] + "..."
    return f"the input with text {shown!r} and {images} image(s)"


def is_image_path(value: str) -> bool:
    """Whether a string names an image file (sentence-transformers' rule: an image extension, no space, not a
    URL); :func:`check_inputs` then requires the file to exist."""
    return (
        not value.startswith(("http://", "https://", "data:"))
        and " " not in value.strip()
        and value.lower().endswith(IMAGE_EXTENSIONS)
    )


def is_conversation(value: Any) -> bool:
    """Whether ``value`` is one chat conversation (a non-empty list of ``{"role", ...}`` messages)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _check_input(value: Any, name: str) -> Any:
    if value is None:
        raise ValueError(f"{name} is None; expected text, an image, a {{'text', 'image'}} dict or chat messages")
    if isinstance(value, str):
        if is_image_path(value):
            if not os.path.isfile(value):
                raise FileNotFoundError(
                    f"{name} names an image file that does not exist: {value!r} "
                    "(to embed this string as text, pass {'text': ...})"
                )
            return load_image(value, name=name)
        return value
    if isinstance(value, Image.Image):
        return load_image(value, name=name)
    if isinstance(value, dict):
        if "role" in value and "content" in value:
            return _check_messages([value], name)[0]
        return _check_modality_dict(value, name)
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, dict) and "role" in item for item in value):
        return _check_messages(list(value), name)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(part, str) for part in value):
        return value  # a text pair, for cross-encoder-style inputs
    # Audio arrays, video frames and other modalities pass through to sentence-transformers unchanged.
    if type(value).__module__.split(".")[0] in ("numpy", "torch"):
        return value
    raise ValueError(f"{name} has unsupported type {type(value).__name__}")


def _check_modality_dict(value: dict, name: str) -> dict:
    if value.get("text") is None and value.get("image") is None and not (value.keys() - {"text", "image"}):
        raise ValueError(f"{name} has neither text nor an image: {sorted(value)}")
    checked = dict(value)  # keep the caller's dict (and its key order) intact
    if "text" in value and value["text"] is not None and not isinstance(value["text"], str):
        raise ValueError(f"{name}['text'] must be a string, got {type(value['text']).__name__}")
    if "text" in value and value["text"] is None:
        del checked["text"]
    if "image" in value:
        images = value["image"]
        if images is None:
            del checked["image"]
        elif isinstance(images, (list, tuple)):
            checked["image"] = [load_image(image, name=f"{name}['image'][{i}]") for i, image in enumerate(images)]
        else:
            checked["image"] = load_image(images, name=f"{name}['image']")
    return checked


def _check_messages(messages: list[dict], name: str) -> list[dict]:
    checked = []
    for turn, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            items = []
            for position, item in enumerate(content):
                if isinstance(item, dict) and item.get("type") == "image" and "image" in item:
                    where = f"{name} message {turn} content[{position}]"
                    item = {**item, "image": load_image(item["image"], name=where)}
                items.append(item)
            message = {**message, "content": items}
        elif content is None:
            raise ValueError(f"{name} message {turn} has no content")
        checked.append(message)
    return checked
