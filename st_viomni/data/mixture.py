"""Mix per-task canonical samples by proportion, so that every batch mixes tasks.

The seed trains on ~11M samples: 5.6M ``text_pair``, 0.6M ``instr``, 2.5M ``ocr`` and 2.5M VQA (split evenly
here into ``vqa_single`` and ``vqa_multi``). :func:`default_proportions` turns those counts into sampling
probabilities; :func:`mix_tasks` draws each next sample from a task chosen with these probabilities
(``datasets.interleave_datasets``, seeded), which works the same for ``Dataset`` and streaming
``IterableDataset`` sources. With streams the mixture pulls one sample at a time from the chosen source, so an
11M-sample mixture holds what its sources' shuffle buffers hold (and the images of the sample being read),
whatever its length. :func:`mix_tasks` refuses a task without a single valid sample (an empty source, or one
whose every row validation skipped): a stream is read up to its first sample to check it.

Several processes (DDP) and DataLoader workers: the trainer gives each process, and each process's workers,
their own shards of a streamed mixture, and a mixture has as many shards as its source with the fewest
(see :func:`reshard_stream`, which gives every source enough of them).

Example:
    ::

        from datasets import load_dataset
        from st_viomni.data import build_training_dataset, mix_tasks, text_pair_samples, vqa_single_samples

        pairs = text_pair_samples(load_dataset("json", data_files="sts.jsonl", split="train", streaming=True))
        vqa = vqa_single_samples(load_dataset("json", data_files="vqa.jsonl", split="train", streaming=True))
        mixture = mix_tasks({"text_pair": pairs.shuffle(seed=0, buffer_size=10_000),
                             "vqa_single": vqa.shuffle(seed=0, buffer_size=1_000)}, seed=0)
        train_dataset = build_training_dataset(mixture)   # text_pair : vqa_single = 5.6 : 1.25
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

import pyarrow as pa
from datasets import Dataset, IterableDataset, interleave_datasets

from ..tasks import TASK_NAMES, TASKS, get_task
from .schema import CANONICAL_FEATURES
from .validation import ValidationReport

StoppingStrategy = Literal["first_exhausted", "all_exhausted", "all_exhausted_without_replacement"]


def default_proportions(tasks: Iterable[str] | None = None) -> dict[str, float]:
    """The seed's mixing proportions (from ``Task.seed_samples``) over ``tasks`` (default: all), summing to 1.

    Example:
        ::

            default_proportions()
            # {'text_pair': 0.5, 'instr': 0.0536, 'ocr': 0.2232, 'vqa_single': 0.1116, 'vqa_multi': 0.1116}
    """
    tasks = TASK_NAMES if tasks is None else tuple(tasks)
    counts = {task: get_task(task).seed_samples for task in tasks}
    total = sum(counts.values())
    if not total:
        raise ValueError("default_proportions needs at least one task")
    return {task: count / total for task, count in counts.items()}


def mix_tasks(
    samples_by_task: Mapping[str, Dataset | IterableDataset],
    proportions: Mapping[str, float] | None = None,
    *,
    seed: int = 0,
    stopping_strategy: StoppingStrategy = "first_exhausted",
    report: ValidationReport | None = None,
) -> Dataset | IterableDataset:
    """Interleave per-task canonical samples, drawing each sample's task with the given proportions.

    Args:
        samples_by_task: Canonical samples of each task, keyed by task name; all ``Dataset`` or all
            ``IterableDataset``. Shuffle each source first if its rows are ordered (streams:
            ``.shuffle(seed=..., buffer_size=...)``).
        proportions: Relative weight of each task in the mixture (normalised to sum to 1); every key of
            ``samples_by_task`` needs one. None uses :func:`default_proportions` over the given tasks.
        seed: Seed of the task draws; the same seed gives the same order.
        stopping_strategy: When the mixture ends (``datasets.interleave_datasets``): ``"first_exhausted"``
            (default) stops when a source runs out, so the proportions hold to the end; ``"all_exhausted"``
            restarts exhausted sources until every source was used once (oversampling);
            ``"all_exhausted_without_replacement"`` uses every sample once, the remaining sources filling in
            after one runs out.
        report: The report the sources' adapters write to, for the counts in the error below. The rows read
            to check a stream are read again in training, so they are not left counted in it.

    Returns:
        One dataset of canonical samples, of the same kind as the sources.

    Raises:
        ValueError: A task with a weight above 0 has no sample: an empty ``Dataset``, or a stream that ends
            before its first valid sample (which would otherwise end a ``first_exhausted`` mixture at that
            task's first draw, silently). To check, each stream is read here, in this process, up to its
            first sample: a row or a few, or a shuffle buffer's worth of rows for a shuffled stream.
    """
    if not samples_by_task:
        raise ValueError("mix_tasks needs at least one task's samples")
    unknown = [task for task in samples_by_task if task not in TASKS]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; known tasks: {', '.join(TASK_NAMES)}")
    kinds = {isinstance(samples, IterableDataset) for samples in samples_by_task.values()}
    if len(kinds) > 1 or not all(isinstance(s, (Dataset, IterableDataset)) for s in samples_by_task.values()):
        raise TypeError("mix_tasks needs all sources to be datasets.Dataset or all to be datasets.IterableDataset")
    for task, samples in samples_by_task.items():
        if samples.features != CANONICAL_FEATURES:
            raise ValueError(
                f"the {task!r} samples do not have the canonical features (got {samples.features}); "
                "make them with an st_viomni.data adapter or validate_samples"
            )
        if isinstance(samples, Dataset) and set(samples.unique("task")) - {task}:
            raise ValueError(f"the samples given for {task!r} contain other tasks: {sorted(samples.unique('task'))}")

    weights = _normalised(samples_by_task, proportions)
    tasks = [task for task in samples_by_task if weights[task] > 0]
    for task in tasks:
        _check_has_a_sample(task, samples_by_task[task], report)
    if len(tasks) == 1:
        return samples_by_task[tasks[0]]
    return interleave_datasets(
        [samples_by_task[task] for task in tasks],
        probabilities=[weights[task] for task in tasks],
        seed=seed,
        stopping_strategy=stopping_strategy,
    )


def reshard_stream(rows: IterableDataset, num_shards: int) -> IterableDataset:
    """The same rows, in at least ``num_shards`` shards, so that each process and DataLoader worker reads its own.

    Under DDP the trainer's dataloader (accelerate's ``prepare_data_loader``, with ``dispatch_batches=False``
    as :func:`~st_viomni.train.training_arguments` sets for streams) gives each of ``world_size`` processes
    its share of a streamed mixture's shards (``IterableDataset.shard``) when the mixture has at least
    ``world_size`` of them. With fewer, every process reads, validates and decodes the whole stream and keeps
    ``1/world_size`` of its batches. A mixture has as many shards as its source with the fewest, and each
    process's DataLoader workers split its shards again (a worker left without one stops). So call this on the
    raw rows of every streamed source, before its adapter, with ``num_shards = world_size * max(1,
    dataloader_num_workers)``: each worker then validates and decodes only the rows of its own shards.

    A stream with enough shards (files) is returned as is. Otherwise Parquet files are split by row group
    (``IterableDataset.reshard``), and if that is still too few, each shard (file) is split by row number
    into ``ceil(num_shards / shards)`` parts: part ``j`` of ``k`` holds the shard's rows ``j, j + k, ...``.
    Each such part reads its whole file, as Arrow batches, and passes on only its own rows. All processes
    must call this with the same arguments, so that they split the rows the same way.

    Example:
        ::

            rows = load_dataset("json", data_files="vqa.jsonl", split="train", streaming=True)  # 1 shard
            samples = vqa_single_samples(reshard_stream(rows, 8 * 4))  # 8 processes with 4 workers each
    """
    if not isinstance(rows, IterableDataset):
        raise TypeError(f"reshard_stream needs a datasets.IterableDataset, got {type(rows).__name__}")
    if rows.num_shards >= num_shards:
        return rows
    rows = rows.reshard()
    if rows.num_shards >= num_shards:
        return rows
    parts_per_shard = math.ceil(num_shards / rows.num_shards)
    parts = [(shard, part) for shard in range(rows.num_shards) for part in range(parts_per_shard)]
    # A list in gen_kwargs is what datasets splits between shards: one (shard, part) pair per shard here.
    return IterableDataset.from_generator(
        _rows_of_parts,
        features=rows.features,
        gen_kwargs={"parts": parts, "rows": rows, "parts_per_shard": parts_per_shard},
    )


def _rows_of_parts(parts: list[tuple[int, int]], rows: IterableDataset, parts_per_shard: int) -> Iterator[dict]:
    for shard, part in parts:
        start = 0
        # Arrow batches: the rows of other parts are dropped before they become Python objects, undecoded.
        for table in rows.shard(rows.num_shards, shard).with_format("arrow").iter(batch_size=256):
            own = pa.array(range((part - start) % parts_per_shard, len(table), parts_per_shard), type=pa.int64())
            start += len(table)
            yield from table.take(own).to_pylist()


def _check_has_a_sample(task: str, samples: Dataset | IterableDataset, report: ValidationReport | None) -> None:
    if isinstance(samples, Dataset):
        if len(samples):
            return
        seen = f"; validation of all sources: {report.summary().splitlines()[0]}" if report is not None else ""
        raise ValueError(
            f"no valid {task!r} sample: its samples are empty (an empty source, or every row was skipped){seen}"
        )
    before = _snapshot(report)
    try:
        next(iter(samples))
    except StopIteration:
        raise ValueError(f"no valid {task!r} sample: {_rows_read(before, report)}") from None
    if report is not None:
        # Training reads these rows again, and counts them then.
        report.rows_seen, report.rows_skipped, report.counts, report.examples = before


def _snapshot(report: ValidationReport | None) -> tuple | None:
    if report is None:
        return None
    examples = {reason: list(entries) for reason, entries in report.examples.items()}
    return report.rows_seen, report.rows_skipped, report.counts.copy(), examples


def _rows_read(before: tuple | None, report: ValidationReport | None) -> str:
    """What reading a stream to its end added to its report (the rows of that stream alone)."""
    if report is None:
        return "the stream yields none (an empty source, or every row was skipped)"
    seen, skipped = report.rows_seen - before[0], report.rows_skipped - before[1]
    if not seen:
        return "the stream is empty"
    reasons = ", ".join(f"{reason} {count}" for reason, count in (report.counts - before[2]).most_common())
    return f"{skipped} of {seen} rows skipped" + (f": {reasons}" if reasons else "")


def _normalised(
    samples_by_task: Mapping[str, Dataset | IterableDataset], proportions: Mapping[str, float] | None
) -> dict[str, float]:
    if proportions is None:
        return default_proportions(samples_by_task)
    missing = [task for task in samples_by_task if task not in proportions]
    extra = [task for task in proportions if task not in samples_by_task]
    if missing or extra:
        raise ValueError(
            f"proportions must name exactly the mixed tasks {list(samples_by_task)}; "
            f"missing {missing}, without samples {extra}"
        )
    if any(not weight >= 0 for weight in proportions.values()):
        raise ValueError(f"proportions must be non-negative, got {dict(proportions)}")
    total = sum(proportions.values())
    if total <= 0:
        raise ValueError("proportions must not all be zero")
    return {task: proportions[task] / total for task in samples_by_task}
