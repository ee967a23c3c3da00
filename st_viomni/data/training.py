"""From canonical samples to the dataset the sentence-transformers trainer and ``PrefixRoutedLoss`` expect.

A trainer row has three columns, in this order:

* ``anchor``: ``format_input(task, anchor, anchor_images)``: a string ``"<prefix> text"`` for text-only
  input, else ``{"image": [PIL images], "text": "<prefix> text"}``: exactly what inference renders;
* ``positive``: ``format_input(task, positive, positive_images)``;
* ``label``: ``make_label(task, score, positive, positive_images)``: ``[task index, score or NaN, positive
  key high, positive key low]`` (see :mod:`st_viomni.losses.labels`).

sentence-transformers' collator takes ``label`` as the batch label and feeds ``anchor`` and ``positive`` to
``model.preprocess``, which accepts strings and image dicts in the same column.

Rendering happens when a row is read, never ahead: a ``Dataset`` gets a ``with_transform`` (its stored
columns stay the canonical ones, images stay encoded until a batch is drawn), an ``IterableDataset`` a lazy
``map``. Nothing is materialised here: a stream holds what its sources hold (the shuffle buffer of each
source from :func:`~st_viomni.data.sources.load_samples_by_task`) plus the batch being rendered.

Images are decoded while a sample is rendered, not by the ``datasets.Image`` feature beforehand, so that an
image that fails to decode (one the adapters did not decode, with ``verify_images=False``) is a bad sample
like any other: an :class:`~st_viomni.data.InvalidRowError` naming the file, or, in skip mode, a sample left
out and counted in the report.

Training on a streamed dataset needs ``accelerator_config={"dispatch_batches": False}`` in the training
arguments: for an ``IterableDataset`` accelerate by default builds each batch in the main process and slices
every tensor to the batch size along its first dimension, which truncates Qwen2-VL's ``pixel_values`` (one row
per image patch, not per sample) and fails in the vision tower.

Example:
    ::

        from sentence_transformers import SentenceTransformerTrainer
        from st_viomni.data import build_training_dataset, mini_mixture

        train_dataset = build_training_dataset(mini_mixture(200, split="train"))
        train_dataset[0]
        # {'anchor': '<instr> How many legs does a cat have?', 'positive': '<instr> A cat has four legs.',
        #  'label': [1.0, nan, 5325631.0, 9037145.0]}
        train_dataset[1]["anchor"]
        # {'image': [<PIL.Image ... 112x112>, <PIL.Image ... 112x112>],
        #  'text': '<vqa_multi> Q: Ảnh nào có hình tròn màu tím?'}
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import Any

import numpy as np
from datasets import Dataset, Features, Image, IterableDataset, Json, List, Value

from ..formatting import format_input
from ..losses.labels import make_label
from ..tasks import TASKS
from .schema import (
    BAD_SAMPLE,
    BAD_SCORE,
    CANONICAL_COLUMNS,
    UNEXPECTED_SCORE,
    UNKNOWN_TASK,
    RowProblem,
    check_score,
    decode_image,
)
from .validation import InvalidRowError, OnError, ValidationReport

TRAINING_COLUMNS: tuple[str, ...] = ("anchor", "positive", "label")

# Declared types of a streamed trainer dataset. The trainer needs declared columns; anchor/positive values are
# a string or an {"image": [PIL...], "text": ...} dict, passed through untouched (datasets does not re-encode
# the output of a map that declares its features), and Json() is the honest name for "string or dict".
TRAINING_FEATURES = Features({"anchor": Json(), "positive": Json(), "label": List(Value("float32"))})


def render_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Render one canonical sample as a trainer row ``{"anchor", "positive", "label"}`` (see module doc).

    Images may be PIL images, paths, bytes or ``{"bytes", "path"}`` dicts; each is decoded here.

    Raises:
        RowProblem: an image that names no file or cannot be decoded, on its column (``anchor_images[0]``).
        ValueError: from ``format_input`` (no text and no image, a prefixed text) or ``make_label`` (unknown
            task, bad score).
    """
    task = sample["task"]
    anchor_images = _decoded_images(sample.get("anchor_images"), "anchor_images")
    positive_images = _decoded_images(sample.get("positive_images"), "positive_images")
    score = sample.get("score")
    if score is not None and isinstance(score, float) and math.isnan(score):
        score = None
    return {
        "anchor": format_input(task, sample.get("anchor"), anchor_images),
        "positive": format_input(task, sample.get("positive"), positive_images),
        "label": make_label(task, score, positive_text=sample.get("positive"), positive_images=positive_images),
    }


def _decoded_images(images: list[Any] | None, column: str) -> list[Any]:
    return [decode_image(image, f"{column}[{index}]") for index, image in enumerate(images or [])]


