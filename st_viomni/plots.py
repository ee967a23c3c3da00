"""The demo's picture: training loss per task, and every metric before and after training."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .tasks import TASK_NAMES


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
    logged = [entry for entry in log_history if "loss" in entry and "step" in entry]
    steps = [entry["step"] for entry in logged]
    losses.plot(steps, [entry["loss"] for entry in logged], color="black", linewidth=2, label="loss (batch mean)")
    for task in TASK_NAMES:
        key = f"mean_loss_{task}"
        if any(key in entry for entry in logged):
            losses.plot(steps, [entry.get(key, float("nan")) for entry in logged], label=key)
    losses.set_xlabel("step")
    losses.set_ylabel("training loss (mean over the task's samples)")
    losses.set_title("Training loss per task")
    losses.legend(fontsize=8)

    names = [name for name in before if name in after]
    positions = range(len(names))
    width = 0.4
    metrics.bar([p - width / 2 for p in positions], [before[n] for n in names], width, label="before", color="#bbbbbb")
    metrics.bar([p + width / 2 for p in positions], [after[n] for n in names], width, label="after", color="#2a6fdb")
    metrics.set_xticks(list(positions), names, rotation=35, ha="right", fontsize=8)
    metrics.set_ylim(min(0.0, *[before[n] for n in names], *[after[n] for n in names]), 1.0)
    metrics.set_title("Test metrics before and after training")
    metrics.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return os.fspath(path)
