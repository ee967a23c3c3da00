"""Adapters from the seed's four data kinds to canonical samples (see :mod:`st_viomni.data.schema`).

=========================== ================ ===================================================================
adapter                     task             one source row becomes
=========================== ================ ===================================================================
:func:`text_pair_samples`   ``text_pair``    anchor = sentence 1, positive = sentence 2, score rescaled to [0, 1]
:func:`instr_samples`       ``instr``        anchor = instruction (+ input), positive = response
:func:`ocr_samples`         ``ocr``          anchor = images + query (or images alone), positive = answer
:func:`vqa_single_samples`  ``vqa_single``   anchor = images + question, positive = answer
:func:`vqa_multi_samples`   ``vqa_multi``    one sample per turn: anchor = images + earlier turns + question
                                             (rendered by :func:`~st_viomni.data.dialogue.render_dialogue`),
                                             positive = that turn's answer
:func:`validate_samples`    any              a row that already has the canonical fields, checked
=========================== ================ ===================================================================

Every adapter takes the names of the columns to read, works on a ``datasets.Dataset`` (checked eagerly) or a
streaming ``datasets.IterableDataset`` (checked lazily), and validates each row (see
:mod:`st_viomni.data.validation`): missing or empty fields, missing or undecodable images, scores outside
their range, unknown tasks. Image columns may hold one image or a list of images, each a path (relative
paths are resolved against ``image_root``), encoded bytes, a ``datasets.Image`` value or a PIL image.

Example:
    ::

        from datasets import load_dataset
        from st_viomni.data import ValidationReport, text_pair_samples, vqa_single_samples

        sts = load_dataset("mteb/stsbenchmark-sts", split="train")
        pairs = text_pair_samples(sts, score_range=(0, 5))  # STS scores 0-5 -> [0, 1]

        # A JSON-lines file: {"image": "imgs/0001.jpg", "question": "...", "answer": "..."} per line
        vqa = load_dataset("json", data_files="vqa/train.jsonl", split="train", streaming=True)
        report = ValidationReport()
        vqa = vqa_single_samples(vqa, images_column="image", image_root="vqa", on_error="skip", report=report)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any

from datasets import Dataset, IterableDataset

from .dialogue import expand_turns, parse_conversation
from .schema import check_images, check_sample, check_score, check_text, make_sample
from .validation import OnError, ValidationReport, apply_rows

Samples = Dataset | IterableDataset
ImageColumns = str | Sequence[str]


def check_options(
    *,
    score_range: Sequence[float] | None = None,
    max_history_turns: int | None = None,
    images_column: ImageColumns | None = None,
    num_proc: int | None = None,
) -> None:
    """The adapters' rules on the values of their options, which need no data: each adapter applies them to its
    own options before it reads a row, and the recipe loader to a source's options when the recipe is loaded.
    None means "not given" (the adapters' defaults pass).

    Raises:
        ValueError: Starting with the option's name and a colon: ``score_range`` not two numbers with
            high > low, a negative ``max_history_turns``, an ``images_column`` that is neither a name nor a
            non-empty list of names, a ``num_proc`` below 1.
    """
    if score_range is not None and not (len(score_range) == 2 and score_range[1] > score_range[0]):
        raise ValueError(f"score_range: expected (low, high) with high > low, got {score_range!r}")
    if max_history_turns is not None and max_history_turns < 0:
        raise ValueError(f"max_history_turns: expected a number >= 0 (or None: all turns), got {max_history_turns!r}")
    if images_column is not None:
        _as_columns(images_column)
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc: expected a positive number of processes, got {num_proc!r}")


def text_pair_samples(
    dataset: Samples,
    *,
    sentence1_column: str = "sentence1",
    sentence2_column: str = "sentence2",
    score_column: str = "score",
    score_range: tuple[float, float] = (0.0, 1.0),
    on_error: OnError = "raise",
    report: ValidationReport | None = None,
    num_proc: int | None = None,
) -> Samples:
    """Scored text pairs -> ``text_pair`` samples.

    Args:
        dataset: Rows with two texts and a similarity score.
        sentence1_column: Column of the first text (the anchor).
        sentence2_column: Column of the second text (the positive).
        score_column: Column of the score.
        score_range: The range the scores are given on; they are rescaled linearly to [0, 1]
            (``(0, 5)`` for STS benchmarks). A score outside this range is a bad row.
        on_error: ``"raise"`` on the first bad row, or ``"skip"`` bad rows (see ``report``).
        report: Collects counts and examples of skipped rows.
        num_proc: Worker processes for a ``Dataset``.

    Returns:
        Canonical samples, a ``Dataset`` or ``IterableDataset`` like ``dataset``.
    """
    check_options(score_range=score_range, num_proc=num_proc)
    low, high = score_range
    row_to_samples = partial(
        _text_pair_row,
        sentence1_column=sentence1_column,
        sentence2_column=sentence2_column,
        score_column=score_column,
        score_range=(float(low), float(high)),
    )
    return apply_rows(
        dataset,
        row_to_samples,
        source="text_pair_samples",
        required_columns=[sentence1_column, sentence2_column, score_column],
        on_error=on_error,
        report=report,
        num_proc=num_proc,
    )


def _text_pair_row(
    row: dict[str, Any], *, sentence1_column: str, sentence2_column: str, score_column: str, score_range: tuple
) -> list[dict[str, Any]]:
    anchor = check_text(row.get(sentence1_column), sentence1_column)
    positive = check_text(row.get(sentence2_column), sentence2_column)
    score = check_score(row.get(score_column), score_column, score_range)
    return [make_sample("text_pair", anchor, [], positive, [], score)]


def instr_samples(
    dataset: Samples,
    *,
    instruction_column: str = "instruction",
    response_column: str = "response",
    input_column: str | None = None,
    on_error: OnError = "raise",
    report: ValidationReport | None = None,
    num_proc: int | None = None,
) -> Samples:
    """Instruction / response pairs -> ``instr`` samples.

    Args:
        dataset: Rows with an instruction and its response.
        instruction_column: Column of the instruction (the anchor).
        response_column: Column of the response (the positive); ``"output"`` for Alpaca-style data.
        input_column: Optional column of extra input (Alpaca's ``"input"``); when non-empty it is appended to
            the instruction on a new line. Empty or None inputs are fine.
        on_error, report, num_proc: See :func:`text_pair_samples`.
    """
    check_options(num_proc=num_proc)
    row_to_samples = partial(
        _instr_row, instruction_column=instruction_column, response_column=response_column, input_column=input_column
    )
    required = [instruction_column, response_column] + ([input_column] if input_column else [])
    return apply_rows(
        dataset,
        row_to_samples,
        source="instr_samples",
        required_columns=required,
        on_error=on_error,
        report=report,
        num_proc=num_proc,
    )


def _instr_row(
    row: dict[str, Any], *, instruction_column: str, response_column: str, input_column: str | None
) -> list[dict[str, Any]]:
    instruction = check_text(row.get(instruction_column), instruction_column)
    if input_column is not None:
        extra = row.get(input_column)
        if isinstance(extra, str) and extra.strip():
            instruction = f"{instruction}\n{check_text(extra, input_column)}"
        elif extra is not None and not isinstance(extra, str):
            check_text(extra, input_column)  # raises wrong_type
    response = check_text(row.get(response_column), response_column)
    return [make_sample("instr", instruction, [], response)]


def ocr_samples(
    dataset: Samples,
    *,
    images_column: ImageColumns = "images",
    query_column: str | None = "query",
    answer_column: str = "answer",
    image_root: str | os.PathLike | None = None,
    verify_images: bool = True,
    on_error: OnError = "raise",
    report: ValidationReport | None = None,
    num_proc: int | None = None,
) -> Samples:
    """Image(s) + query -> answer rows -> ``ocr`` samples.

    Args:
        dataset: Rows with images of text, a query about them and the answer.
        images_column: Column holding one image or a list of images; or several columns, whose images are
            concatenated in the given order (e.g. ``["page_1", "page_2"]``).
        query_column: Column of the query, or None for image-only anchors (plain transcription data: the
            answer is the text in the image).
        answer_column: Column of the answer (the positive).
        image_root: Directory that relative image paths are relative to (e.g. the folder of the JSON file).
        verify_images: Decode every image while validating (see :func:`~st_viomni.data.schema.check_images`).
        on_error, report, num_proc: See :func:`text_pair_samples`.
    """
    return _image_question_samples(
        dataset,
        task="ocr",
        source="ocr_samples",
        images_column=images_column,
        question_column=query_column,
        answer_column=answer_column,
        image_root=image_root,
        verify_images=verify_images,
        on_error=on_error,
        report=report,
        num_proc=num_proc,
    )


def vqa_single_samples(
    dataset: Samples,
    *,
    images_column: ImageColumns = "images",
    question_column: str = "question",
    answer_column: str = "answer",
    image_root: str | os.PathLike | None = None,
    verify_images: bool = True,
    on_error: OnError = "raise",
    report: ValidationReport | None = None,
    num_proc: int | None = None,
) -> Samples:
    """Image(s) + question -> answer rows -> ``vqa_single`` samples.

    Args:
        dataset: Rows with images, a question about them and the answer.
        images_column: Column holding one image or a list of images, or several such columns.
        question_column: Column of the question.
        answer_column: Column of the answer (the positive).
        image_root, verify_images, on_error, report, num_proc: See :func:`ocr_samples`.
    """
    return _image_question_samples(
        dataset,
        task="vqa_single",
        source="vqa_single_samples",
        images_column=images_column,
        question_column=question_column,
        answer_column=answer_column,
        image_root=image_root,
        verify_images=verify_images,
        on_error=on_error,
        report=report,
        num_proc=num_proc,
    )


def _image_question_samples(
    dataset: Samples,
    *,
    task: str,
    source: str,
    images_column: ImageColumns,
    question_column: str | None,
    answer_column: str,
    image_root: str | os.PathLike | None,
    verify_images: bool,
    on_error: OnError,
    report: ValidationReport | None,
    num_proc: int | None,
) -> Samples:
    check_options(images_column=images_column, num_proc=num_proc)
    images_columns = _as_columns(images_column)
    row_to_samples = partial(
        _image_question_row,
        task=task,
        images_columns=images_columns,
        question_column=question_column,
        answer_column=answer_column,
        image_root=None if image_root is None else os.fspath(image_root),
        verify_images=verify_images,
    )
    required = [*images_columns, answer_column] + ([question_column] if question_column else [])
    return apply_rows(
        dataset,
        row_to_samples,
        source=source,
        required_columns=required,
        on_error=on_error,
        report=report,
        num_proc=num_proc,
    )


def _image_question_row(
    row: dict[str, Any],
    *,
    task: str,
    images_columns: list[str],
    question_column: str | None,
    answer_column: str,
    image_root: str | None,
    verify_images: bool,
) -> list[dict[str, Any]]:
    images = _gather_images(row, images_columns, image_root, verify_images)
    question = check_text(row.get(question_column), question_column) if question_column else None
    answer = check_text(row.get(answer_column), answer_column)
    sample = make_sample(task, question, images, answer)
    # Images are checked above, per source column; here only the task-level rules remain.
    columns = {
        "anchor": question_column or "<none>",
        "anchor_images": "+".join(images_columns),
        "positive": answer_column,
    }
    return [check_sample(sample, columns=columns, verify_images=False)]


def vqa_multi_samples(
    dataset: Samples,
    *,
    images_column: ImageColumns = "images",
    conversation_column: str = "conversations",
    image_placeholder: str | None = "<image>",
    max_history_turns: int | None = None,
    image_root: str | os.PathLike | None = None,
    verify_images: bool = True,
    on_error: OnError = "raise",
    report: ValidationReport | None = None,
    num_proc: int | None = None,
) -> Samples:
    """Multi-turn conversations about image(s) -> one ``vqa_multi`` sample per turn.

    Turn *k* of a conversation becomes a sample whose anchor holds all the conversation's images and the text
    :func:`~st_viomni.data.dialogue.render_dialogue` makes of turns 1..k-1 and question *k*
    (``"Q: q1\\nA: a1\\nQ: q2"``), and whose positive is answer *k*. A conversation with any bad turn is one
    bad row (the whole conversation is skipped in skip mode).

    Args:
        dataset: Rows with images and a conversation about them.
        images_column: Column holding one image or a list of images, or several such columns.
        conversation_column: Column of the conversation: a list of ``{"role", "content"}`` messages,
            ``{"from", "value"}`` messages (LLaVA) or alternating question/answer strings (see
            :func:`~st_viomni.data.dialogue.parse_conversation`).
        image_placeholder: Marker removed from message texts (LLaVA's ``"<image>"``); None keeps texts as is.
        max_history_turns: Keep at most this many earlier turns in an anchor (the latest ones); None keeps all.
        image_root, verify_images, on_error, report, num_proc: See :func:`ocr_samples`.
    """
    check_options(max_history_turns=max_history_turns, images_column=images_column, num_proc=num_proc)
    images_columns = _as_columns(images_column)
    row_to_samples = partial(
        _vqa_multi_row,
        images_columns=images_columns,
        conversation_column=conversation_column,
        image_placeholder=image_placeholder,
        max_history_turns=max_history_turns,
        image_root=None if image_root is None else os.fspath(image_root),
        verify_images=verify_images,
    )
    return apply_rows(
        dataset,
        row_to_samples,
        source="vqa_multi_samples",
        required_columns=[*images_columns, conversation_column],
        on_error=on_error,
        report=report,
        num_proc=num_proc,
    )


def _vqa_multi_row(
    row: dict[str, Any],
    *,
    images_columns: list[str],
    conversation_column: str,
    image_placeholder: str | None,
    max_history_turns: int | None,
    image_root: str | None,
    verify_images: bool,
) -> list[dict[str, Any]]:
    images = _gather_images(row, images_columns, image_root, verify_images)
    turns = parse_conversation(row.get(conversation_column), conversation_column, image_placeholder=image_placeholder)
    columns = {
        "anchor": conversation_column,
        "anchor_images": "+".join(images_columns),
        "positive": conversation_column,
    }
    return [
        check_sample(make_sample("vqa_multi", anchor, images, answer), columns=columns, verify_images=False)
        for anchor, answer in expand_turns(turns, max_history_turns=max_history_turns)
    ]


def validate_samples(
    dataset: Samples,
    *,
    image_root: str | os.PathLike | None = None,
    verify_images: bool = True,
    on_error: OnError = "raise",
    report: ValidationReport | None = None,
    num_proc: int | None = None,
) -> Samples:
    """Check rows that already have the canonical fields (e.g. your own mixed-task data) and normalise them.

    Applies :func:`~st_viomni.data.schema.check_sample` to every row: unknown tasks, missing or empty texts,
    image tasks without images, unreadable images, missing or out-of-range ``text_pair`` scores.

    Args:
        dataset: Rows with ``task``, ``anchor``, ``anchor_images``, ``positive``, ``positive_images`` and
            ``score`` (missing image or score columns count as empty / None).
        image_root, verify_images, on_error, report, num_proc: See :func:`ocr_samples`.
    """
    check_options(num_proc=num_proc)
    row_to_samples = partial(
        _canonical_row, image_root=None if image_root is None else os.fspath(image_root), verify_images=verify_images
    )
    return apply_rows(
        dataset,
        row_to_samples,
        source="validate_samples",
        required_columns=["task", "anchor", "positive"],
        on_error=on_error,
        report=report,
        num_proc=num_proc,
    )


def _canonical_row(row: dict[str, Any], *, image_root: str | None, verify_images: bool) -> list[dict[str, Any]]:
    return [check_sample(row, image_root=image_root, verify_images=verify_images)]


def _as_columns(columns: ImageColumns) -> list[str]:
    if isinstance(columns, str):
        return [columns]
    columns = list(columns)
    if not columns or not all(isinstance(column, str) for column in columns):
        raise ValueError(f"images_column: expected a column name or a non-empty list of names, got {columns!r}")
    return columns


def _gather_images(
    row: dict[str, Any], images_columns: list[str], image_root: str | None, verify_images: bool
) -> list[Any]:
    images = []
    for column in images_columns:
        images.extend(check_images(row.get(column), column, image_root=image_root, verify=verify_images))
    return images
