"""Which rows each process reads and trains on from a streamed mixture, under ``torchrun --nproc_per_node 2``.

Usage: torchrun --nproc_per_node 2 tests/distributed/stream_shards.py DATA_DIR RESULT_JSON

DATA_DIR holds ``pairs.jsonl`` (text_pair) and ``instr.jsonl`` (instr), one file per task. The sources are
built as ``st_viomni.data.sources`` builds them (rows -> adapter -> shuffle -> mix_tasks ->
build_training_dataset), and the rows come out of the trainer's own dataloader
(``SentenceTransformerTrainer.get_train_dataloader``: accelerate's ``prepare_data_loader``) with
``dispatch_batches=False``, as ``st_viomni.train.training_arguments`` sets for streams. Scenarios:

* ``one_shard``: the rows as loaded (one shard per task);
* ``resharded``: each source's rows through ``reshard_stream(rows, world_size)`` before the adapter;
* ``resharded_workers``: ``reshard_stream(rows, world_size * 2)`` and 2 DataLoader workers per process.

Per process: the rows the adapters validated in the process (workers validate in their own) and the anchors of
the trainer rows. Rank 0 writes them all as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def rows_of(batch):
    return {"rows": batch}


def trainer_rows(trainer, data_dir: str, num_shards: int | None, workers: int) -> dict:
    from datasets import load_dataset

    from st_viomni.data import (
        ValidationReport,
        build_training_dataset,
        instr_samples,
        mix_tasks,
        reshard_stream,
        text_pair_samples,
    )

    report = ValidationReport()

    def load(name: str):
        rows = load_dataset("json", data_files=os.path.join(data_dir, name), split="train", streaming=True)
        return rows if num_shards is None else reshard_stream(rows, num_shards)

    samples = {
        "text_pair": text_pair_samples(load("pairs.jsonl"), score_range=(0, 5), on_error="skip", report=report),
        "instr": instr_samples(load("instr.jsonl"), instruction_column="q", response_column="r", report=report),
    }
    samples = {task: stream.shuffle(seed=0, buffer_size=10_000) for task, stream in samples.items()}
    # Every sample once, so that the rows trained over all processes can be compared with the valid rows.
    # mix_tasks reads each stream up to its first sample (here the whole of each source, into the shuffle
    # buffer), and with the report takes those rows off the count again.
    mixture = mix_tasks(
        samples,
        {"text_pair": 1, "instr": 1},
        seed=0,
        stopping_strategy="all_exhausted_without_replacement",
        report=report,
    )
    trainer.train_dataset = build_training_dataset(mixture, on_error="skip")
    trainer.args.dataloader_num_workers = workers
    loader = trainer.get_train_dataloader()
    anchors = [row["anchor"] for batch in loader for row in batch["rows"]]
    return {
        "mixture_shards": mixture.num_shards,
        "loader_dataset": type(loader.dataset).__module__ + "." + type(loader.dataset).__name__,
        "rows_validated": report.rows_seen,
        "anchors": anchors,
    }


def main(data_dir: str, result_path: str) -> None:
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from st_viomni import build_model
    from st_viomni.losses import PrefixRoutedLoss
    from st_viomni.testing import make_tiny_base_model

    # The model before the training arguments, which initialise torch.distributed (see st_viomni.train).
    with tempfile.TemporaryDirectory() as scratch:
        model = build_model(make_tiny_base_model(scratch, seed=0), embedding_dim=8)
    arguments = SentenceTransformerTrainingArguments(
        # Batches of 1: sentence-transformers turns on dataloader_drop_last under DDP, and a batch of 1 is never
        # short, so every row a process reads reaches the trainer.
        output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", per_device_train_batch_size=1,
        max_steps=100, accelerator_config={"dispatch_batches": False},
    )  # fmt: skip
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    trainer = SentenceTransformerTrainer(model=model, args=arguments, loss=PrefixRoutedLoss(model))
    trainer.data_collator = rows_of

    results = {
        "one_shard": trainer_rows(trainer, data_dir, None, 0),
        "resharded": trainer_rows(trainer, data_dir, world_size, 0),
        "resharded_workers": trainer_rows(trainer, data_dir, world_size * 2, 2),
    }
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {"rank": rank, **results})
    if rank == 0:
        with open(result_path, "w", encoding="utf-8") as file:
            json.dump({"world_size": world_size, "processes": gathered}, file, ensure_ascii=False)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
