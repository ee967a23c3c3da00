"""Task mixtures: seed proportions, streaming at 11M scale without materialising, determinism."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from datasets import Dataset, IterableDataset

from st_viomni.data import CANONICAL_FEATURES, default_proportions, mini_samples, mix_tasks
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

    def __init__(self, task: str, size: int):
        self.task, self.size, self.pulled = task, size, 0

    def __call__(self):
        for index in range(self.size):
            self.pulled += 1
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
    taken = 20_000

    counts = Counter(sample["task"] for sample in mixture.take(taken))

    assert sum(counts.values()) == taken
    for task, proportion in default_proportions().items():
        expected = taken * proportion
        # Within 4 binomial standard deviations.
        assert abs(counts[task] - expected) < 4 * math.sqrt(expected * (1 - proportion)), (task, counts[task], expected)
    # Only what was read was pulled from the sources (plus at most a prefetched row per source).
    assert sum(source.pulled for source in sources.values()) <= taken + len(sources)


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
