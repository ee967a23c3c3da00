"""PrefixRoutedLoss: viOmni's per-sample, task-routed mix of symmetric InfoNCE, MSE, cosine and triplet terms."""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.util import all_gather, all_gather_with_grad, get_rank, get_world_size
from torch import Tensor, nn

from st_viomni.deferred_pixels import has_deferred_pixels, image_processor_of, with_pixels
from st_viomni.tasks import TASK_NAMES, TASKS, get_task

from .labels import decode_labels
from .vision_graph import keep_vision_tower_in_graph

DEFAULT_MARGINS: dict[str, float] = {name: task.margin for name, task in TASKS.items() if task.loss == "triplet"}
"""Triplet margins by task, from :mod:`st_viomni.tasks` (``ocr`` 0.2, ``vqa_single`` 0.2, ``vqa_multi`` 0.3)."""


@dataclass(frozen=True)
class _RoutedBatch:
    """Everything the per-sample losses of one batch need, prepared once and read chunk by chunk.

    ``anchors``/``positives``/``negatives`` are L2-normalised and, with ``gather_across_devices``, gathered from
    every process (``world_size * batch_size`` rows, this process's rows starting at ``offset``). The per-row
    coefficients cover this process's rows only.
    """

    anchors: Tensor
    positives: Tensor
    negatives: tuple[Tensor, ...]
    positive_keys: Tensor | None
    offset: int
    batch_size: int
    info_weight: Tensor
    mse_weight: Tensor
    target_score: Tensor
    cosine_weight: Tensor
    triplet_weight: Tensor
    margin: Tensor

    def embeddings(self) -> list[Tensor]:
        return [self.anchors, self.positives, *self.negatives]

    def with_embeddings(self, embeddings: Sequence[Tensor]) -> _RoutedBatch:
        return replace(self, anchors=embeddings[0], positives=embeddings[1], negatives=tuple(embeddings[2:]))