def build_training_dataset(
    samples: Dataset | IterableDataset,
    *,
    on_error: OnError = "raise",
    report: ValidationReport | None = None,
) -> Dataset | IterableDataset:
    """Turn canonical samples (from the adapters, a mixture or :func:`mini_mixture`) into the trainer dataset.

    Samples from the adapters are already validated. As a safety net this function also checks what the
    label needs: for a ``Dataset``, every row's ``task`` and ``score`` up front (cheap: two small columns);
    for an ``IterableDataset``, every sample as it is rendered, naming its position in the stream. A sample
    whose image fails to decode when it is rendered is a bad sample too (see the module docstring); in skip
    mode a ``Dataset``'s batch then comes out one row short, and the report names the image's file but no
    row index (a transform sees a batch, not its indices).

    Args:
        samples: A ``Dataset`` or ``IterableDataset`` with the canonical columns.
        on_error: ``"raise"`` on the first bad sample, or ``"skip"`` it (counted in ``report``).
        report: Collects skipped samples in skip mode.

    Returns:
        A ``Dataset`` (with a transform that renders rows on access) or an ``IterableDataset`` (rendering
        lazily) whose rows are ``{"anchor", "positive", "label"}``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}')
    if report is None:
        report = ValidationReport()
    if not isinstance(samples, (Dataset, IterableDataset)):
        raise TypeError(f"expected a datasets.Dataset or IterableDataset of canonical samples, got {type(samples)}")
    missing = [column for column in CANONICAL_COLUMNS if column not in (samples.column_names or [])]
    if missing:
        raise ValueError(
            f"samples lack the canonical column(s) {missing}; got {samples.column_names}. "
            "Make them with an st_viomni.data adapter (or validate_samples for your own canonical rows)."
        )
    skip = on_error == "skip"
    if isinstance(samples, Dataset):
        samples = _undecoded_images(_checked_dataset(samples, on_error, report))
        return samples.with_transform(partial(_render_batch, skip=skip, report=report))
    return samples.decode(False).map(
        _render_stream_batch,
        fn_kwargs={"skip": skip, "report": report},
        batched=True,
        # One sample per call: a bad one can be dropped, and no batch of decoded images is held here.
        batch_size=1,
        with_indices=True,
        remove_columns=list(CANONICAL_COLUMNS),
        features=TRAINING_FEATURES,
    )


def _undecoded_images(samples: Dataset) -> Dataset:
    # The {"bytes", "path"} values are stored the same whether an image feature decodes or not, so only the
    # features change, on a copy that shares the Arrow data (what Dataset.cast_column does for an Image()
    # column; for a List(Image()) column it would rewrite every row). Nothing is written or cached from it.
    undecoded = copy.deepcopy(samples)
    undecoded.info.features = Features(
        {
            name: List(Image(decode=False), length=feature.length)
            if isinstance(feature, List) and isinstance(feature.feature, Image)
            else feature
            for name, feature in samples.features.items()
        }
    )
    return undecoded


def _render_batch(batch: dict[str, list[Any]], *, skip: bool, report: ValidationReport) -> dict[str, list[Any]]:
    # Bad task/score rows were dropped up front; what can fail here is an image or an input with nothing in it.
    output: dict[str, list[Any]] = {column: [] for column in TRAINING_COLUMNS}
    columns = list(batch)
    for values in zip(*(batch[column] for column in columns)):
        row = _rendered_or_recorded(dict(zip(columns, values)), None, skip, report)
        if row is not None:
            for column in TRAINING_COLUMNS:
                output[column].append(row[column])
    return output


def _render_stream_batch(
    batch: dict[str, list[Any]], indices: list[int], *, skip: bool, report: ValidationReport
) -> dict[str, list[Any]]:
    output: dict[str, list[Any]] = {column: [] for column in TRAINING_COLUMNS}
    columns = list(batch)
    for index, values in zip(indices, zip(*(batch[column] for column in columns))):
        report.rows_seen += 1
        row = _rendered_or_recorded(dict(zip(columns, values)), index, skip, report)
        if row is not None:
            for column in TRAINING_COLUMNS:
                output[column].append(row[column])
    return output


def _rendered_or_recorded(
    sample: dict[str, Any], index: int | None, skip: bool, report: ValidationReport
) -> dict[str, Any] | None:
    """The trainer row of ``sample``; for a bad sample, an InvalidRowError, or in skip mode None (recorded)."""
    try:
        _check_label_fields(sample.get("task"), sample.get("score"))
        return render_sample(sample)
    except RowProblem as error:
        problem = error
        problem.row = index
    except ValueError as error:
        problem = RowProblem("sample", _reason_of(error), str(error), row=index)
    if not skip:
        raise InvalidRowError(problem, "build_training_dataset") from None
    report.record(problem, "build_training_dataset")
    return None


def _reason_of(error: ValueError) -> str:
    # format_input and make_label raise plain ValueErrors; their messages say which rule failed.
    message = str(error)
    if "Unknown task" in message:
        return UNKNOWN_TASK
    if "score" in message:
        return BAD_SCORE
    return BAD_SAMPLE


def _checked_dataset(samples: Dataset, on_error: OnError, report: ValidationReport) -> Dataset:
    bad_rows = []
    start = 0
    for batch in samples.select_columns(["task", "score"]).iter(batch_size=10_000):
        for offset, (task, score) in enumerate(zip(batch["task"], batch["score"])):
            try:
                _check_label_fields(task, score)
            except RowProblem as problem:
                problem.row = start + offset
                if on_error == "raise":
                    raise InvalidRowError(problem, "build_training_dataset") from None
                report.record(problem, "build_training_dataset")
                bad_rows.append(problem.row)
        start += len(batch["task"])
    report.rows_seen += len(samples)
    if not bad_rows:
        return samples
    report.log()
    return samples.select(np.setdiff1d(np.arange(len(samples)), np.asarray(bad_rows)))


def _check_label_fields(task: Any, score: Any) -> None:
    if task not in TASKS:
        raise RowProblem("task", UNKNOWN_TASK, f"{task!r} is not one of {', '.join(TASKS)}")
    if TASKS[task].loss == "scored":
        check_score(score, "score")
    elif score is not None and not math.isnan(score):
        raise RowProblem("score", UNEXPECTED_SCORE, f"task {task!r} takes no score, got {score!r}")
