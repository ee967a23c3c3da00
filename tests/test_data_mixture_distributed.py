"""A streamed mixture under 2-process DDP (torchrun, gloo, CPU): which rows each process reads and trains on.

One torchrun launch runs every scenario of ``tests/distributed/stream_shards.py`` through the trainer's own
dataloader (accelerate, ``dispatch_batches=False`` as ``st-viomni train`` sets for streams). With one file per
task the mixture has one shard, and every process reads and validates every row, keeping half; through
``reshard_stream`` each process reads only its own half, and the processes together train every valid row
once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "distributed" / "stream_shards.py"
PAIRS, INSTR = 60, 30
VALID = {f"<text_pair> câu {i}" for i in range(PAIRS) if i % 10} | {f"<instr> hỏi {i}" for i in range(INSTR)}


@pytest.fixture(scope="module")
def launch(tmp_path_factory, run_on_two_processes):
    data = tmp_path_factory.mktemp("streams")
    # One file per task; every tenth pair has a score outside (0, 5) and is skipped.
    (data / "pairs.jsonl").write_text(
        "\n".join(
            json.dumps({"sentence1": f"câu {i}", "sentence2": f"sentence {i}", "score": 7.0 if i % 10 == 0 else 3.0})
            for i in range(PAIRS)
        ),
        encoding="utf-8",
    )
    (data / "instr.jsonl").write_text(
        "\n".join(json.dumps({"q": f"hỏi {i}", "r": f"đáp {i}"}) for i in range(INSTR)), encoding="utf-8"
    )
    result_path = data / "report.json"
    completed = run_on_two_processes(SCRIPT, data, result_path, timeout=400)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0 and result_path.exists(), output[-5000:]
    return json.loads(result_path.read_text(encoding="utf-8")), output


def _scenario(launch, name):
    report, _ = launch
    assert report["world_size"] == 2
    return [process[name] for process in sorted(report["processes"], key=lambda process: process["rank"])]


def test_one_shard_per_task_makes_every_process_read_and_validate_every_row(launch):
    # The defect reshard_stream fixes, as accelerate handles a 1-shard datasets.IterableDataset.
    processes = _scenario(launch, "one_shard")
    for process in processes:
        assert process["mixture_shards"] == 1
        assert process["loader_dataset"] == "accelerate.data_loader.IterableDatasetShard"
        assert process["rows_validated"] == PAIRS + INSTR


def test_resharded_sources_make_each_process_read_its_own_rows_and_train_each_valid_row_once(launch):
    processes = _scenario(launch, "resharded")
    for process in processes:
        # accelerate shards the mixture itself (IterableDataset.shard), once: no IterableDatasetShard on top.
        assert process["mixture_shards"] == 2
        assert process["loader_dataset"] == "datasets.iterable_dataset.IterableDataset"
        assert process["rows_validated"] == (PAIRS + INSTR) / 2
        # Every process mixes both tasks.
        assert {anchor.split()[0] for anchor in process["anchors"]} == {"<text_pair>", "<instr>"}
    first, second = (process["anchors"] for process in processes)
    assert len(set(first)) == len(first) and len(set(second)) == len(second)
    assert not set(first) & set(second)
    assert set(first) | set(second) == VALID


def test_resharded_sources_feed_every_dataloader_worker(launch):
    processes = _scenario(launch, "resharded_workers")
    first, second = (process["anchors"] for process in processes)
    assert all(process["mixture_shards"] == 4 for process in processes)
    assert len(first) + len(second) == len(VALID) and set(first) | set(second) == VALID
    # datasets stops the workers left without a shard, with this warning; none was.
    assert "Too many dataloader workers" not in launch[1]