class PrefixRoutedLoss(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = 0.05,
        mse_weight: float = 1.0,
        cosine_weight: float = 1.0,
        triplet_weight: float = 1.0,
        margins: Mapping[str, float] | None = None,
        gather_across_devices: bool = False,
        log_task_components: bool = True,
    ) -> None:
        r"""
        viOmniQwen's prefix-guided mixed loss: every sample is scored by the loss of its own task, and the batch
        loss is the mean over samples, so one batch can mix text pairs, instructions, OCR and VQA samples.

        For a batch of :math:`B` samples with anchor embeddings :math:`a_i`, positive embeddings :math:`p_i`, task
        :math:`t_i` and, for ``text_pair``, a gold score :math:`s_i \in [0, 1]`:

        * :math:`c_{ij} = \cos(a_i, p_j)` and :math:`S_{ij} = c_{ij} / \tau` (``temperature``).
        * Negatives of sample :math:`i`, :math:`N(i)`: every other positive :math:`p_j` (:math:`j \ne i`) *except*
          those identical to :math:`p_i` (same text and same images, e.g. two VQA answers "đỏ"): an identical
          positive is never pushed away. Hard-negative columns, when present, add every row's hard negatives to
          every sample's :math:`N(i)` (in the row direction and among the triplet candidates). Only positives
          carry an identity key, so hard negatives are never masked: mine them so that none equals its positive.
        * Symmetric InfoNCE: :math:`\mathrm{row}_i = -\log \frac{e^{S_{ii}}}{e^{S_{ii}} + \sum_{j \in N(i)}
          e^{S_{ij}}}`, :math:`\mathrm{col}_i = -\log \frac{e^{S_{ii}}}{e^{S_{ii}} + \sum_{j \in M(i)} e^{S_{ji}}}`
          over the anchors :math:`a_j` whose positive is not identical to :math:`p_i` (:math:`M(i)`), and
          :math:`\mathrm{info}_i = (\mathrm{row}_i + \mathrm{col}_i) / 2`.
        * Per task (``TASKS[t].loss`` in :mod:`st_viomni.tasks`):

          - ``text_pair`` (``"scored"``): :math:`L_i = s_i \cdot \mathrm{info}_i + w_{mse} (c_{ii} - s_i)^2`. A pair
            scored 0 is not pulled together; the MSE term aligns the cosine with the score.
          - ``instr`` (``"cosine"``): :math:`L_i = \mathrm{info}_i + w_{cos} (1 - c_{ii})`.
          - ``ocr``, ``vqa_single``, ``vqa_multi`` (``"triplet"``): :math:`L_i = \mathrm{info}_i + w_{tri}
            \max(0, m_{t_i} - c_{ii} + \max_{j \in N(i)} c_{ij})` with a margin per task; the hinge is 0 when
            :math:`N(i)` is empty.

        * :math:`\mathcal{L} = \frac{1}{B} \sum_i L_i`.

        With ``gather_across_devices=True`` every process scores its own rows against the anchors, positives and
        hard negatives of all processes (identical positives are masked across processes too), so the mean of
        the processes' losses equals the loss of the concatenated batch. Every process must have the same batch
        size (``dataloader_drop_last=True``).

        How task and score reach the loss: sentence-transformers' collator turns only the ``label`` (or
        ``labels``/``score``/``scores``) column into labels and feeds every other column to the model, so each row
        carries ``label = make_label(task, score, positive_text, positive_images)`` (see
        :mod:`st_viomni.losses.labels`): ``[task_index, score or NaN, positive_key_high, positive_key_low]``. The
        positive key is a content hash of the positive's text and images; rows with equal keys have identical
        positives.

        The loss routes each sample by its label's task, not by its text: it never reads the task prefix. The
        label and the prefix must therefore name the same task, which :func:`st_viomni.format_input` and
        :func:`~st_viomni.losses.make_label` called with the same task (as in the example below), or st-viomni's
        data adapters, guarantee. A row whose prefix names another task than its label (or that has no prefix)
        is trained, without an error, with the loss of its label's task.

        Logged per task:

        * ``loss_<task>``: ``forward`` returns one tensor per task, that task's share of the batch loss,
          :math:`\frac{1}{B} \sum_{i: t_i = t} L_i` (0 when the task is absent). The trainer logs each next to
          ``loss`` (averaged over the logging window) and sums them for the backward pass: they add up to
          ``loss``. All five are always returned, so that every process logs the same keys under DDP.
        * ``mean_loss_<task>``: the mean loss of the task's samples over the logging window (and all processes),
          :math:`\sum_{i: t_i = t} L_i / |\{i: t_i = t\}|`, for each task present in the window. The trainer sums
          every returned value into the loss, so these cannot travel as components: the loss accumulates them and
          :class:`~st_viomni.losses.TaskLossLogger` adds them to the trainer's logs (``TaskLossLogger.attach(trainer)``;
          ``st-viomni train`` and the demo attach it).

        Args:
            model: The SentenceTransformer model (Qwen2-VL -> mean pooling -> Dense -> Normalize). Only
                ``forward`` uses it; ``compute_loss_from_embeddings`` works on given embeddings.
            temperature: :math:`\tau` of the InfoNCE terms (``scale = 1 / temperature`` in sentence-transformers'
                MultipleNegativesRankingLoss); a finite positive number.
            mse_weight: :math:`w_{mse}`, weight of the ``text_pair`` MSE term. Each weight is a finite
                non-negative number; 0 turns its term off.
            cosine_weight: :math:`w_{cos}`, weight of the ``instr`` cosine term.
            triplet_weight: :math:`w_{tri}`, weight of the triplet hinge of ``ocr``/``vqa_single``/``vqa_multi``.
            margins: Triplet margins by task name, overriding :data:`DEFAULT_MARGINS` (which come from
                :mod:`st_viomni.tasks`: ``ocr`` 0.2, ``vqa_single`` 0.2, ``vqa_multi`` 0.3); only triplet tasks,
                each a finite non-negative number (a number: a string such as ``"0.2"`` is refused, not parsed).
                A bad value raises a ``ValueError`` naming it (``margins['ocr']``), as a bad weight does.
            gather_across_devices: Score every process's rows against the whole distributed batch (see above).
            log_task_components: Return the per-task components from ``forward`` (a dict the trainer logs) instead
                of one scalar. Wrapper losses that add up the result of this loss (e.g. ``MatryoshkaLoss``) need a
                scalar; the loss returns one automatically when such a wrapper has patched the model's forward.

        Under DDP a batch without any image leaves Qwen2-VL's vision tower without gradient, which DDP rejects;
        constructing the loss installs :func:`st_viomni.losses.vision_graph.keep_vision_tower_in_graph` on the
        model, which keeps the vision tower in the graph of such batches (only while training under
        ``torch.distributed`` with more than one process).

        References:
            - viOmniQwen, "Prefix-Guided Dynamic Mixed-Loss Optimization" (the seed document).
            - Representation Learning with Contrastive Predictive Coding (InfoNCE):
              https://huggingface.co/papers/1807.03748
            - FaceNet (triplet loss with hardest negatives): https://huggingface.co/papers/1503.03832

        Requirements:
            1. (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples.
            2. A ``label`` column made by :func:`st_viomni.losses.make_label`, one per row.
            3. With ``gather_across_devices``: equal per-process batch sizes (``dataloader_drop_last=True``).

        Inputs:
            +-------------------------------------------------+--------------------------------------------+
            | Texts                                           | Labels                                     |
            +=================================================+============================================+
            | (anchor, positive) pairs                        | ``make_label(task, score, positive, imgs)`` |
            +-------------------------------------------------+--------------------------------------------+
            | (anchor, positive, negative_1, ..., negative_n) | ``make_label(task, score, positive, imgs)`` |
            +-------------------------------------------------+--------------------------------------------+

            Anchors and positives are what :func:`st_viomni.format_input` returns: a string, or
            ``{"image": [...], "text": "<prefix> text"}`` (type image columns as ``datasets.Image()`` lists).

        Relations:
            - :class:`CachedPrefixRoutedLoss` computes the same loss and gradients with GradCache, for batches
              that do not fit in memory at once.
            - The InfoNCE part is sentence-transformers' ``MultipleNegativesRankingLoss`` with
              ``directions=("query_to_doc", "doc_to_query")``, ``partition_mode="per_direction"`` and
              ``scale = 1 / temperature``, plus identical-positive masking.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformerTrainer

                from st_viomni import build_model, format_input
                from st_viomni.losses import PrefixRoutedLoss, make_label
                from st_viomni.testing import make_tiny_base_model

                model = build_model(make_tiny_base_model("/tmp/tiny-qwen2-vl"), embedding_dim=32)
                rows = [
                    ("text_pair", "The cat sat on the mat.", "A cat rests on a rug.", 0.8),
                    ("text_pair", "He drove to work.", "It is raining.", 0.0),
                    ("instr", "Translate to English: xin chào", "hello", None),
                    ("vqa_single", "What colour is the sky?", "blue", None),
                ]
                train_dataset = Dataset.from_list([
                    {
                        "anchor": format_input(task, anchor),
                        "positive": format_input(task, positive),
                        "label": make_label(task, score, positive),
                    }
                    for task, anchor, positive, score in rows
                ])
                loss = PrefixRoutedLoss(model)
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
                trainer.train()
        """
        super().__init__()
        self.model = model
        self.temperature = _hyperparameter("temperature", temperature, positive=True)
        self.mse_weight = _hyperparameter("mse_weight", mse_weight)
        self.cosine_weight = _hyperparameter("cosine_weight", cosine_weight)
        self.triplet_weight = _hyperparameter("triplet_weight", triplet_weight)
        self.margins = _resolve_margins(margins)
        self.gather_across_devices = gather_across_devices
        self.log_task_components = log_task_components
        # Per-task sums and counts of L_i since TaskLossLogger last read them, for training and for evaluation.
        self._task_loss_totals: dict[str, Tensor] = {}
        keep_vision_tower_in_graph(model)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> dict[str, Tensor] | Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"PrefixRoutedLoss needs an anchor and a positive column, got {len(sentence_features)}")
        tasks, scores, positive_keys = decode_labels(labels)
        self.validate_rows(tasks, scores)  # before paying for the forward pass
        sentence_features = [
            with_pixels(feature, image_processor_of(self.model)) if has_deferred_pixels(feature) else feature
            for feature in sentence_features
        ]
        embeddings = embed_columns(self.model, sentence_features)
        per_sample = self.per_sample_losses(
            embeddings[0], embeddings[1], tasks, scores, positive_keys, negatives=embeddings[2:]
        )
        self.accumulate_task_losses(per_sample, tasks)
        if not self.log_task_components or _forward_is_patched(self.model):
            return per_sample.mean()
        return self.task_components(per_sample, tasks)

    def compute_loss_from_embeddings(
        self,
        anchors: Tensor,
        positives: Tensor,
        tasks: Sequence[str],
        scores: Tensor | Sequence[float] | None = None,
        positive_ids: Sequence[Hashable] | Tensor | None = None,
        negatives: Sequence[Tensor] = (),
    ) -> Tensor:
        """The batch loss (the formula in the class docstring) on given embeddings.

        Args:
            anchors: ``(B, dim)`` anchor embeddings (normalised here; cosine similarity is used).
            positives: ``(B, dim)`` positive embeddings.
            tasks: ``B`` task names.
            scores: ``B`` gold scores, NaN where the task has none; None when no row is a ``text_pair``.
            positive_ids: One hashable per sample (ints are used as they are, other values by a stable hash of
                their ``repr``); samples with equal ids have identical positives and are not each other's
                negatives. None: no masking. With ``gather_across_devices`` pass ints or strings so that every
                process agrees on them.
            negatives: Hard-negative columns, each ``(B, dim)``.

        Returns:
            The mean of the per-sample losses, a scalar.

        Raises:
            ValueError: An unknown task, a ``text_pair`` row without a score or with a NaN or out-of-range score,
                a score on a row of another task, or mismatched shapes; the message names the row.
        """
        return self.per_sample_losses(anchors, positives, tasks, scores, positive_ids, negatives).mean()

    def per_sample_losses(
        self,
        anchors: Tensor,
        positives: Tensor,
        tasks: Sequence[str],
        scores: Tensor | Sequence[float] | None = None,
        positive_ids: Sequence[Hashable] | Tensor | None = None,
        negatives: Sequence[Tensor] = (),
    ) -> Tensor:
        """:math:`L_i` of every local sample, shape ``(B,)``; arguments as in :meth:`compute_loss_from_embeddings`."""
        batch = self.prepare_batch(anchors, positives, tasks, scores, positive_ids, negatives)
        return self.chunk_losses(batch, 0, batch.batch_size)

    def task_components(self, per_sample: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        """``{"loss_<task>": sum of L_i over the task's rows / B}`` for every task; the values add up to the mean."""
        batch_size = per_sample.numel()
        task_of_row = torch.tensor([TASK_NAMES.index(task) for task in tasks], device=per_sample.device)
        return {
            f"loss_{name}": per_sample[task_of_row == index].sum() / batch_size
            for index, name in enumerate(TASK_NAMES)
        }

    def accumulate_task_losses(self, per_sample: Tensor, tasks: Sequence[str]) -> None:
        """Add a batch's :math:`L_i` to the per-task sums and counts that :meth:`take_task_loss_totals` returns
        (kept apart for training and evaluation, by the model's mode)."""
        split = "train" if self.model.training else "eval"
        task_of_row = torch.tensor([TASK_NAMES.index(task) for task in tasks], device=per_sample.device)
        totals = self._task_loss_totals.get(split)
        if totals is None:
            totals = self._task_loss_totals[split] = per_sample.new_zeros(2, len(TASK_NAMES), dtype=torch.float32)
        with torch.no_grad():
            totals[0].index_add_(0, task_of_row, per_sample.detach().float())
            totals[1].index_add_(0, task_of_row, torch.ones_like(task_of_row, dtype=torch.float32))

    def take_task_loss_totals(self, split: str = "train") -> Tensor | None:
        """The ``(2, number of tasks)`` sums and counts of :math:`L_i` accumulated in ``split`` (``"train"`` or
        ``"eval"``) since the last call, in :data:`~st_viomni.tasks.TASK_NAMES` order; None if nothing was."""
        return self._task_loss_totals.pop(split, None)

    def prepare_batch(
        self,
        anchors: Tensor,
        positives: Tensor,
        tasks: Sequence[str],
        scores: Tensor | Sequence[float] | None = None,
        positive_ids: Sequence[Hashable] | Tensor | None = None,
        negatives: Sequence[Tensor] = (),
    ) -> _RoutedBatch:
        """Validate the rows, normalise (and, with ``gather_across_devices``, gather) the embeddings once."""
        batch_size = anchors.shape[0]
        negatives = tuple(negatives)
        for name, tensor in (("positives", positives), *((f"negatives[{k}]", n) for k, n in enumerate(negatives))):
            if tensor.shape != anchors.shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, anchors {tuple(anchors.shape)}")
        if anchors.dim() != 2:
            raise ValueError(f"anchors must be (batch, dim), got shape {tuple(anchors.shape)}")
        device = anchors.device
        compute_dtype = torch.promote_types(anchors.dtype, torch.float32)
        coefficients = self._row_coefficients(tasks, scores, batch_size, device, compute_dtype)
        positive_keys = _positive_keys(positive_ids, batch_size, device)

        embeddings = [anchors, positives, *negatives]
        offset = 0
        if self.gather_across_devices and get_world_size() > 1:
            sizes = all_gather(torch.tensor([batch_size], device=device))
            if bool((sizes != batch_size).any()):
                raise ValueError(
                    "gather_across_devices needs the same batch size on every process, got "
                    f"{sizes.tolist()}; drop the last partial batch (dataloader_drop_last=True)"
                )
            embeddings = [all_gather_with_grad(embedding) for embedding in embeddings]
            if positive_keys is not None:
                positive_keys = all_gather(positive_keys)
            offset = get_rank() * batch_size
        # Cosine similarity throughout, computed in at least float32 whatever the training precision.
        embeddings = [F.normalize(embedding.to(compute_dtype), dim=-1) for embedding in embeddings]
        return _RoutedBatch(
            anchors=embeddings[0],
            positives=embeddings[1],
            negatives=tuple(embeddings[2:]),
            positive_keys=positive_keys,
            offset=offset,
            batch_size=batch_size,
            **coefficients,
        )

    def chunk_losses(self, batch: _RoutedBatch, begin: int, end: int) -> Tensor:
        """:math:`L_i` for this process's rows ``begin:end`` of a prepared batch, shape ``(end - begin,)``."""
        device = batch.anchors.device
        num_rows, world_rows = end - begin, batch.anchors.shape[0]
        rows = torch.arange(begin, end, device=device) + batch.offset  # indices into the (gathered) batch
        local = torch.arange(num_rows, device=device)

        candidates = torch.cat([batch.positives, *batch.negatives])
        row_cosine = batch.anchors[rows] @ candidates.T  # (r, world_rows * (1 + number of negative columns))
        col_cosine = batch.positives[rows] @ batch.anchors.T  # (r, world_rows): every anchor against p_i
        positive_cosine = row_cosine[local, rows]

        own = torch.zeros(num_rows, world_rows, dtype=torch.bool, device=device)
        own[local, rows] = True
        if batch.positive_keys is None:
            identical = torch.zeros_like(own)
        else:
            identical = (batch.positive_keys[rows, None] == batch.positive_keys[None, :]) & ~own
        # Hard-negative columns are never masked: only positives carry an identity key.
        hard_negatives = torch.zeros(num_rows, candidates.shape[0] - world_rows, dtype=torch.bool, device=device)
        not_in_infonce = torch.cat([identical, hard_negatives], dim=1)  # the positive itself stays in
        not_a_negative = torch.cat([own | identical, hard_negatives], dim=1)

        positive_logit = positive_cosine / self.temperature
        row_term = torch.logsumexp((row_cosine / self.temperature).masked_fill(not_in_infonce, -torch.inf), 1)
        col_term = torch.logsumexp((col_cosine / self.temperature).masked_fill(identical, -torch.inf), 1)
        info = ((row_term - positive_logit) + (col_term - positive_logit)) / 2

        hardest = row_cosine.masked_fill(not_a_negative, -torch.inf).max(dim=1).values
        has_negative = torch.isfinite(hardest)
        zero = torch.zeros_like(hardest)
        # A row without negatives has hardest = -inf: keep it out of the arithmetic (and a NaN out of the gradient).
        hardest = torch.where(has_negative, hardest, zero)
        hinge = torch.where(has_negative, F.relu(batch.margin[begin:end] - positive_cosine + hardest), zero)

        return (
            batch.info_weight[begin:end] * info
            + batch.mse_weight[begin:end] * (positive_cosine - batch.target_score[begin:end]) ** 2
            + batch.cosine_weight[begin:end] * (1 - positive_cosine)
            + batch.triplet_weight[begin:end] * hinge
        )

    def validate_rows(self, tasks: Sequence[str], scores: Tensor | Sequence[float] | None = None) -> None:
        """Raise a ``ValueError`` naming the first bad row: an unknown task, a ``text_pair`` row without a score
        in [0, 1] (missing, NaN or out of range), or a score on a row of another task."""
        self._row_coefficients(tasks, scores, len(tasks), torch.device("cpu"))

    def _row_coefficients(
        self,
        tasks: Sequence[str],
        scores: Tensor | Sequence[float] | None,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, Tensor]:
        """Turn each row's task and score into the weights of the four terms, raising on a bad row."""
        if isinstance(tasks, str) or len(tasks) != batch_size:
            raise ValueError(f"expected {batch_size} task names (one per row), got {tasks!r}")
        if scores is None:
            score_values = [float("nan")] * batch_size
        else:
            score_values = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).tolist()
            if len(score_values) != batch_size:
                raise ValueError(f"expected {batch_size} scores (one per row), got {len(score_values)}")
        columns: dict[str, list[float]] = {key: [] for key in _COEFFICIENT_NAMES}
        for row, (task_name, score) in enumerate(zip(tasks, score_values)):
            try:
                task = get_task(task_name)
            except ValueError as error:
                raise ValueError(f"row {row}: {error}") from None
            has_score = score == score  # not NaN
            if task.loss == "scored":
                if not has_score:
                    raise ValueError(f"row {row}: task {task.name!r} needs a gold score in [0, 1], got none (NaN)")
                if not 0.0 <= score <= 1.0:
                    raise ValueError(f"row {row}: task {task.name!r} needs a gold score in [0, 1], got {score}")
            elif has_score:
                raise ValueError(f"row {row}: task {task.name!r} takes no score (only text_pair does), got {score}")
            columns["info_weight"].append(score if task.loss == "scored" else 1.0)
            columns["mse_weight"].append(self.mse_weight if task.loss == "scored" else 0.0)
            columns["target_score"].append(score if task.loss == "scored" else 0.0)
            columns["cosine_weight"].append(self.cosine_weight if task.loss == "cosine" else 0.0)
            columns["triplet_weight"].append(self.triplet_weight if task.loss == "triplet" else 0.0)
            columns["margin"].append(self.margins.get(task.name, 0.0))
        return {key: torch.tensor(values, dtype=dtype, device=device) for key, values in columns.items()}

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "mse_weight": self.mse_weight,
            "cosine_weight": self.cosine_weight,
            "triplet_weight": self.triplet_weight,
            "margins": dict(self.margins),
            "gather_across_devices": self.gather_across_devices,
        }

    @property
    def citation(self) -> str:
        return """
@misc{viOmniQwen_github_2024,
    author = {Steve Nguyen Anh Nguyen and the EraX AI Team},
    title = {viOmniQwen: Unified Multimodal Embeddings via Prefix-Guided Dynamic Loss Optimization},
    year = {2024},
    publisher = {GitHub},
    howpublished = {\\url{https://github.com/EraX-AI/viOmniQwen}}
}
@misc{oord2019representationlearningcontrastivepredictive,
    title = {Representation Learning with Contrastive Predictive Coding},
    author = {Aaron van den Oord and Yazhe Li and Oriol Vinyals},
    year = {2019},
    eprint = {1807.03748},
    archivePrefix = {arXiv},
    primaryClass = {cs.LG}
}
"""


