"""Adapters: each data kind, from in-memory datasets and from local JSON / Parquet files with image paths."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, IterableDataset, load_dataset
from PIL import Image

from st_viomni.data import (
    CANONICAL_COLUMNS,
    CANONICAL_FEATURES,
    instr_samples,
    ocr_samples,
    render_dialogue,
    text_pair_samples,
    validate_samples,
    vqa_multi_samples,
    vqa_single_samples,
)


@pytest.fixture
def image_folder(tmp_path):
    """A folder with two small PNG images, as users store data: files next to a JSON/Parquet file."""
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (56, 56), (255, 0, 0)).save(folder / "images" / "red.png")
    Image.new("RGB", (84, 56), (0, 0, 255)).save(folder / "images" / "blue.png")
    return folder


def _rows(samples) -> list[dict]:
    return list(samples)


def test_text_pair_maps_columns_and_rescales_sts_scores():
    rows = Dataset.from_dict(
        {"s1": ["Con mèo ngủ.", "A dog runs."], "s2": ["The cat sleeps.", "Hôm nay trời đẹp."], "sim": [3.5, 0.0]}
    )

    samples = text_pair_samples(
        rows, sentence1_column="s1", sentence2_column="s2", score_column="sim", score_range=(0, 5)
    )

    assert samples.features == CANONICAL_FEATURES
    assert samples[0] == {
        "task": "text_pair",
        "anchor": "Con mèo ngủ.",
        "anchor_images": [],
        "positive": "The cat sleeps.",
        "positive_images": [],
        "score": pytest.approx(0.7),  # 3.5 on 0..5
    }
    assert samples[1]["score"] == 0.0


def test_text_pair_scores_already_in_unit_range_are_kept():
    rows = Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "score": [0.25]})
    assert text_pair_samples(rows)[0]["score"] == 0.25


def test_instr_appends_alpaca_input_to_the_instruction():
    rows = Dataset.from_dict(
        {
            "instruction": ["Dịch sang tiếng Anh.", "What is 2 + 3?"],
            "input": ["Xin chào", ""],
            "output": ["Hello", "5"],
        }
    )

    samples = instr_samples(rows, response_column="output", input_column="input")

    assert [(s["task"], s["anchor"], s["positive"]) for s in samples] == [
        ("instr", "Dịch sang tiếng Anh.\nXin chào", "Hello"),
        ("instr", "What is 2 + 3?", "5"),
    ]


def test_ocr_accepts_in_memory_images_from_several_columns():
    red, blue = Image.new("RGB", (56, 56), "red"), Image.new("RGB", (56, 56), "blue")
    rows = Dataset.from_dict({"page_1": [red], "page_2": [blue], "q": ["Trang hai viết gì?"], "a": ["Xin chào"]})

    sample = ocr_samples(rows, images_column=["page_1", "page_2"], query_column="q", answer_column="a")[0]

    assert sample["task"] == "ocr"
    assert [image.getpixel((0, 0)) for image in sample["anchor_images"]] == [(255, 0, 0), (0, 0, 255)]
    assert (sample["anchor"], sample["positive"]) == ("Trang hai viết gì?", "Xin chào")


def test_ocr_without_query_column_gives_image_only_anchors():
    rows = Dataset.from_dict({"images": [[Image.new("RGB", (56, 56))]], "answer": ["LỐI RA"]})

    sample = ocr_samples(rows, query_column=None)[0]

    assert sample["anchor"] is None and len(sample["anchor_images"]) == 1 and sample["positive"] == "LỐI RA"


def test_vqa_single_from_json_file_with_relative_image_paths(image_folder):
    lines = [
        {"image": "images/red.png", "question": "What colour is it?", "answer": "Red."},
        {"image": "images/blue.png", "question": "Màu gì?", "answer": "Xanh dương."},
    ]
    path = image_folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines), encoding="utf-8")
    rows = load_dataset("json", data_files=str(path), split="train", cache_dir=str(image_folder / "cache"))

    samples = vqa_single_samples(rows, images_column="image", image_root=image_folder)

    assert [s["anchor"] for s in samples] == ["What colour is it?", "Màu gì?"]
    assert [s["anchor_images"][0].size for s in samples] == [(56, 56), (84, 56)]
    assert [s["task"] for s in samples] == ["vqa_single", "vqa_single"]


def test_vqa_single_from_parquet_file_streamed(image_folder):
    rows = Dataset.from_dict(
        {
            "images": [[str(image_folder / "images" / "red.png"), str(image_folder / "images" / "blue.png")]],
            "question": ["Which image is blue?"],
            "answer": ["The second one."],
        }
    )
    rows.to_parquet(image_folder / "train.parquet")
    stream = load_dataset(
        "parquet",
        data_files=str(image_folder / "train.parquet"),
        split="train",
        streaming=True,
        cache_dir=str(image_folder / "cache"),
    )

    samples = vqa_single_samples(stream)

    assert isinstance(samples, IterableDataset)
    assert samples.features == CANONICAL_FEATURES
    (sample,) = _rows(samples)
    assert [image.size for image in sample["anchor_images"]] == [(56, 56), (84, 56)]
    assert sample["positive"] == "The second one."


def test_vqa_multi_expands_one_sample_per_turn_with_the_dialogue_so_far():
    image = Image.new("RGB", (56, 56), "green")
    conversation = [
        {"from": "human", "value": "<image>\nHow many shapes are there?"},
        {"from": "gpt", "value": "Two."},
        {"from": "human", "value": "What colour is the left one?"},
        {"from": "gpt", "value": "Green."},
        {"from": "human", "value": "And the right one?"},
        {"from": "gpt", "value": "Red."},
    ]
    rows = Dataset.from_dict({"images": [[image]], "conversations": [conversation]})

    samples = vqa_multi_samples(rows)

    assert [s["task"] for s in samples] == ["vqa_multi"] * 3
    assert [s["anchor"] for s in samples] == [
        "Q: How many shapes are there?",
        "Q: How many shapes are there?\nA: Two.\nQ: What colour is the left one?",
        "Q: How many shapes are there?\nA: Two.\nQ: What colour is the left one?\nA: Green.\nQ: And the right one?",
    ]
    assert [s["positive"] for s in samples] == ["Two.", "Green.", "Red."]
    assert all(len(s["anchor_images"]) == 1 for s in samples)


def test_vqa_multi_reads_chat_messages_and_limits_history():
    conversation = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1?"}]},
        {"role": "assistant", "content": "A1."},
        {"role": "user", "content": "Q2?"},
        {"role": "assistant", "content": "A2."},
        {"role": "user", "content": "Q3?"},
        {"role": "assistant", "content": "A3."},
    ]
    # Content is sometimes a string, sometimes a list of items: Arrow needs datasets' JSON type for that.
    rows = Dataset.from_list(
        [{"imgs": [Image.new("RGB", (56, 56))], "messages": conversation}], on_mixed_types="use_json"
    )

    samples = vqa_multi_samples(rows, images_column="imgs", conversation_column="messages", max_history_turns=1)

    assert [s["anchor"] for s in samples] == ["Q: Q1?", "Q: Q1?\nA: A1.\nQ: Q2?", "Q: Q2?\nA: A2.\nQ: Q3?"]
    assert samples[2]["anchor"] == render_dialogue([("Q2?", "A2.")], "Q3?")


def test_vqa_multi_streamed_equals_in_memory(image_folder):
    rows = Dataset.from_dict(
        {
            "images": [str(image_folder / "images" / "red.png")],
            "conversations": [["What colour?", "Red.", "What size?", "Small."]],  # alternating strings
        }
    )
    in_memory = [{**s, "anchor_images": len(s["anchor_images"])} for s in vqa_multi_samples(rows)]
    streamed = [{**s, "anchor_images": len(s["anchor_images"])} for s in vqa_multi_samples(rows.to_iterable_dataset())]

    assert streamed == in_memory and len(in_memory) == 2


def test_validate_samples_keeps_good_canonical_rows(image_folder):
    rows = Dataset.from_list(
        [
            {"task": "text_pair", "anchor": "a", "anchor_images": [], "positive": "b", "score": 0.5},
            {"task": "ocr", "anchor": None, "anchor_images": [str(image_folder / "images/red.png")], "positive": "x"},
        ]
    )

    samples = validate_samples(rows)

    assert samples.column_names == list(CANONICAL_COLUMNS)
    assert [s["task"] for s in samples] == ["text_pair", "ocr"]
    assert samples[1]["anchor_images"][0].size == (56, 56)


def test_missing_column_is_reported_up_front():
    rows = Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"]})
    with pytest.raises(ValueError, match=r"column\(s\) \['score'\] not found"):
        text_pair_samples(rows)


@pytest.mark.parametrize(
    ("adapter", "options", "message"),
    [
        (text_pair_samples, {"score_range": (5, 0)},
         r"^score_range: expected \(low, high\) with high > low, got \(5, 0\)"),
        (text_pair_samples, {"score_range": (5,)}, r"^score_range: expected \(low, high\)"),
        (vqa_multi_samples, {"max_history_turns": -1}, r"^max_history_turns: expected a number >= 0 .*got -1"),
        (ocr_samples, {"images_column": []}, r"^images_column: expected a column name or a non-empty list"),
        (vqa_single_samples, {"images_column": ["img", 3]}, r"^images_column: .*got \['img', 3\]"),
        (instr_samples, {"num_proc": 0}, r"^num_proc: expected a positive number of processes, got 0"),
        (validate_samples, {"num_proc": -2}, r"^num_proc: expected a positive"),
    ],
)
def test_bad_option_values_are_refused_before_any_row_is_read(adapter, options, message):
    # A stream that fails when read: the option is refused before the adapter touches the data.
    def unreadable():
        raise AssertionError("the adapter read a row")
        yield

    with pytest.raises(ValueError, match=message):
        adapter(IterableDataset.from_generator(unreadable), **options)


def _file_rows(kind: str) -> tuple[list[dict], dict]:
    """Two rows of one data kind as users keep them in a JSON/Parquet file, with the adapter's arguments."""
    if kind == "text_pair":
        rows = [{"sentence1": "Con mèo ngủ.", "sentence2": "The cat sleeps.", "score": 4.5}] * 2
        return rows, {"score_range": (0, 5)}
    if kind == "instr":
        return [{"instruction": "Viết số 21 bằng chữ.", "response": "hai mươi mốt"}] * 2, {}
    if kind == "ocr":
        return [{"images": ["images/red.png", "images/blue.png"], "query": "Ảnh hai?", "answer": "LỐI RA"}] * 2, {}
    if kind == "vqa_single":
        return [{"images": ["images/red.png"], "question": "What colour?", "answer": "Red."}] * 2, {}
    conversation = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}] * 2
    return [{"images": ["images/red.png"], "conversations": conversation}] * 2, {}


