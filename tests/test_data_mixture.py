"""Task mixtures: seed proportions, streaming at 11M scale without materialising, determinism."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from datasets import Dataset, IterableDataset, load_dataset

from st_viomni.data import (
    CANONICAL_FEATURES,
    ValidationReport,
    default_proportions,
    mini_samples,
    mix_tasks,
    reshard_stream,
    text_pair_samples,
)
from st_viomni.tasks import TASK_NAMES, TASKS


def test_default_proportions_are_the_seed_counts():
    proportions = default_proportions()

    assert list(proportions) == list(TASK_NAMES)
    assert math.fsum(proportions.values()) == pytest.approx(1.0)
    assert proportions["text_pair"] == pytest.approx(5.6 / 11.2)
    assert proportions["instr"] == pytest.approx(0.6 / 11.2)
    assert proportions["ocr"] == pytest.approx(2.5 / 11.2)
    assert proportions["vqa_single"] + proportions["vqa_multi"] == pytest.approx(2.5 / 11.2)
    assert default_proportions(["ocr", "instr"]) == pytest.approx({"ocr": 2.5 / 3.1, "instr": 0.6 / 3.1})


class _CountingSource:
    """A generator of canonical samples that counts how many rows the mixture pulled from it."""

    # On the class: interleave_datasets deep-copies its sources, and a count on the instance would stay with
    # the copy.
    pulled_by_task: Counter[str] = Counter()

    def __init__(self, task: str, size: int):
        self.task, self.size = task, size
        self.pulled_by_task[task] = 0

    @property
    def pulled(self) -> int:
        return self.pulled_by_task[self.task]

    def __call__(self):
        for index in range(self.size):
            self.pulled_by_task[self.task] += 1
            yield {
                "task": self.task,
                "anchor": f"{self.task} anchor {index}",
                "anchor_images": [],
                "positive": f"positive {index}",
                "positive_images": [],
                "score": 0.5 if self.task == "text_pair" else None,
            }


def test_an_11m_stream_mixture_is_read_lazily_in_seed_proportions():
    # Sources as large as the seed's: 11.2M samples in all. Reading 20,000 must touch ~20,000 rows, not 11.2M,
    # and 20,000 is more than a tiny-model training run sees (a few hundred steps of a few samples).
    sources = {task: _CountingSource(task, TASKS[task].seed_samples) for task in TASK_NAMES}
    streams = {
        task: IterableDataset.from_generator(source, features=CANONICAL_FEATURES) for task, source in sources.items()
    }
    mixture = mix_tasks(streams, seed=0)
    # mix_tasks read each stream's first sample, to check that it has one.
    assert [source.pulled for source in sources.values()] == [1] * len(sources)
    taken = 20_000

    counts = Counter(sample["task"] for sample in mixture.take(taken))

    assert sum(counts.values()) == taken
    for task, proportion in default_proportions().items():
        expected = taken * proportion
        # Within 4 binomial standard deviations.
        assert abs(counts[task] - expected) < 4 * math.sqrt(expected * (1 - proportion)), (task, counts[task], expected)
    # Only what was read was pulled from the sources (plus the check's row and a few prefetched ones per source).
    assert taken < sum(source.pulled for source in sources.values()) <= taken + 4 * len(sources)


def test_mixed_batches_mix_tasks():
    streams = {task: mini_samples(task, 40, seed=1).to_iterable_dataset() for task in TASK_NAMES}
    tasks = [sample["task"] for sample in mix_tasks(streams, {task: 1 for task in TASK_NAMES}, seed=0).take(100)]

    batches = [tasks[start : start + 16] for start in range(0, 96, 16)]
    assert all(len(set(batch)) >= 3 for batch in batches)


def test_map_style_mixture_follows_proportions_and_seed():
    sources = {
        task: Dataset.from_dict(
            {
                "task": [task] * 3000,
                "anchor": [f"{task} {i}" for i in range(3000)],
                "anchor_images": [[]] * 3000,
                "positive": ["p"] * 3000,
                "positive_images": [[]] * 3000,
                "score": [0.5 if task == "text_pair" else None] * 3000,
            },
            features=CANONICAL_FEATURES,
        )
        for task in ("text_pair", "instr", "ocr")
    }
    proportions = {"text_pair": 0.6, "instr": 0.1, "ocr": 0.3}

    mixture = mix_tasks(sources, proportions, seed=3)

    counts = Counter(mixture["task"])
    total = len(mixture)
    assert total > 4000
    for task, proportion in proportions.items():
        assert abs(counts[task] / total - proportion) < 0.03
    assert mixture["anchor"][:50] == mix_tasks(sources, proportions, seed=3)["anchor"][:50]
    assert mixture["anchor"][:50] != mix_tasks(sources, proportions, seed=4)["anchor"][:50]


def test_mixture_rejects_mismatched_inputs():
    text = mini_samples("text_pair", 4)
    with pytest.raises(ValueError, match="proportions must name exactly"):
        mix_tasks({"text_pair": text, "instr": mini_samples("instr", 4)}, {"text_pair": 1.0})
    with pytest.raises(ValueError, match="contain other tasks"):
        mix_tasks({"instr": text, "text_pair": text})
    with pytest.raises(TypeError, match="all sources"):
        mix_tasks({"text_pair": text, "instr": mini_samples("instr", 4).to_iterable_dataset()})
    with pytest.raises(ValueError, match="canonical features"):
        mix_tasks({"text_pair": text.remove_columns("score")})


def _all_bad_pairs(tmp_path, rows: int = 100):
    """A text_pair JSON-lines file whose every score is outside the (0, 5) range given to the adapter."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "score": 7.0}) for i in range(rows)),
        encoding="utf-8",
    )
    return str(path)


