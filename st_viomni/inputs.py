"""Check and normalise a batch of encode/training inputs before sentence-transformers preprocesses it.

Stock sentence-transformers embeds a string naming a missing image file as plain text, fails inside
torchvision with a message naming no file for a missing or corrupt image in a dict, and rejects ``None`` without
saying which input it was. :func:`check_inputs` turns each of those into an error naming the input's index, and
decodes every image once to EXIF-oriented 8-bit RGB (see :func:`~st_viomni.formatting.load_image`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from PIL import Image

from .formatting import image_size, load_image

# The extensions sentence-transformers recognises as image paths (base/modality.py, is_image_url_or_path).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tiff", ".webp")

# The keys of a multimodal dict input that sentence-transformers knows (base/modality_types.py).
_MODALITY_KEYS = frozenset({"text", "image", "audio", "video"})

_encode_call = threading.local()


def check_inputs(inputs: list[Any], offset: int = 0, *, decode: bool = True) -> list[Any]:
    """Return ``inputs`` with every image decoded to RGB, or raise an error naming the first bad input.

    Accepted forms, as in sentence-transformers: a string, a PIL image, an image path, a dict with ``"text"``
    and/or ``"image"`` (one image or a list), and chat messages (a list of ``{"role", "content"}`` dicts).

    Args:
        inputs: The batch.
        offset: Index of ``inputs[0]`` in the caller's list, so that errors name the caller's index. An input
            that ``encode`` passes on inside :func:`caller_indices` is named by its index there instead.
        decode: False: check each image from its header only (the file exists and opens, Pillow's pixel
            limit, the size Qwen2-VL takes) and return ``inputs`` unchanged. Corrupt data behind a valid
            header is then found only when the image is decoded.

    Raises:
        ValueError: ``None``, an unsupported type, a dict with no text and no image or with unknown keys, or
            an image that cannot be decoded or that Qwen2-VL cannot take; the message starts with
            ``input <index>``.
        FileNotFoundError: A string that names an image file which does not exist (pass ``{"text": ...}`` to
            embed such a string as text).
    """
    load = load_image if decode else _check_image
    checked = [_check_input(value, name, load) for value, name in zip(inputs, input_names(inputs, offset))]
    return checked if decode else list(inputs)


@contextmanager
def caller_indices(values: Sequence[Any], indices: Sequence[int]) -> Iterator[None]:
    """Within the block, in this thread, errors about any of ``values`` (these very objects) name it
    ``input <its index>`` from ``indices``. Stock ``encode`` sorts its inputs into batches before
    ``preprocess`` sees them: this is how ``preprocess`` still names the caller's index."""
    previous = getattr(_encode_call, "indices", None)
    known: dict[int, int] = {}
    for value, index in zip(values, indices):
        # By identity: values stay alive through the block, so no other object can share an id; the same
        # object twice gets its first index.
        known.setdefault(id(value), index)
    _encode_call.indices = known
    try:
        yield
    finally:
        _encode_call.indices = previous


def input_names(inputs: Sequence[Any], offset: int = 0) -> list[str]:
    """``"input <index>"`` for each input: its index in the caller's list (see :func:`caller_indices`) where
    known, else ``offset`` plus its position in ``inputs``."""
    known = getattr(_encode_call, "indices", None) or {}
    return [f"input {known.get(id(value), offset + position)}" for position, value in enumerate(inputs)]


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
    return f"text {shown!r} and {images} image(s)"


def is_image_url(value: str) -> bool:
    """Whether sentence-transformers loads this string as an image from a URL or a data URI
    (``is_image_url_or_path`` in its base/modality.py): a ``data:image/`` URI, or an http(s) URL without
    spaces whose path ends with an image extension. st-viomni leaves these to sentence-transformers."""
    if value.startswith("data:image/"):
        return True
    if not _looks_like_url(value):
        return False
    try:
        return urlparse(value).path.lower().endswith(IMAGE_EXTENSIONS)
    except ValueError:  # a malformed URL, e.g. "https://[[x"
        return False


