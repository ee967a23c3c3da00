"""Validation: the first bad row raises naming row, column and reason; skip mode drops bad rows and reports."""

from __future__ import annotations

import logging
import struct
import zlib

import pytest
from datasets import Dataset
from PIL import Image

from st_viomni.data import InvalidRowError, ValidationReport, validate_samples, vqa_multi_samples, vqa_single_samples
from st_viomni.data import text_pair_samples


@pytest.fixture
def vqa_rows(tmp_path):
    """Five VQA rows: good, corrupt image, missing image file, empty question, good."""
    good = tmp_path / "good.png"
    Image.new("RGB", (56, 56), "red").save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:40])  # a truncated PNG
    return Dataset.from_dict(
        {
            "images": [[str(good)], [str(corrupt)], [str(good), str(tmp_path / "gone.png")], [str(good)], [str(good)]],
            "question": ["What colour?", "What colour?", "What colour?", "  ", "Màu gì?"],
            "answer": ["Red.", "Red.", "Red.", "Red.", "Đỏ."],
        }
    )


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        (1, "images[0]", "unreadable_image"),
        (2, "images[1]", "missing_image_file"),
        (3, "question", "empty_text"),
    ],
)
def test_raise_mode_names_row_column_and_reason(vqa_rows, row, column, reason):
    # Keep the good rows and one bad row, so the first bad row is the one under test.
    rows = vqa_rows.select([0, row, 4])

    with pytest.raises(InvalidRowError) as raised:
        vqa_single_samples(rows)

    error = raised.value
    assert (error.row, error.column, error.reason) == (1, column, reason)
    assert f"row 1, column '{column}': {reason}" in str(error)


def test_raise_mode_on_a_stream_raises_while_reading(vqa_rows):
    samples = vqa_single_samples(vqa_rows.to_iterable_dataset())  # lazy: nothing read yet
    with pytest.raises(InvalidRowError, match=r"row 1, column 'images\[0\]': unreadable_image"):
        list(samples)


@pytest.mark.parametrize(
    ("score", "reason"),
    [
        ("5.5", "score_out_of_range"),
        ("-0.1", "score_out_of_range"),
        ("high", "bad_score"),
        ("nan", "bad_score"),
        (None, "missing_value"),
    ],
)
def test_bad_scores_are_rejected(score, reason):
    # Scores as text, as a CSV with one non-numeric score is read; numeric text is accepted.
    rows = Dataset.from_list(
        [{"sentence1": "a", "sentence2": "b", "score": "4.0"}, {"sentence1": "a", "sentence2": "b", "score": score}]
    )
    with pytest.raises(InvalidRowError) as raised:
        text_pair_samples(rows, score_range=(0, 5))
    assert (raised.value.row, raised.value.column, raised.value.reason) == (1, "score", reason)


def test_skip_mode_drops_bad_rows_and_reports_counts_and_examples(vqa_rows, caplog):
    report = ValidationReport()

    with caplog.at_level(logging.WARNING, logger="st_viomni.data.validation"):
        samples = vqa_single_samples(vqa_rows, on_error="skip", report=report)

    assert [s["positive"] for s in samples] == ["Red.", "Đỏ."]
    assert (report.rows_seen, report.rows_skipped, report.rows_kept) == (5, 3, 2)
    assert report.counts == {"unreadable_image": 1, "missing_image_file": 1, "empty_text": 1}
    assert report.examples["missing_image_file"][0]["row"] == 2
    assert "gone.png" in report.examples["missing_image_file"][0]["detail"]
    assert "2 of 5 rows kept, 3 skipped" in report.summary()
    assert "Validation: 2 of 5 rows kept" in caplog.text


def test_skip_mode_filters_a_stream_lazily(vqa_rows):
    report = ValidationReport()
    samples = vqa_single_samples(vqa_rows.to_iterable_dataset(), on_error="skip", report=report)
    assert report.rows_seen == 0  # nothing is read before iteration

    kept = list(samples)

    assert [s["positive"] for s in kept] == ["Red.", "Đỏ."]
    assert report.counts == {"unreadable_image": 1, "missing_image_file": 1, "empty_text": 1}
    assert report.rows_seen == 5