@pytest.mark.parametrize("streaming", [False, True], ids=["dataset", "stream"])
def test_a_task_without_a_valid_sample_is_an_error_naming_the_task(tmp_path, streaming):
    # Every row of the text_pair source is skipped. A stream would otherwise end the mixture at the first draw of
    # text_pair (first_exhausted) and the trainer would "train" on a row or two; a Dataset failed in
    # interleave_datasets with "datasets at indices [0] are empty", naming no task.
    report = ValidationReport()
    rows = load_dataset("json", data_files=_all_bad_pairs(tmp_path), split="train", streaming=streaming)
    pairs = text_pair_samples(rows, score_range=(0, 5), on_error="skip", report=report)
    instr = mini_samples("instr", 50)
    sources = {"text_pair": pairs, "instr": instr.to_iterable_dataset() if streaming else instr}

    expected = (
        r"no valid 'text_pair' sample: 100 of 100 rows skipped: score_out_of_range 100"
        if streaming
        else r"no valid 'text_pair' sample: its samples are empty .*100 skipped: score_out_of_range 100"
    )
    with pytest.raises(ValueError, match=expected):
        mix_tasks(sources, {"text_pair": 0.5, "instr": 0.5}, report=report)
    # Without a report the task is still named; a single weighted task is checked too.
    with pytest.raises(ValueError, match=r"no valid 'text_pair' sample"):
        mix_tasks(sources, {"text_pair": 1, "instr": 0})


def test_an_empty_stream_is_an_error_and_checking_a_stream_leaves_its_report_as_it_was(tmp_path):
    instr = mini_samples("instr", 5).to_iterable_dataset()
    empty = IterableDataset.from_generator(lambda: iter(()), features=CANONICAL_FEATURES)
    with pytest.raises(ValueError, match=r"no valid 'text_pair' sample: the stream is empty"):
        mix_tasks({"text_pair": empty, "instr": instr}, report=ValidationReport())

    # A stream with a valid sample after a bad one passes; the rows the check read are read again in training,
    # so they are not counted in the report now.
    path = tmp_path / "some_bad.jsonl"
    path.write_text("\n".join(json.dumps({"sentence1": "a", "sentence2": "b", "score": s}) for s in (7.0, 3.0, 4.0)))
    report = ValidationReport()
    rows = load_dataset("json", data_files=str(path), split="train", streaming=True)
    pairs = text_pair_samples(rows, score_range=(0, 5), on_error="skip", report=report)
    mix_tasks({"text_pair": pairs, "instr": instr}, report=report)
    assert (report.rows_seen, report.rows_skipped, dict(report.counts), report.examples) == (0, 0, {}, {})
    assert sum(1 for _ in pairs) == 2
    assert (report.rows_seen, report.rows_skipped, dict(report.counts)) == (3, 1, {"score_out_of_range": 1})


def test_reshard_stream_splits_a_stream_into_shards_that_partition_its_rows(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"x": i}) for i in range(10)), encoding="utf-8")
    rows = load_dataset("json", data_files=str(path), split="train", streaming=True)
    assert rows.num_shards == 1 and reshard_stream(rows, 1) is rows

    # One JSON file: split by row number.
    split = reshard_stream(rows, 3)
    assert split.num_shards == 3 and split.features == rows.features
    assert [[row["x"] for row in split.shard(3, index)] for index in range(3)] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]

    # One Parquet file of 4 row groups: split by row group, then each row group by row number.
    pq.write_table(Dataset.from_dict({"x": list(range(20))}).data.table, tmp_path / "rows.parquet", row_group_size=5)
    rows = load_dataset("parquet", data_files=str(tmp_path / "rows.parquet"), split="train", streaming=True)
    by_group = reshard_stream(rows, 4)
    assert [[row["x"] for row in by_group.shard(4, index)] for index in range(4)] == [
        list(range(start, start + 5)) for start in range(0, 20, 5)
    ]
    split = reshard_stream(rows, 8)
    assert split.num_shards == 8
    assert [row["x"] for row in split.shard(8, 1)] == [1, 3] and [row["x"] for row in split.shard(8, 6)] == [15, 17, 19]
    assert sorted(row["x"] for index in range(8) for row in split.shard(8, index)) == list(range(20))
