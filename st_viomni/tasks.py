"""The one place where viOmni's five tasks are defined.

Each task has a literal prefix that is prepended to the textual input, identically in training and at
``encode`` time, and the settings the loss needs to treat its samples. Everything else in st-viomni
(formatting, prompts saved with a model, data adapters, :class:`~st_viomni.losses.PrefixRoutedLoss`)
reads this registry; nothing else spells a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LossKind = Literal["scored", "cosine", "triplet"]


@dataclass(frozen=True)
class Task:
    """A viOmni task.

    Args:
        name: Task name, also the ``prompt_name`` to pass to ``model.encode``.
        prefix: Literal prefix placed at the start of the user's text.
        description: When to use the task (shown in the model card).
        loss: Which term joins symmetric InfoNCE for samples of this task: ``"scored"`` (InfoNCE weighted
            by the gold score plus MSE between cosine and score), ``"cosine"`` (plus 1 - cosine) or
            ``"triplet"`` (plus a margin hinge against the hardest in-batch negative).
        margin: Triplet margin for ``loss="triplet"`` tasks, in cosine units; None otherwise.
        seed_samples: Number of samples of this task in the seed's 11M-sample training mixture; the default
            mixing proportions are derived from it.
    """

    name: str
    prefix: str
    description: str
    loss: LossKind
    margin: float | None
    seed_samples: int


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="text_pair",
            prefix="<text_pair>",
            description="Text-text semantic similarity with a graded score in [0, 1].",
            loss="scored",
            margin=None,
            seed_samples=5_600_000,
        ),
        Task(
            name="instr",
            prefix="<instr>",
            description="Instruction-following: an instruction and its response.",
            loss="cosine",
            margin=None,
            seed_samples=600_000,
        ),
        Task(
            name="ocr",
            prefix="<ocr>",
            description="OCR / OCQ: image(s) of text plus a query, matched to the answer.",
            loss="triplet",
            margin=0.2,
            seed_samples=2_500_000,
        ),
        Task(
            name="vqa_single",
            prefix="<vqa_single>",
            description="Single-turn visual question answering: image(s) plus a question, matched to the answer.",
            loss="triplet",
            margin=0.2,
            # The seed gives 2.5M VQA samples for single- and multi-turn together; we split them evenly.
            seed_samples=1_250_000,
        ),
        Task(
            name="vqa_multi",
            prefix="<vqa_multi>",
            description="Multi-turn visual question answering: image(s), earlier turns and the current question.",
            loss="triplet",
            # Multi-turn anchors share images and history, so their hardest negatives sit closer: the seed
            # allows a different margin for them.
            margin=0.3,
            seed_samples=1_250_000,
        ),
    )
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)
PREFIXES: dict[str, str] = {name: task.prefix for name, task in TASKS.items()}


def get_task(name: str) -> Task:
    """Return the task called ``name``, or raise a ``ValueError`` that lists the known tasks."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}") from None
