"""The demo's picture: training loss per task, and every metric before and after training."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .tasks import TASK_NAMES

BATCH_LOSS = "loss (batch mean)"


def plot_run(
    log_history: Sequence[Mapping[str, float]],
    before: Mapping[str, float],
    after: Mapping[str, float],
    path: str | os.PathLike,
) -> str:
    """Write a PNG with two panels (loss per task over steps; metrics before/after) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, metrics) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.3]})
    for label, (steps, values) in loss_curves(log_history).items():
        style = {"color": "black", "linewidth": 2} if label == BATCH_LOSS else {}
        losses.plot(steps, values, label=label, **style)
    losses.set_xlabel("step")
    losses.set_ylabel("training loss (mean over the task's samples)")
    losses.set_title("Training loss per task")
    losses.legend(fontsize=8)

    names = [name for name in before if name in after]
    if names:
        positions = range(len(names))
        width = 0.4
        old, new = [before[n] for n in names], [after[n] for n in names]
        metrics.bar([p - width / 2 for p in positions], old, width, label="before", color="#bbbbbb")
        metrics.bar([p + width / 2 for p in positions], new, width, label="after", color="#2a6fdb")
        metrics.set_xticks(list(positions), names, rotation=35, ha="right", fontsize=8)
        metrics.set_ylim(min([0.0, *old, *new]), 1.0)
        metrics.legend()
    else:
        # A recipe without data.eval has nothing to compare; say so rather than draw empty axes.
        metrics.text(0.5, 0.5, "no evaluation in this run", ha="center", va="center", transform=metrics.transAxes)
    metrics.set_title("Test metrics before and after training")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return os.fspath(path)


def loss_curves(log_history: Sequence[Mapping[str, float]]) -> dict[str, tuple[list[float], list[float]]]:
    """The curves of the loss panel: ``label -> (steps, values)`` for the logged batch loss and each task's
    ``mean_loss_<task>`` (written by :class:`losses.TaskLossLogger`); NaN where a step did not log the task."""
    logged = [entry for entry in log_history if "loss" in entry and "step" in entry]
    steps = [entry["step"] for entry in logged]
    curves = {BATCH_LOSS: (steps, [entry["loss"] for entry in logged])}
    for task in TASK_NAMES:
        key = f"mean_loss_{task}"
        if any(key in entry for entry in logged):
            curves[key] = (steps, [entry.get(key, float("nan")) for entry in logged])
    return curves