_COEFFICIENT_NAMES = ("info_weight", "mse_weight", "target_score", "cosine_weight", "triplet_weight", "margin")


def _resolve_margins(margins: Mapping[str, float] | None) -> dict[str, float]:
    resolved = dict(DEFAULT_MARGINS)
    for name, margin in (margins or {}).items():
        task = get_task(name)
        if task.loss != "triplet":
            raise ValueError(
                f"margins: task {name!r} has no triplet term; margins apply to {sorted(DEFAULT_MARGINS)}"
            )
        resolved[name] = _hyperparameter(f"margins[{name!r}]", margin)
    return resolved


def _hyperparameter(name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a float if it is a finite real number, >= 0 (> 0 with ``positive``); else a ``ValueError``
    naming it. Strings are refused, not parsed, as the recipe loader refuses them for the weights. A NaN or infinite
    value would make the loss NaN or inf, which the trainer's logs hide by default (``logging_nan_inf_filter``)."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def _positive_keys(
    positive_ids: Sequence[Hashable] | Tensor | None, batch_size: int, device: torch.device
) -> Tensor | None:
    if positive_ids is None:
        return None
    if isinstance(positive_ids, Tensor):
        positive_ids = positive_ids.reshape(-1).tolist()
    positive_ids = list(positive_ids)
    if len(positive_ids) != batch_size:
        raise ValueError(f"expected {batch_size} positive ids (one per row), got {len(positive_ids)}")
    return torch.tensor([_stable_key(value) for value in positive_ids], dtype=torch.int64, device=device)


def _stable_key(value: Hashable) -> int:
    # Python's hash() of a string differs between processes; a process-independent key lets gathered rows
    # compare their positives.
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and -(2**63) <= int(value) < 2**63:
        return int(value)
    digest = hashlib.blake2b(repr(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _forward_is_patched(model: nn.Module) -> bool:
    # MatryoshkaLoss replaces the model's forward for the duration of its call and adds up the tensors this loss
    # returns: a dict would break it. (Accelerate also patches `forward` under mixed precision, so only
    # Matryoshka's decorator counts.)
    from sentence_transformers.sentence_transformer.losses.matryoshka import ForwardDecorator

    return isinstance(getattr(model, "forward", None), ForwardDecorator)
