"""How each training row tells :class:`PrefixRoutedLoss` its task, gold score and positive identity.

sentence-transformers' data collator turns exactly one column named ``label``/``labels``/``score``/``scores``
into the batch label (a list per row becomes a 2-D float tensor) and feeds every other column to the model.
A string ``task`` column would therefore be tokenized as a third input (and MNRL-style losses would take it
for hard negatives). So every row carries one ``label`` column, built by :func:`make_label`:

    label = [task_index, score, positive_key_high, positive_key_low]

* ``task_index``: position of the task in :data:`st_viomni.tasks.TASK_NAMES`;
* ``score``: the gold score in [0, 1] for ``text_pair``, NaN for the other tasks;
* ``positive_key_*``: a 48-bit content hash of the positive (its text and images), split in two 24-bit halves
  because the collator builds a float32 tensor, which holds integers exactly only up to 2**24. Rows whose
  positives have equal keys have identical positives and are never used as each other's negatives.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from st_viomni.tasks import TASK_NAMES, get_task

LABEL_WIDTH = 4
_HALF_BITS = 24


def make_label(
    task: str,
    score: float | None = None,
    positive_text: str | None = None,
    positive_images: Sequence[Any] = (),
) -> list[float]:
    """Encode one training row's task, score and positive identity as the ``label`` column value.

    :class:`~st_viomni.losses.PrefixRoutedLoss` routes the row by this task alone, never by the task prefix of its
    text: pass the task the row's inputs were formatted with (``format_input(task, ...)``), as st-viomni's data
    adapters do. A label naming another task than the prefix trains the row, without an error, with the wrong loss.

    Args:
        task: Task name from :mod:`st_viomni.tasks`.
        score: Gold similarity in [0, 1]; required for ``text_pair``, must be None for the other tasks.
        positive_text: The positive's text (without task prefix), used for the identity key.
        positive_images: The positive's images, used for the identity key: PIL images are keyed by their
            pixels, encoded bytes by their bytes, paths by the path string.

    Returns:
        ``[task_index, score or NaN, key_high, key_low]`` (see the module docstring).

    Raises:
        ValueError: Unknown task, missing/NaN/out-of-range score for ``text_pair``, or a score for another task.
    """
    spec = get_task(task)
    if spec.loss == "scored":
        if score is None:
            raise ValueError(f"task {task!r} needs a score in [0, 1], got None")
        score = float(score)
        if math.isnan(score) or not 0.0 <= score <= 1.0:
            raise ValueError(f"task {task!r} needs a score in [0, 1], got {score}")
    elif score is not None and not (isinstance(score, float) and math.isnan(score)):
        raise ValueError(f"task {task!r} takes no score (only text_pair does), got {score}")
    else:
        score = math.nan
    key = positive_key(positive_text, positive_images)
    return [float(TASK_NAMES.index(task)), score, float(key >> _HALF_BITS), float(key & ((1 << _HALF_BITS) - 1))]


def positive_key(text: str | None, images: Sequence[Any] = ()) -> int:
    """48-bit content key of a positive: equal keys mean the same text and the same images."""
    digest = hashlib.blake2b(digest_size=6)
    digest.update(b"T" + (text or "").encode("utf-8") + b"\0")
    for image in images:
        digest.update(b"I" + _image_identity(image) + b"\0")
    return int.from_bytes(digest.digest(), "big")


def _image_identity(image: Any) -> bytes:
    if isinstance(image, dict):
        image = image.get("bytes") if image.get("bytes") is not None else image.get("path")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.blake2b(bytes(image), digest_size=16).digest()
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image).encode("utf-8")
    if hasattr(image, "tobytes") and hasattr(image, "size") and hasattr(image, "mode"):
        header = f"{image.mode}{image.size}".encode()
        return hashlib.blake2b(header + image.tobytes(), digest_size=16).digest()
    raise ValueError(f"cannot key a positive image of type {type(image).__name__}")


def decode_labels(labels: torch.Tensor) -> tuple[list[str], torch.Tensor, list[int]]:
    """Split a collated ``(batch, 4)`` label tensor into task names, scores (NaN where none) and positive keys.

    Raises:
        ValueError: The tensor is not ``(batch, 4)``, a row's task index is not the whole number of a known task
            (NaN and infinities included), or a row's key halves are not whole numbers in ``[0, 2**24)``; the
            message names the row.
    """
    if labels is None or labels.dim() != 2 or labels.shape[1] != LABEL_WIDTH:
        shape = None if labels is None else tuple(labels.shape)
        raise ValueError(
            f"PrefixRoutedLoss expects a 'label' column of {LABEL_WIDTH} floats per row built by "
            f"st_viomni.losses.make_label; got labels of shape {shape}"
        )
    task_indices = labels[:, 0].tolist()
    tasks = []
    for row, index in enumerate(task_indices):
        if not _is_whole_in_range(index, len(TASK_NAMES)):
            raise ValueError(f"row {row}: label names no known task (task index {index})")
        tasks.append(TASK_NAMES[int(index)])
    keys = []
    for row, halves in enumerate(labels[:, 2:].tolist()):
        if not all(_is_whole_in_range(half, 1 << _HALF_BITS) for half in halves):
            raise ValueError(
                f"row {row}: label's positive key halves must be whole numbers in [0, 2**{_HALF_BITS}) "
                f"(st_viomni.losses.make_label), got {halves}"
            )
        high, low = halves
        keys.append((int(high) << _HALF_BITS) | int(low))
    return tasks, labels[:, 1].float(), keys


def _is_whole_in_range(value: float, stop: int) -> bool:
    # The finiteness check comes first: int() of NaN or an infinity raises a message that names no row.
    return math.isfinite(value) and value == int(value) and 0 <= value < stop
