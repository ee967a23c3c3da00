"""The canonical training sample and the checks every sample passes.

Every adapter in :mod:`st_viomni.data` turns a user's rows into the same six fields, whatever the task:

=================== ============================ ==============================================================
field               feature                      meaning
=================== ============================ ==============================================================
``task``            ``Value("string")``          a task name from :data:`st_viomni.tasks.TASK_NAMES`
``anchor``          ``Value("string")``          the anchor's text without task prefix, or None (image-only)
``anchor_images``   ``List(Image())``            the anchor's images, possibly none
``positive``        ``Value("string")``          the positive's text without task prefix, or None
``positive_images`` ``List(Image())``            the positive's images, possibly none
``score``           ``Value("float64")``         gold similarity in [0, 1] for ``text_pair``, else None
=================== ============================ ==============================================================

Image fields are ``datasets.Image()`` features (``List(Image())`` is what ``Sequence(Image())`` means in
``datasets`` 4+), so an image may be stored as a path or as encoded bytes and is decoded to a PIL image only
when a row is read.

:func:`check_sample` holds the rules a canonical sample must satisfy; adapters apply the same rules to their
source rows and name the source column when a rule fails. A failed rule raises :class:`RowProblem` with one of
the :data:`REASONS`.

Example:
    ::

        from datasets import Dataset
        from st_viomni.data import CANONICAL_FEATURES

        samples = Dataset.from_list(
            [{"task": "vqa_single", "anchor": "What colour is the circle?", "anchor_images": ["scene.png"],
              "positive": "The circle is red.", "positive_images": [], "score": None}],
            features=CANONICAL_FEATURES,
        )
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from datasets import Features, Image, List, Value
from PIL import Image as PILImage

from ..formatting import load_image
from ..tasks import PREFIXES, TASKS

CANONICAL_FEATURES = Features(
    {
        "task": Value("string"),
        "anchor": Value("string"),
        "anchor_images": List(Image()),
        "positive": Value("string"),
        "positive_images": List(Image()),
        "score": Value("float64"),
    }
)
CANONICAL_COLUMNS: tuple[str, ...] = tuple(CANONICAL_FEATURES)

# Tasks whose anchor is about images: a sample of these without an anchor image is a bad row.
IMAGE_TASKS: frozenset[str] = frozenset({"ocr", "vqa_single", "vqa_multi"})

MISSING_VALUE = "missing_value"
EMPTY_TEXT = "empty_text"
WRONG_TYPE = "wrong_type"
PREFIXED_TEXT = "prefixed_text"
NO_IMAGE = "no_image"
MISSING_IMAGE_FILE = "missing_image_file"
UNREADABLE_IMAGE = "unreadable_image"
BAD_SCORE = "bad_score"
SCORE_OUT_OF_RANGE = "score_out_of_range"
UNEXPECTED_SCORE = "unexpected_score"
UNKNOWN_TASK = "unknown_task"
BAD_CONVERSATION = "bad_conversation"
BAD_SAMPLE = "bad_sample"

REASONS: dict[str, str] = {
    MISSING_VALUE: "a required field is missing (None or absent)",
    EMPTY_TEXT: "a text field is empty or only whitespace",
    WRONG_TYPE: "a field has the wrong type (e.g. a number where text is expected)",
    PREFIXED_TEXT: "a text already starts with a task prefix (prefixes are added by format_input)",
    NO_IMAGE: "an image task's anchor has no image",
    MISSING_IMAGE_FILE: "an image path names no file",
    UNREADABLE_IMAGE: "an image cannot be decoded",
    BAD_SCORE: "a score is not a number (or is NaN)",
    SCORE_OUT_OF_RANGE: "a score lies outside its declared range",
    UNEXPECTED_SCORE: "a score is given for a task other than text_pair",
    UNKNOWN_TASK: "the task is not one of st_viomni.tasks.TASK_NAMES",
    BAD_CONVERSATION: "a conversation is malformed (roles out of order, unanswered question, no turns)",
    BAD_SAMPLE: "a canonical sample cannot be rendered (e.g. an input with neither text nor image)",
}
"""Every reason a row can be rejected for, with what it means."""


class RowProblem(ValueError):
    """One rule a row breaks: the ``column`` it concerns, the ``reason`` (a key of :data:`REASONS`) and a
    human-readable ``detail``. ``row`` is filled in by whoever knows the row's index."""

    def __init__(self, column: str, reason: str, detail: str, row: int | None = None):
        self.row = row
        self.column = column
        self.reason = reason
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"row {self.row}, " if self.row is not None else ""
        return f"{where}column {self.column!r}: {self.reason}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "column": self.column, "reason": self.reason, "detail": self.detail}


