"""Load the data sources of a training recipe as canonical samples.

A source is a hub dataset, local JSON/JSON-lines or Parquet files, or the built-in mini mixture; its rows go
through the adapter of its task (:mod:`st_viomni.data.adapters`) with the source's column options. Sources of
the same task are concatenated; :func:`load_samples_by_task` returns one canonical dataset per task, ready for
:func:`~st_viomni.data.mixture.mix_tasks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import datasets
from datasets import Dataset, IterableDataset

from . import adapters
from .mini import mini_samples
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
) -> dict[str, Dataset | IterableDataset]:
    """Canonical samples of every task named by ``sources`` (see the module docstring).

    Args:
        sources: Recipe sources.
        streaming: Return ``IterableDataset``s that read rows lazily (hub datasets are streamed, local files and
            the mini mixture are converted).
        on_error: ``"skip"`` bad rows (counted in ``report``) or ``"raise"`` on the first.
        report: Collects the skipped rows.
        seed: Seed of the built-in mini mixture and of the shuffle of each source.
    """
    by_task: dict[str, list[Dataset | IterableDataset]] = {}
    for source in sources:
        for task, samples in _load_source(source, streaming, on_error, report, seed).items():
            by_task.setdefault(task, []).append(samples)
    merged = {}
    for task, parts in by_task.items():
        combined = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        merged[task] = combined.shuffle(seed=seed, **({"buffer_size": 10_000} if streaming else {}))
    return merged


def _load_source(source, streaming, on_error, report, seed) -> dict[str, Dataset | IterableDataset]:
    if source.mini is not None:
        tasks = [source.task] if source.task else list(TASK_NAMES)
        samples = {task: mini_samples(task, source.mini, split=source.split, seed=seed) for task in tasks}
        return {task: ds.to_iterable_dataset() if streaming else ds for task, ds in samples.items()}
    if source.hub is not None:
        rows = datasets.load_dataset(source.hub, source.config, split=source.split, streaming=streaming)
    else:
        kind = "json" if source.json is not None else "parquet"
        files = source.json if source.json is not None else source.parquet
        rows = datasets.load_dataset(kind, data_files=files, split=source.split, streaming=streaming)
    adapter = getattr(adapters, f"{source.task}_samples")
    return {source.task: adapter(rows, on_error=on_error, report=report, **source.adapter_kwargs)}
