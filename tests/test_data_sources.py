import json

import datasets
import pytest
from PIL import Image

from st_viomni.data import ValidationReport
from st_viomni.data.sources import load_samples_by_task
from st_viomni.recipe import SourceRecipe


def test_json_parquet_and_mini_sources_become_canonical_samples_per_task(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(
        "\n".join(json.dumps({"a": f"câu {i}", "b": f"sentence {i}", "s": i % 6}) for i in range(6)), encoding="utf-8"
    )
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    datasets.Dataset.from_list(
        [{"img": "red.png", "q": "Màu gì?", "ans": "đỏ"}, {"img": "missing.png", "q": "Màu gì?", "ans": "xanh"}]
    ).to_parquet(str(tmp_path / "vqa.parquet"))
    sources = [
        SourceRecipe(task="text_pair", json=str(tmp_path / "pairs.jsonl"),
                     adapter_kwargs={"sentence1_column": "a", "sentence2_column": "b", "score_column": "s",
                                     "score_range": [0, 5]}),
        SourceRecipe(task="vqa_single", parquet=str(tmp_path / "vqa.parquet"),
                     adapter_kwargs={"images_column": "img", "question_column": "q", "answer_column": "ans",
                                     "image_root": str(tmp_path)}),
        SourceRecipe(mini=3, task="instr"),
    ]
    report = ValidationReport()
    samples = load_samples_by_task(sources, on_error="skip", report=report)
    assert sorted(samples) == ["instr", "text_pair", "vqa_single"]
    assert sorted(samples["text_pair"]["score"]) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert samples["vqa_single"]["positive"] == ["đỏ"] and report.rows_skipped == 1  # the missing image
    assert len(samples["instr"]) == 3

    streamed = load_samples_by_task(sources, streaming=True, on_error="skip")
    assert sum(1 for _ in streamed["text_pair"]) == 6
    assert [row["positive"] for row in streamed["vqa_single"]] == ["đỏ"]


def test_streamed_sources_are_split_into_a_shard_per_process_and_worker(tmp_path):
    # One file per source would give the mixture one shard: every DDP process would then read, validate and decode
    # the whole stream (st_viomni.data.mixture.reshard_stream). Each shard must hold its own rows, all of them once.
    _write_jsonl(tmp_path / "pairs.jsonl", [{"a": f"câu {i}", "b": f"sentence {i}", "s": i % 6} for i in range(10)])
    sources = [
        SourceRecipe(task="text_pair", json=str(tmp_path / "pairs.jsonl"),
                     adapter_kwargs={"sentence1_column": "a", "sentence2_column": "b", "score_column": "s",
                                     "score_range": [0, 5]}),
        SourceRecipe(mini=7, task="instr"),
    ]
    streamed = load_samples_by_task(sources, streaming=True, on_error="raise", num_shards=4)
    for task, expected in (("text_pair", [f"câu {i}" for i in range(10)]), ("instr", None)):
        stream = streamed[task]
        assert stream.num_shards >= 4, task
        shards = [[row["anchor"] for row in stream.shard(4, index)] for index in range(4)]
        assert all(shards), (task, shards)
        every_row = sorted(anchor for shard in shards for anchor in shard)
        assert every_row == sorted(row["anchor"] for row in stream), task
        assert len(set(every_row)) == len(every_row), task
        if expected is not None:
            assert every_row == sorted(expected)


def test_the_shuffle_buffer_of_a_streamed_source_is_the_one_asked_for(tmp_path):
    # A buffer of one sample shuffles nothing (one file, one shard): the stream keeps the file's order. The
    # default buffer of 10,000 holds all 50 rows and reorders them.
    _write_jsonl(tmp_path / "pairs.jsonl", [{"a": f"câu {i}", "b": f"sentence {i}", "s": 3} for i in range(50)])
    source = SourceRecipe(task="text_pair", json=str(tmp_path / "pairs.jsonl"),
                          adapter_kwargs={"sentence1_column": "a", "sentence2_column": "b", "score_column": "s",
                                          "score_range": [0, 5]})
    in_file_order = [f"câu {i}" for i in range(50)]

    def anchors(**options):
        stream = load_samples_by_task([source], streaming=True, on_error="raise", **options)["text_pair"]
        return [row["anchor"] for row in stream]

    assert anchors(shuffle_buffer=1) == in_file_order
    shuffled = anchors()
    assert shuffled != in_file_order and sorted(shuffled) == sorted(in_file_order)


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "iterable"])
@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_a_pattern_that_matches_no_file_names_the_source_before_any_data_is_read(
    tmp_path, monkeypatch, kind, streaming
):
    _write_jsonl(tmp_path / "pairs.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1.0}])
    pattern = str(tmp_path / "nope" / f"*.{kind}l" if kind == "json" else tmp_path / "nope.parquet")
    sources = [
        SourceRecipe(task="text_pair", json=str(tmp_path / "pairs.jsonl")),
        SourceRecipe(task="vqa_single", **{kind: pattern}),
    ]
    loaded = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: loaded.append(args))

    with pytest.raises(FileNotFoundError) as raised:
        load_samples_by_task(sources, streaming=streaming)

    assert str(raised.value) == f"sources[1] (task 'vqa_single'): {kind}: no file matches {pattern!r}"
    assert loaded == []  # not even the good first source was opened


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "iterable"])
def test_a_json_file_with_a_column_the_first_file_lacks_is_named_before_training(tmp_path, streaming):
    for part in range(3):
        rows = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "score": 3.0} for i in range(50)]
        if part == 1:
            rows = [{**row, "score": str(row["score"])} for row in rows]  # another type: datasets casts it
        if part == 2:
            rows = [{"sentence1": row["sentence1"], "sentence_2": row["sentence2"], "score": 3.0} for row in rows]
        _write_jsonl(tmp_path / f"part-00{part}.jsonl", rows)
    source = SourceRecipe(task="text_pair", json=str(tmp_path / "*.jsonl"), adapter_kwargs={"score_range": [0, 5]})

    with pytest.raises(ValueError) as raised:
        load_samples_by_task([source], streaming=streaming, on_error="skip")

    message = str(raised.value)
    assert message.startswith("sources[0] (task 'text_pair'): json file ")
    assert "part-002.jsonl" in message and "['sentence_2']" in message and "part-000.jsonl" in message
    assert "\n" not in message  # the CLI prints the first line only


