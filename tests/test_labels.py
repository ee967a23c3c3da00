"""make_label / decode_labels: how a row's task, score and positive identity reach PrefixRoutedLoss."""

from __future__ import annotations

import io
import math

import pytest
import torch
from PIL import Image

from st_viomni.losses import decode_labels, make_label
from st_viomni.tasks import TASK_NAMES


def red_square(size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), (255, 0, 0))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_label_layout_is_task_index_score_and_two_key_halves():
    label = make_label("text_pair", 0.75, "A cat rests on a rug.")
    assert len(label) == 4
    assert label[0] == TASK_NAMES.index("text_pair") and label[1] == 0.75
    assert all(float(half).is_integer() and 0 <= half < 2**24 for half in label[2:])
    ocr = make_label("ocr", None, "đỏ")
    assert ocr[0] == TASK_NAMES.index("ocr") and math.isnan(ocr[1])


def test_labels_survive_the_collator_float32_tensor():
    # sentence-transformers' collator calls torch.tensor on the rows' label lists: float32.
    rows = [
        make_label("text_pair", 0.3, "một câu"),
        make_label("vqa_multi", None, "2", [red_square()]),
        make_label("instr", None, "hello"),
    ]
    labels = torch.tensor(rows)
    assert labels.dtype == torch.float32
    tasks, scores, keys = decode_labels(labels)
    assert tasks == ["text_pair", "vqa_multi", "instr"]
    assert scores[0].item() == pytest.approx(0.3) and scores[1:].isnan().all()
    assert keys == [(int(row[2]) << 24) | int(row[3]) for row in rows]
    assert len(set(keys)) == 3


def test_identical_positives_get_equal_keys():
    image_key = make_label("vqa_single", None, "đỏ", [red_square()])[2:]
    assert make_label("vqa_multi", None, "đỏ", [red_square()])[2:] == image_key  # the task is not part of it
    assert make_label("ocr", None, "đỏ")[2:] == make_label("vqa_single", None, "đỏ")[2:]
    # The same encoded file, as bytes or as a datasets.Image() dict, keys alike.
    assert make_label("ocr", None, "x", [png_bytes(red_square())])[2:] == make_label(
        "ocr", None, "x", [{"bytes": png_bytes(red_square()), "path": None}]
    )[2:]


def test_different_positives_get_different_keys():
    base = make_label("ocr", None, "đỏ")[2:]
    assert make_label("ocr", None, "do")[2:] != base
    assert make_label("ocr", None, "đỏ", [red_square()])[2:] != base
    assert make_label("ocr", None, "đỏ", [red_square(9)])[2:] != make_label("ocr", None, "đỏ", [red_square()])[2:]


@pytest.mark.parametrize(
    ("task", "score", "message"),
    [
        ("caption", None, "Unknown task 'caption'"),
        ("text_pair", None, "needs a score"),
        ("text_pair", float("nan"), "needs a score"),
        ("text_pair", 1.01, "needs a score"),
        ("instr", 0.5, "takes no score"),
    ],
)
def test_make_label_rejects_bad_rows(task, score, message):
    with pytest.raises(ValueError, match=message):
        make_label(task, score, "answer")


def test_decode_labels_rejects_other_label_shapes_and_unknown_task_indices():
    with pytest.raises(ValueError, match="make_label"):
        decode_labels(torch.tensor([0.5, 0.2]))
    with pytest.raises(ValueError, match="make_label"):
        decode_labels(None)
    with pytest.raises(ValueError, match="row 1: label names no known task"):
        decode_labels(torch.tensor([make_label("instr"), [9.0, float("nan"), 0.0, 0.0]]))


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ([math.nan, math.nan, 0.0, 0.0], r"row 1: label names no known task \(task index nan\)"),
        ([math.inf, math.nan, 0.0, 0.0], r"row 1: label names no known task \(task index inf\)"),
        ([-math.inf, math.nan, 0.0, 0.0], r"row 1: label names no known task \(task index -inf\)"),
        ([1.5, math.nan, 0.0, 0.0], r"row 1: label names no known task \(task index 1.5\)"),
        ([1.0, math.nan, math.nan, 0.0], r"row 1: label's positive key halves must be whole numbers in \[0, 2\*\*24\)"),
        ([1.0, math.nan, 0.0, math.inf], r"row 1: label's positive key halves .* got \[0.0, inf\]"),
        ([1.0, math.nan, -5.0, 3.0], r"row 1: label's positive key halves .* got \[-5.0, 3.0\]"),
        ([1.0, math.nan, 0.5, 3.0], r"row 1: label's positive key halves .* got \[0.5, 3.0\]"),
        ([1.0, math.nan, 2.0**24, 3.0], r"row 1: label's positive key halves .* got \[16777216.0, 3.0\]"),
    ],
)
def test_decode_labels_rejects_non_finite_or_out_of_range_values_naming_the_row(bad_row, message):
    # A corrupted label must fail with the row, not with int()'s "cannot convert float NaN to integer".
    labels = torch.tensor([make_label("instr", None, "hello"), bad_row])  # float32, as collated
    with pytest.raises(ValueError, match=message):
        decode_labels(labels)
