"""Training data for viOmni models: canonical samples, adapters, validation, task mixtures, a mini dataset.

The flow (see DESIGN.md, "How data flows")::

    user rows --adapter--> canonical samples --mix_tasks--> mixture --build_training_dataset--> trainer rows

* :mod:`~st_viomni.data.schema`: the canonical sample (``task, anchor, anchor_images, positive,
  positive_images, score``) and its rules.
* :mod:`~st_viomni.data.adapters`: :func:`text_pair_samples`, :func:`instr_samples`, :func:`ocr_samples`,
  :func:`vqa_single_samples`, :func:`vqa_multi_samples` (one sample per dialogue turn) and
  :func:`validate_samples`.
* :mod:`~st_viomni.data.validation`: ``on_error="raise"|"skip"``, :class:`ValidationReport`.
* :mod:`~st_viomni.data.dialogue`: :func:`render_dialogue`, how a dialogue history becomes anchor text.
* :mod:`~st_viomni.data.mixture`: :func:`mix_tasks`, :func:`default_proportions`, :func:`reshard_stream` (a
  stream's rows in enough shards for every process and DataLoader worker).
* :mod:`~st_viomni.data.training`: :func:`build_training_dataset` (``anchor, positive, label`` rows rendered
  with ``format_input`` and ``make_label``).
* :mod:`~st_viomni.data.mini`: :func:`mini_mixture`, a small deterministic Vietnamese/English dataset of all
  five tasks with synthetic images.

Example:
    ::

        from st_viomni.data import build_training_dataset, mini_mixture

        train_dataset = build_training_dataset(mini_mixture(200, split="train", seed=0))
        test_samples = mini_mixture(50, split="test", seed=0)
"""

from .adapters import (
    instr_samples,
    ocr_samples,
    text_pair_samples,
    validate_samples,
    vqa_multi_samples,
    vqa_single_samples,
)
from .dialogue import expand_turns, parse_conversation, render_dialogue
from .mini import mini_mixture, mini_samples
from .mixture import default_proportions, mix_tasks, reshard_stream
from .schema import CANONICAL_COLUMNS, CANONICAL_FEATURES, REASONS, RowProblem, check_sample
from .training import TRAINING_COLUMNS, TRAINING_FEATURES, build_training_dataset, render_sample
from .validation import InvalidRowError, ValidationReport

__all__ = [
    "CANONICAL_COLUMNS",
    "CANONICAL_FEATURES",
    "REASONS",
    "TRAINING_COLUMNS",
    "TRAINING_FEATURES",
    "InvalidRowError",
    "RowProblem",
    "ValidationReport",
    "build_training_dataset",
    "check_sample",
    "default_proportions",
    "expand_turns",
    "instr_samples",
    "mini_mixture",
    "mini_samples",
    "mix_tasks",
    "ocr_samples",
    "parse_conversation",
    "render_dialogue",
    "render_sample",
    "reshard_stream",
    "text_pair_samples",
    "validate_samples",
    "vqa_multi_samples",
    "vqa_single_samples",
]