_ADAPTERS = {
    "text_pair": (text_pair_samples, 2),
    "instr": (instr_samples, 2),
    "ocr": (ocr_samples, 2),
    "vqa_single": (vqa_single_samples, 2),
    "vqa_multi": (vqa_multi_samples, 4),  # two turns per conversation
}


@pytest.mark.parametrize("file_format", ["json", "parquet"])
@pytest.mark.parametrize("kind", list(_ADAPTERS))
def test_every_adapter_reads_local_files_with_relative_image_paths(image_folder, kind, file_format):
    rows, arguments = _file_rows(kind)
    path = image_folder / f"train.{file_format}"
    if file_format == "json":
        path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    else:
        Dataset.from_list(rows).to_parquet(path)
    loaded = load_dataset(file_format, data_files=str(path), split="train", cache_dir=str(image_folder / "cache"))
    adapter, expected_samples = _ADAPTERS[kind]
    if kind not in ("text_pair", "instr"):
        arguments["image_root"] = image_folder

    samples = adapter(loaded, **arguments)

    assert len(samples) == expected_samples
    assert set(samples["task"]) == {kind}
    expected_sizes = {"ocr": [(56, 56), (84, 56)], "vqa_single": [(56, 56)], "vqa_multi": [(56, 56)]}
    assert [image.size for image in samples[0]["anchor_images"]] == expected_sizes.get(kind, [])
