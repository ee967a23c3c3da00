"""Load the data sources of a training recipe as canonical samples.

A source is a hub dataset, local JSON/JSON-lines or Parquet files, or the built-in mini mixture; its rows go
through the adapter of its task (:mod:`st_viomni.data.adapters`) with the source's column options. Sources of
the same task are concatenated; :func:`load_samples_by_task` returns one canonical dataset per task, ready for
:func:`~st_viomni.data.mixture.mix_tasks`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import datasets
import fsspec
import pyarrow.parquet as pq
from datasets import Dataset, IterableDataset
from datasets.data_files import resolve_pattern

from . import adapters
from .mini import mini_samples
from .mixture import reshard_stream
from ..tasks import TASK_NAMES
from .validation import ValidationReport

if TYPE_CHECKING:
    from ..recipe import SourceRecipe


def load_samples_by_task(
    sources: Sequence[SourceRecipe],
    *,
    streaming: bool = False,
    on_error: str = "skip",
    report: ValidationReport | None = None,
    seed: int = 0,
    num_shards: int = 1,
    shuffle_buffer: int = 10_000,
) -> dict[str, Dataset | IterableDataset]:
    """Canonical samples of every task named by ``sources`` (see the module docstring).

    Before any source is read, the file patterns of every JSON/Parquet source are resolved and the columns
    of each file are compared with those of the source's first file, which ``datasets`` reads every file
    with (see :func:`_check_columns`). A typo in the last source or in the last file of a stream then fails
    at once, naming the source and the file, not hours into a run.

    A streamed source is shuffled with a buffer of ``shuffle_buffer`` samples (``IterableDataset.shuffle``,
    which also shuffles the order of its shards): the buffer is filled, so that many samples (with their
    encoded images) are read and validated before the first one comes out, and held while the stream is read;
    in every ``DataLoader`` worker. With images stored in the files (Parquet bytes) that is about the buffer
    times the average encoded image per image task and worker: 10,000 samples of 100 KB are 1 GB.

    Args:
        sources: Recipe sources.
        streaming: Return ``IterableDataset``s that read rows lazily (hub datasets are streamed, local files and
            the mini mixture are converted).
        on_error: ``"skip"`` bad rows (counted in ``report``) or ``"raise"`` on the first.
        report: Collects the skipped rows.
        seed: Seed of the built-in mini mixture and of the shuffle of each source.
        shuffle_buffer: With ``streaming``, the samples each task's shuffle buffer holds (see above).
        num_shards: With ``streaming``, the fewest shards each source's raw rows are split into before its
            adapter (:func:`~st_viomni.data.mixture.reshard_stream`): the number of processes times their
            DataLoader workers, so that each reads, validates and decodes only its own rows.

    Raises:
        FileNotFoundError: A JSON/Parquet path or glob that matches no file, naming the source and the pattern.
        ValueError: A data file with other columns than its source's first file, naming both files.
    """
    wheres = [f"sources[{index}] (task {source.task!r})" for index, source in enumerate(sources)]
    files = [_data_files(where, source) for where, source in zip(wheres, sources)]
    streams = [_checked_stream(where, source, paths) for where, source, paths in zip(wheres, sources, files)]
    by_task: dict[str, list[Dataset | IterableDataset]] = {}
    for source, paths, stream in zip(sources, files, streams):
        loaded = _load_source(source, paths, stream, streaming, on_error, report, seed, num_shards)
        for task, samples in loaded.items():
            by_task.setdefault(task, []).append(samples)
    merged = {}
    for task, parts in by_task.items():
        combined = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        merged[task] = combined.shuffle(seed=seed, **({"buffer_size": shuffle_buffer} if streaming else {}))
    return merged


def _file_kind(source: SourceRecipe) -> str | None:
    if source.json is not None:
        return "json"
    return "parquet" if source.parquet is not None else None


def _data_files(where: str, source: SourceRecipe) -> list[str]:
    """The files a JSON/Parquet source names (none for other sources), in the order ``datasets`` reads them."""
    kind = _file_kind(source)
    if kind is None:
        return []
    patterns = getattr(source, kind)
    files = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        # load_dataset skips a glob that matches nothing and then fails with a bare StopIteration.
        try:
            files.extend(resolve_pattern(pattern, base_path=os.getcwd()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where}: {kind}: no file matches {pattern!r}") from None
    return files


def _checked_stream(where: str, source: SourceRecipe, files: list[str]) -> IterableDataset | None:
    """The source's files as a stream (which reads only what it needs to infer the columns), after checking
    that every file has its columns; None for sources that are not JSON/Parquet files."""
    kind = _file_kind(source)
    if kind is None:
        return None
    stream = datasets.load_dataset(kind, data_files=files, split=source.split, streaming=True)
    if stream.features is not None:
        _check_columns(where, kind, files, list(stream.features))
    return stream


def _check_columns(where: str, kind: str, files: list[str], columns: list[str]) -> None:
    """Check each file against ``columns``, those ``datasets`` inferred from the first file and casts every file
    to: a Parquet file must have exactly these columns, and a JSON file no other (a missing key is read as
    None, which the adapter reports per row). Anything else makes ``datasets`` fail with a ``CastError`` that
    names no file when the stream reaches that file.

    It reads each Parquet file's footer and each JSON file's first line, so a JSON key that first appears
    further down a later file is not caught here.
    """
    for file in files[1:]:
        try:
            found = _file_columns(kind, file)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"{where}: cannot read the columns of {kind} file {file!r}: {error}") from None
        if found is None:
            continue
        extra = [column for column in found if column not in columns]
        missing = [column for column in columns if column not in found] if kind == "parquet" else []
        differences = [f"has column(s) {extra} that the first file lacks"] if extra else []
        differences += [f"lacks column(s) {missing}"] if missing else []
        if differences:
            raise ValueError(
                f"{where}: {kind} file {file!r} {' and '.join(differences)}; the first file, {files[0]!r}, has "
                f"{columns}, and datasets reads every file of a source with the first file's columns"
            )


def _file_columns(kind: str, file: str) -> list[str] | None:
    """The columns of a Parquet file (its schema) or of a JSON-lines file (its first line's keys); None when
    there is no cheap answer (an empty file, a JSON array or one JSON object), which ``datasets`` then judges."""
    if kind == "parquet":
        with fsspec.open(file, "rb") as opened:
            return pq.read_schema(opened).names
    with fsspec.open(file, "rt", encoding="utf-8-sig", compression="infer") as opened:
        for line in opened:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return None
                return list(first) if isinstance(first, dict) else None
    return None


def _load_source(
    source, files, stream, streaming, on_error, report, seed, num_shards
) -> dict[str, Dataset | IterableDataset]:
    if source.mini is not None:
        tasks = [source.task] if source.task else list(TASK_NAMES)
        samples = {task: mini_samples(task, source.mini, split=source.split, seed=seed) for task in tasks}
        if not streaming:
            return samples
        return {task: reshard_stream(ds.to_iterable_dataset(), num_shards) for task, ds in samples.items()}
    if source.hub is not None:
        rows = datasets.load_dataset(source.hub, source.config, split=source.split, streaming=streaming)
    elif streaming:
        rows = stream
    else:
        rows = datasets.load_dataset(_file_kind(source), data_files=files, split=source.split)
    if streaming:
        rows = reshard_stream(rows, num_shards)
    adapter = getattr(adapters, f"{source.task}_samples")
    return {source.task: adapter(rows, on_error=on_error, report=report, **source.adapter_kwargs)}