def test_skip_mode_bad_score_in_a_mixed_file():
    rows = Dataset.from_dict({"sentence1": ["a", "b", "c"], "sentence2": ["x", "", "z"], "score": [1.0, 2.0, 9.0]})
    report = ValidationReport()

    samples = text_pair_samples(rows, score_range=(0, 5), on_error="skip", report=report)

    assert samples["anchor"] == ["a"]
    assert report.counts == {"empty_text": 1, "score_out_of_range": 1}


def test_unknown_task_and_misplaced_score_in_canonical_rows():
    rows = Dataset.from_list(
        [
            {"task": "captioning", "anchor": "a", "positive": "b", "score": None},
            {"task": "instr", "anchor": "a", "positive": "b", "score": 0.5},
            {"task": "instr", "anchor": "<instr> a", "positive": "b", "score": None},
            {"task": "vqa_single", "anchor": "What?", "positive": "b", "score": None},
            {"task": "instr", "anchor": "a", "positive": "b", "score": None},
        ]
    )
    report = ValidationReport()

    samples = validate_samples(rows, on_error="skip", report=report)

    assert len(samples) == 1
    assert report.counts == {"unknown_task": 1, "unexpected_score": 1, "prefixed_text": 1, "no_image": 1}
    with pytest.raises(InvalidRowError, match="row 0, column 'task': unknown_task"):
        validate_samples(rows)


def test_malformed_conversations_are_bad_rows():
    image = Image.new("RGB", (56, 56))
    rows = Dataset.from_list(
        [
            {"images": [image], "conversations": ["Q1?", "A1.", "Q2?"]},  # unanswered
            {"images": [image], "conversations": ["Q1?", ""]},  # empty answer
            {"images": [image], "conversations": ["Q1?", "A1."]},
        ]
    )
    report = ValidationReport()

    samples = vqa_multi_samples(rows, on_error="skip", report=report)

    assert samples["positive"] == ["A1."]
    assert report.counts == {"bad_conversation": 1, "empty_text": 1}
    assert report.examples["empty_text"][0]["column"] == "conversations[0]"


def _write_huge_png(path, width, height):
    """A 1-bit black PNG: a few KB on disk, ``width * height`` pixels once decoded."""
    raw = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    data = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.fixture
def oversized_rows(tmp_path):
    """Four VQA rows: good, 15000x15000 (over Pillow's pixel limit), good, 20x4200 (aspect ratio 210)."""
    good = tmp_path / "good.png"
    Image.new("RGB", (56, 56), "red").save(good)
    huge = tmp_path / "huge.png"
    _write_huge_png(huge, 15_000, 15_000)
    assert huge.stat().st_size < 100_000
    thin = tmp_path / "thin.png"
    Image.new("RGB", (20, 4200), "blue").save(thin)
    return Dataset.from_dict(
        {
            "images": [[str(good)], [str(huge)], [str(good)], [str(thin)]],
            "question": ["What colour?"] * 4,
            "answer": ["Red.", "Black.", "Đỏ.", "Blue."],
        }
    )


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "iterable"])
def test_images_too_large_or_too_thin_for_qwen2_vl_are_unreadable_rows(oversized_rows, streaming):
    rows = oversized_rows.to_iterable_dataset() if streaming else oversized_rows
    report = ValidationReport()

    kept = list(vqa_single_samples(rows, on_error="skip", report=report))

    assert [sample["positive"] for sample in kept] == ["Red.", "Đỏ."]
    assert report.counts == {"unreadable_image": 2}
    huge, thin = report.examples["unreadable_image"]
    assert (huge["row"], huge["column"], thin["row"], thin["column"]) == (1, "images[0]", 3, "images[0]")
    assert "huge.png" in huge["detail"] and "thin.png" in thin["detail"] and "aspect ratio" in thin["detail"]
    with pytest.raises(InvalidRowError, match=r"row 1, column 'images\[0\]': unreadable_image: .*huge\.png"):
        list(vqa_single_samples(rows))