def test_json_keys_that_the_first_file_has_after_its_first_line_are_fine(tmp_path):
    # Optional keys: the first file's first line lacks "input", later lines have it, and datasets infers the
    # columns from many lines; a check on first lines alone would reject this valid data.
    _write_jsonl(
        tmp_path / "a.jsonl",
        [{"instruction": "i", "response": "r"}, {"instruction": "i", "response": "r", "input": "x"}],
    )
    _write_jsonl(tmp_path / "b.jsonl", [{"instruction": "j", "response": "s", "input": "y"}])
    source = SourceRecipe(
        task="instr",
        json=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
        adapter_kwargs={"input_column": "input"},
    )

    streamed = load_samples_by_task([source], streaming=True)

    assert sorted(sample["anchor"] for sample in streamed["instr"]) == ["i", "i\nx", "j\ny"]


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "iterable"])
def test_a_parquet_file_whose_columns_differ_from_the_first_is_named_before_training(tmp_path, streaming):
    datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "score": [1.0]}).to_parquet(
        str(tmp_path / "part-0.parquet")
    )
    datasets.Dataset.from_dict({"sentence1": ["a"], "score": [1.0]}).to_parquet(str(tmp_path / "part-1.parquet"))
    source = SourceRecipe(task="text_pair", parquet=str(tmp_path / "part-*.parquet"))

    with pytest.raises(ValueError, match=r"parquet file '.*part-1\.parquet' lacks column\(s\) \['sentence2'\]"):
        load_samples_by_task([source], streaming=streaming)


def test_a_data_file_that_cannot_be_read_is_named(tmp_path):
    datasets.Dataset.from_dict({"sentence1": ["a"], "sentence2": ["b"], "score": [1.0]}).to_parquet(
        str(tmp_path / "part-0.parquet")
    )
    (tmp_path / "part-1.parquet").write_bytes(b"not parquet")
    source = SourceRecipe(task="text_pair", parquet=str(tmp_path / "part-*.parquet"))

    with pytest.raises(ValueError, match=r"cannot read the columns of parquet file '.*part-1\.parquet'"):
        load_samples_by_task([source], streaming=True)