def check_text(value: Any, column: str, *, required: bool = True) -> str | None:
    """Return ``value`` if it is a usable text; None if it is None and not ``required``.

    Raises:
        RowProblem: missing (when required), not a string, empty/whitespace, or already task-prefixed.
    """
    if value is None:
        if required:
            raise RowProblem(column, MISSING_VALUE, "no value")
        return None
    if not isinstance(value, str):
        raise RowProblem(column, WRONG_TYPE, f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem(column, EMPTY_TEXT, f"text is empty ({value!r})")
    if value.lstrip().startswith(tuple(PREFIXES.values())):
        raise RowProblem(column, PREFIXED_TEXT, f"text starts with a task prefix: {value[:40]!r}")
    return value


def check_score(value: Any, column: str, score_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Return ``value`` rescaled linearly from ``score_range`` to [0, 1].

    Raises:
        RowProblem: missing, not a number, NaN, or outside ``score_range``.
    """
    if value is None:
        raise RowProblem(column, MISSING_VALUE, "no score")
    if isinstance(value, bool):
        raise RowProblem(column, BAD_SCORE, f"expected a number, got {value!r}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise RowProblem(column, BAD_SCORE, f"expected a number, got {value!r}") from None
    if math.isnan(score):
        raise RowProblem(column, BAD_SCORE, "score is NaN")
    low, high = score_range
    if not low <= score <= high:
        raise RowProblem(column, SCORE_OUT_OF_RANGE, f"{score:g} is outside [{low:g}, {high:g}]")
    return (score - low) / (high - low)


def check_images(
    value: Any,
    column: str,
    *,
    image_root: str | os.PathLike | None = None,
    verify: bool = True,
) -> list[Any]:
    """Normalise one field's images to a list of storable images and check each can be read.

    Accepts None (no images), one image or a list of images, where an image is a path (resolved against
    ``image_root`` when relative), encoded bytes, a ``{"bytes", "path"}`` dict (what ``datasets.Image``
    stores) or a PIL image.

    Args:
        value: The field's value.
        column: Column name for error messages.
        image_root: Directory that relative paths are relative to (e.g. the folder of a JSON file).
        verify: Decode every image with :func:`st_viomni.formatting.load_image` to prove it is readable
            (and that Qwen2-VL takes it: see :func:`decode_image`). Off, only the existence of paths is
            checked (faster on huge streams); a bad image is then found when
            :func:`~st_viomni.data.build_training_dataset` renders its sample, during training.

    Returns:
        The images as ``{"bytes", "path"}`` dicts (paths resolved) or PIL images, ready for ``List(Image())``.

    Raises:
        RowProblem: an entry is None, a path names no file, an image cannot be decoded, or of unknown type.
    """
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray, os.PathLike, PILImage.Image, Mapping)):
        value = [value]
    if not isinstance(value, Sequence):
        raise RowProblem(column, WRONG_TYPE, f"expected an image or a list of images, got {type(value).__name__}")
    images = []
    for index, image in enumerate(value):
        name = f"{column}[{index}]"
        storable = _storable_image(image, name, image_root)
        if verify:
            decode_image(storable, name)
        elif isinstance(storable, dict) and storable["bytes"] is None and not os.path.isfile(storable["path"]):
            # Without decoding, a path is still checked for existence: a cheap stat that catches typos.
            raise RowProblem(name, MISSING_IMAGE_FILE, f"image file not found: {storable['path']!r}")
        images.append(storable)
    return images


def _storable_image(image: Any, name: str, image_root: str | os.PathLike | None) -> Any:
    if image is None:
        raise RowProblem(name, MISSING_VALUE, "image is None")
    if isinstance(image, PILImage.Image):
        return image
    if isinstance(image, Mapping):
        data, path = image.get("bytes"), image.get("path")
        if data is None and not path:
            raise RowProblem(name, MISSING_VALUE, "image dict has neither 'bytes' nor 'path'")
        if data is not None:
            return {"bytes": bytes(data), "path": path}
        return {"bytes": None, "path": _resolve(path, image_root)}
    if isinstance(image, (bytes, bytearray)):
        if not image:
            raise RowProblem(name, UNREADABLE_IMAGE, "image bytes are empty")
        return {"bytes": bytes(image), "path": None}
    if isinstance(image, (str, os.PathLike)):
        if not os.fspath(image):
            raise RowProblem(name, MISSING_VALUE, "image path is empty")
        return {"bytes": None, "path": _resolve(image, image_root)}
    expected = "a path, bytes, a {'bytes', 'path'} dict or a PIL image"
    raise RowProblem(name, WRONG_TYPE, f"expected {expected}, got {type(image).__name__}")


def _resolve(path: str | os.PathLike, image_root: str | os.PathLike | None) -> str:
    path = os.path.expanduser(os.fspath(path))
    if image_root is not None and not os.path.isabs(path):
        path = os.path.join(os.fspath(image_root), path)
    return path


def decode_image(image: Any, name: str) -> PILImage.Image:
    """Decode one image with :func:`st_viomni.formatting.load_image` (which also refuses images over Pillow's
    pixel limit and images Qwen2-VL cannot take, such as an aspect ratio above 200).

    Raises:
        RowProblem: ``missing_image_file`` or ``unreadable_image`` on column ``name``; the detail names the
            file (or, for encoded bytes, their size and the path stored with them).
    """
    try:
        return load_image(image, name=name)
    except FileNotFoundError as error:
        raise RowProblem(name, MISSING_IMAGE_FILE, str(error).removeprefix(f"{name}: ")) from None
    except ValueError as error:
        detail = str(error).removeprefix(f"{name}: ")
        if isinstance(image, Mapping) and image.get("bytes") is not None and image.get("path"):
            detail += f" (stored with path {image['path']!r})"
        raise RowProblem(name, UNREADABLE_IMAGE, detail) from None


def make_sample(
    task: str,
    anchor: str | None,
    anchor_images: list[Any],
    positive: str | None,
    positive_images: list[Any] = (),
    score: float | None = None,
) -> dict[str, Any]:
    """A canonical sample dict (no checks; see :func:`check_sample`)."""
    return {
        "task": task,
        "anchor": anchor,
        "anchor_images": list(anchor_images),
        "positive": positive,
        "positive_images": list(positive_images),
        "score": score,
    }


def check_sample(
    sample: Mapping[str, Any],
    *,
    columns: Mapping[str, str] | None = None,
    image_root: str | os.PathLike | None = None,
    verify_images: bool = True,
) -> dict[str, Any]:
    """Check one canonical sample and return it with its images normalised (see :func:`check_images`).

    Rules: the task is known; ``text_pair`` has a score in [0, 1] and other tasks none; ``text_pair`` and
    ``instr`` have anchor and positive texts; image tasks (``ocr``, ``vqa_single``, ``vqa_multi``) have at
    least one anchor image; anchor and positive each have text or images; texts are non-empty strings without
    a task prefix; images exist and decode.

    Args:
        sample: A dict with the canonical fields.
        columns: How to name each canonical field in an error (adapters pass their source column names).
        image_root: Directory that relative image paths are relative to.
        verify_images: Decode every image (see :func:`check_images`).

    Raises:
        RowProblem: The first rule the sample breaks.
    """
    columns = {**{name: name for name in CANONICAL_COLUMNS}, **(columns or {})}
    task = sample.get("task")
    if task not in TASKS:
        raise RowProblem(columns["task"], UNKNOWN_TASK, f"{task!r} is not one of {', '.join(TASKS)}")
    text_only = task not in IMAGE_TASKS
    anchor = check_text(sample.get("anchor"), columns["anchor"], required=text_only)
    anchor_images = check_images(
        sample.get("anchor_images"), columns["anchor_images"], image_root=image_root, verify=verify_images
    )
    if not text_only and not anchor_images:
        raise RowProblem(columns["anchor_images"], NO_IMAGE, f"{task!r} anchors need at least one image")
    positive_images = check_images(
        sample.get("positive_images"), columns["positive_images"], image_root=image_root, verify=verify_images
    )
    positive = check_text(sample.get("positive"), columns["positive"], required=text_only or not positive_images)
    score = sample.get("score")
    if TASKS[task].loss == "scored":
        score = check_score(score, columns["score"])
    elif score is not None and not (isinstance(score, float) and math.isnan(score)):
        raise RowProblem(columns["score"], UNEXPECTED_SCORE, f"task {task!r} takes no score, got {score!r}")
    else:
        score = None
    return make_sample(task, anchor, anchor_images, positive, positive_images, score)
