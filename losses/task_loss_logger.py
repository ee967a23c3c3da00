"""TaskLossLogger: each task's mean loss in the trainer's logs, next to ``loss``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from st_viomni.tasks import TASK_NAMES


class TaskLossLogger(TrainerCallback):
    r"""
    Adds ``mean_loss_<task>`` to every training log (and ``eval_mean_loss_<task>`` to every evaluation log with
    an ``eval_dataset``): the mean loss of the samples of that task over the logging window, summed over all
    processes,

    .. math::

        \mathrm{mean\_loss}_t = \frac{\sum_{i \in W,\ t_i = t} L_i}{|\{i \in W: t_i = t\}|}

    where :math:`W` is every sample the loss saw since the previous log and :math:`L_i` its per-sample loss (see
    :class:`~st_viomni.losses.PrefixRoutedLoss`). Tasks absent from the window are left out rather than logged
    as 0. The ``loss_<task>`` components that the loss returns are each task's *share* of the batch loss (they
    add up to ``loss``, as the trainer requires); this callback logs the means, which do not depend on the task
    mixture.

    The loss accumulates the sums and counts as it computes (detached, on its device); this callback reads and
    resets them when the trainer logs, all-reducing them under ``torch.distributed`` (the trainer logs on every
    process). It writes into the logs it is handed and into the matching ``state.log_history`` entry.

    Args:
        loss: A :class:`~st_viomni.losses.PrefixRoutedLoss` or :class:`~st_viomni.losses.CachedPrefixRoutedLoss`
            (anything with ``take_task_loss_totals(split)``).

    Example:
        ::

            from sentence_transformers import SentenceTransformerTrainer

            from st_viomni.losses import PrefixRoutedLoss, TaskLossLogger

            loss = PrefixRoutedLoss(model)
            trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
            TaskLossLogger.attach(trainer)  # before the progress bar and the reporters, so they show the means
            trainer.train()
            print(trainer.state.log_history[-2])  # {'loss': ..., 'loss_ocr': ..., 'mean_loss_ocr': ..., ...}
    """

    def __init__(self, loss: Any) -> None:
        if not hasattr(loss, "take_task_loss_totals"):
            raise TypeError(
                f"TaskLossLogger needs a PrefixRoutedLoss or CachedPrefixRoutedLoss, got {type(loss).__name__}"
            )
        self.loss = loss

    @classmethod
    def attach(cls, trainer: Any) -> TaskLossLogger:
        """Create the logger for ``trainer.loss`` and run it first among the trainer's callbacks.

        Callbacks passed to the trainer run after its own (progress bar, printer, TensorBoard, W&B...), which
        would log before this one added the means; attaching puts it in front of them.
        """
        logger = cls(trainer.loss)
        trainer.callback_handler.callbacks.insert(0, logger)
        return logger

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs) -> None:
        if logs is None:
            return
        if "loss" in logs:
            split, prefix = "train", ""
        elif "eval_loss" in logs:
            split, prefix = "eval", "eval_"
        else:
            return
        totals = self.loss.take_task_loss_totals(split)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every process logs at the same step; one that saw nothing contributes zeros.
            if totals is None:
                totals = torch.zeros(2, len(TASK_NAMES), device=next(self.loss.model.parameters()).device)
            dist.all_reduce(totals)
        if totals is None:
            return
        sums, counts = totals.tolist()
        means = {
            f"{prefix}mean_loss_{name}": round(total / count, 4)
            for name, total, count in zip(TASK_NAMES, sums, counts)
            if count > 0
        }
        logs.update(means)
        # The trainer appended a copy of these logs to the history just before calling the callbacks.
        if state.log_history and state.log_history[-1].get(prefix + "loss") == logs[prefix + "loss"]:
            state.log_history[-1].update(means)
