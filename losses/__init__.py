"""Losses of st-viomni, imported as ``st_viomni.losses``.

* :class:`PrefixRoutedLoss`: viOmniQwen's per-sample task-routed loss (symmetric InfoNCE plus a term chosen by
  each sample's task, which its label carries and its text's prefix names), with optional cross-device negatives.
* :class:`CachedPrefixRoutedLoss`: the same loss with GradCache, for large batches.
* :class:`TaskLossLogger`: a trainer callback that logs each task's mean loss.
* :func:`make_label`: the ``label`` column value of a training row (task, gold score, positive identity); the
  data adapters call it for every row.
"""

from .cached_prefix_routed import CachedPrefixRoutedLoss
from .labels import decode_labels, make_label, positive_key
from .prefix_routed import DEFAULT_MARGINS, PrefixRoutedLoss
from .task_loss_logger import TaskLossLogger
from .vision_graph import keep_vision_tower_in_graph, remove_vision_tower_hook

__all__ = [
    "DEFAULT_MARGINS",
    "CachedPrefixRoutedLoss",
    "PrefixRoutedLoss",
    "TaskLossLogger",
    "decode_labels",
    "keep_vision_tower_in_graph",
    "make_label",
    "positive_key",
    "remove_vision_tower_hook",
]
