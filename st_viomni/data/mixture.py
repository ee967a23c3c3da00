"""Mix per-task canonical samples by proportion, so that every batch mixes tasks.

The seed trains on ~11M samples: 5.6M ``text_pair``, 0.6M ``instr``, 2.5M ``ocr`` and 2.5M VQA (split evenly
here into ``vqa_single`` and ``vqa_multi``). :func:`default_proportions` turns those counts into sampling
probabilities; :func:`mix_tasks` draws each next sample from a task chosen with these probabilities
(``datasets.interleave_datasets``, seeded), which works the same for ``Dataset`` and streaming
``IterableDataset`` sources. With streams nothing is read ahead: the mixture pulls one sample at a time from
the chosen source, so an 11M-sample mixture holds one sample (and its images, decoded when it is read) at a
time, whatever its length.

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

from collections.abc import Iterable, Mapping
from typing import Literal

from datasets import Dataset, IterableDataset, interleave_datasets

from ..tasks import TASK_NAMES, TASKS, get_task
from .schema import CANONICAL_FEATURES

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

    Returns:
        One dataset of canonical samples, of the same kind as the sources.
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
    if len(tasks) == 1:
        return samples_by_task[tasks[0]]
    return interleave_datasets(
        [samples_by_task[task] for task in tasks],
        probabilities=[weights[task] for task in tasks],
        seed=seed,
        stopping_strategy=stopping_strategy,
    )


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
