"""``st-viomni demo``: the whole pipeline on the built-in tiny Qwen2-VL and mini mixture, on CPU in minutes.

It builds the tiny base and a viOmni model on it, evaluates on the mini mixture's test split, trains with
``SentenceTransformerTrainer`` + ``PrefixRoutedLoss`` on the train split, evaluates again, saves the model (with
its card) and prints the metrics before and after; ``training.png`` shows the loss per task and the metrics.
It is an ordinary recipe (:data:`DEMO_RECIPE`), run by the same code as ``st-viomni train``.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from .recipe import parse_recipe
from .tasks import TASK_NAMES
from .train import TrainingRun, run_recipe

DEMO_RECIPE: dict[str, Any] = {
    "model": {"base": "tiny", "embedding_dim": 64, "seed": 0},
    "data": {
        "train": [{"mini": 1000, "split": "train"}],
        "eval": [{"mini": 250, "split": "test"}],
        # The mini mixture has as many samples of every task: mix them evenly, so that all of them are used.
        "proportions": {task: 1.0 for task in TASK_NAMES},
        "seed": 0,
    },
    "loss": {"temperature": 0.05},
    "training": {
        "num_train_epochs": 5,
        "per_device_train_batch_size": 32,
        "learning_rate": 1.0e-3,
        "warmup_steps": 0.1,
        "logging_steps": 5,
        "save_strategy": "no",
        "seed": 0,
        "dataloader_drop_last": True,
    },
}


def run_demo(output_dir: str | os.PathLike = "outputs/demo") -> TrainingRun:
    """Run :data:`DEMO_RECIPE` into ``output_dir``, print the metrics table and write ``training.png``."""
    from .plots import plot_run

    raw = copy.deepcopy(DEMO_RECIPE)
    raw["training"]["output_dir"] = os.fspath(output_dir)
    run = run_recipe(parse_recipe(raw, source="demo recipe"))
    print(format_metrics_table(run.before, run.after))
    picture = plot_run(run.log_history, run.before, run.after, os.path.join(output_dir, "training.png"))
    print(f"\nmodel: {run.model_dir}\nplot:  {picture}\nmetrics: {os.path.join(output_dir, 'metrics.json')}")
    return run


def format_metrics_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A plain-text table of every metric before and after training, with the change."""
    rows = [("metric", "before", "after", "change")]
    for name in dict.fromkeys([*before, *after]):
        old, new = before.get(name), after.get(name)
        change = f"{new - old:+.3f}" if old is not None and new is not None else ""
        rows.append((name, _number(old), _number(new), change))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        "  ".join(cell.ljust(width) if column == 0 else cell.rjust(width) for column, (cell, width) in
                  enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