def is_image_path(value: str) -> bool:
    """Whether a string names a local image file, which :func:`check_inputs` decodes with
    :func:`~st_viomni.formatting.load_image` after requiring it to exist.

    sentence-transformers loads a string that is neither a URL nor a data URI as an image when it ends with
    an image extension and names an existing file, spaces or not (``is_image_url_or_path``): every such
    string is an image path here too. So that a typo is an error rather than embedded as text, so is a
    string with an image extension, no space and no URL scheme that names no file. Any other string is text,
    as in sentence-transformers.
    """
    if value.startswith("data:image/") or _looks_like_url(value) or not value.lower().endswith(IMAGE_EXTENSIONS):
        return False
    return os.path.isfile(value) or (" " not in value.strip() and not value.startswith("data:"))


def _looks_like_url(value: str) -> bool:
    # sentence-transformers' rule (base/modality.py, _looks_like_url).
    return value.startswith(("http://", "https://")) and " " not in value


def _check_image(image: Any, name: str) -> Any:
    image_size(image, name=name)  # raises what load_image would raise before decoding
    return image


def is_conversation(value: Any) -> bool:
    """Whether ``value`` is one chat conversation (a non-empty list of ``{"role", ...}`` messages)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _check_input(value: Any, name: str, load: Callable[..., Any]) -> Any:
    if value is None:
        raise ValueError(f"{name} is None; expected text, an image, a {{'text', 'image'}} dict or chat messages")
    if isinstance(value, str):
        if is_image_path(value):
            if not os.path.isfile(value):
                raise FileNotFoundError(
                    f"{name} names an image file that does not exist: {value!r} "
                    "(to embed this string as text, pass {'text': ...})"
                )
            return load(value, name=name)
        return value
    if isinstance(value, Image.Image):
        return load(value, name=name)
    if isinstance(value, dict):
        if "role" in value and "content" in value:
            return _check_messages([value], name, load)[0]
        return _check_modality_dict(value, name, load)
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, dict) and "role" in item for item in value):
        return _check_messages(list(value), name, load)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(part, str) for part in value):
        return value  # a text pair, for cross-encoder-style inputs
    # Audio arrays, video frames and other modalities pass through to sentence-transformers unchanged.
    if type(value).__module__.split(".")[0] in ("numpy", "torch"):
        return value
    raise ValueError(f"{name} has unsupported type {type(value).__name__}")


def _check_modality_dict(value: dict, name: str, load: Callable[..., Any]) -> dict:
    if "array" in value:
        return value  # audio or video ({"array", "sampling_rate"/"video_metadata"}): sentence-transformers checks it
    unknown = value.keys() - _MODALITY_KEYS
    if unknown:
        # sentence-transformers rejects these too, naming no input; a datasets.Image() value is not an input.
        hint = " (an image stored as {'bytes', 'path'} goes under 'image')" if unknown <= {"bytes", "path"} else ""
        raise ValueError(f"{name} has unknown key(s) {sorted(unknown, key=str)}; expected 'text' and/or 'image'{hint}")
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
            checked["image"] = [load(image, name=f"{name}['image'][{i}]") for i, image in enumerate(images)]
        else:
            checked["image"] = load(images, name=f"{name}['image']")
    return checked


def _check_messages(messages: list[dict], name: str, load: Callable[..., Any]) -> list[dict]:
    checked = []
    for turn, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            items = []
            for position, item in enumerate(content):
                if isinstance(item, dict) and item.get("type") == "image" and "image" in item:
                    where = f"{name} message {turn} content[{position}]"
                    item = {**item, "image": load(item["image"], name=where)}
                items.append(item)
            message = {**message, "content": items}
        elif content is None:
            raise ValueError(f"{name} message {turn} has no content")
        checked.append(message)
    return checked
