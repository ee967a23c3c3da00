"""CachedPrefixRoutedLoss: PrefixRoutedLoss with GradCache, for batches larger than memory allows at once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from sentence_transformers.base.losses.gradcache import (
    CachedLossMixin,
    _validate_mini_batch_num_tokens,
    has_static_embedding_input,
)
from torch import Tensor, nn

from st_viomni.deferred_pixels import has_deferred_pixels, image_processor_of, unwrapped, with_pixels

from .labels import decode_labels
from .prefix_routed import PrefixRoutedLoss, _forward_is_patched
from .token_budget import MINI_BATCH_PLAN, plan_mini_batches, select_rows, vision_patch_cost


class CachedPrefixRoutedLoss(CachedLossMixin, nn.Module):
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
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
    ) -> None:
        r"""
        :class:`PrefixRoutedLoss` with gradient caching (GradCache), in the style of sentence-transformers'
        ``CachedMultipleNegativesRankingLoss`` and built on its ``CachedLossMixin``:

            (1) embed every mini-batch without gradients;
            (2) compute the loss over the whole batch and back-propagate it to the embeddings, chunk by chunk of
                ``mini_batch_size`` rows of the similarity matrices, caching the embeddings' gradients;
            (3) re-embed each mini-batch with gradients and back-propagate the cached gradients into the model.

        Only one mini-batch of activations lives at a time, so the batch size (and with it the number of in-batch
        negatives) is bounded by time, not memory. The loss value, the per-task components and the gradients are
        those of :class:`PrefixRoutedLoss` (same formula; see its docstring), up to floating-point rounding.

        Pixels: sentence-transformers' collator computes the ``pixel_values`` of the whole batch up front, so
        their memory grows with the batch (sentence-transformers issue #3991). Train with
        :class:`~st_viomni.DeferredPixelCollator` (``st-viomni train`` does) and this loss computes each
        mini-batch's pixels right before embedding it, in both passes: the memory of a step then grows with
        the batch only by its token ids and embeddings. With ``mini_batch_num_tokens`` the mini-batches are
        cut by what their activations cost in tokens (an image's patches priced by the vision tower's widths),
        so one large image costs a mini-batch what many short texts do.

        Args:
            model: The SentenceTransformer model.
            temperature: See :class:`PrefixRoutedLoss`.
            mse_weight: See :class:`PrefixRoutedLoss`.
            cosine_weight: See :class:`PrefixRoutedLoss`.
            triplet_weight: See :class:`PrefixRoutedLoss`.
            margins: See :class:`PrefixRoutedLoss` (defaults from :mod:`st_viomni.tasks`).
            gather_across_devices: See :class:`PrefixRoutedLoss`.
            log_task_components: See :class:`PrefixRoutedLoss`. Inside ``MatryoshkaLoss`` (which decorates
                ``calculate_loss``) a scalar is returned automatically.
            mini_batch_size: Rows per embedding mini-batch in steps (1) and (3) (unless ``mini_batch_num_tokens`` is
                set), and rows per chunk of the loss in step (2). The larger, the faster and the more memory.
            mini_batch_num_tokens: Cut embedding mini-batches by tokens instead of ``mini_batch_size`` rows, as
                sentence-transformers' cached losses do, but by what a mini-batch computes: the rows of each column
                are taken longest first and each mini-batch gathers as many as keep its cost within this budget.
                The cost is ``rows x longest row`` (text and visual tokens, padding included: what the language
                model computes) plus the vision tower's image patches, each priced in tokens from the model's
                config (0.70 for Qwen2-VL-2B: a visual token then costs about 3.8 text tokens; see
                :mod:`st_viomni.losses.token_budget`). None: mini-batches of ``mini_batch_size`` rows in batch
                order.
            show_progress_bar: Show a progress bar over the mini-batches.

        References:
            - Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (GradCache):
              https://huggingface.co/papers/2101.06983

        Requirements:
            1. As :class:`PrefixRoutedLoss`: (anchor, positive[, negative_1, ...]) columns and a ``label`` column
               made by :func:`st_viomni.losses.make_label`.
            2. A large ``per_device_train_batch_size`` and a small ``mini_batch_size``.
            3. Under DDP, ``ddp_find_unused_parameters`` may be left at the trainer's default (True) or set to
               False: text-only mini-batches keep the vision tower in the graph (see
               :mod:`st_viomni.losses.vision_graph`).

        Inputs:
            +-------------------------------------------------+--------------------------------------------+
            | Texts                                           | Labels                                     |
            +=================================================+============================================+
            | (anchor, positive) pairs                        | ``make_label(task, score, positive, imgs)`` |
            +-------------------------------------------------+--------------------------------------------+
            | (anchor, positive, negative_1, ..., negative_n) | ``make_label(task, score, positive, imgs)`` |
            +-------------------------------------------------+--------------------------------------------+

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

                from st_viomni import build_model, format_input
                from st_viomni.losses import CachedPrefixRoutedLoss, make_label
                from st_viomni.testing import make_tiny_base_model

                model = build_model(make_tiny_base_model("/tmp/tiny-qwen2-vl"), embedding_dim=32)
                rows = [
                    ("instr", "Translate to English: xin chào", "hello", None),
                    ("text_pair", "The cat sat on the mat.", "A cat rests on a rug.", 0.8),
                    ("vqa_single", "What colour is the sky?", "blue", None),
                    ("vqa_multi", "And the grass?", "green", None),
                ]
                train_dataset = Dataset.from_list([
                    {
                        "anchor": format_input(task, anchor),
                        "positive": format_input(task, positive),
                        "label": make_label(task, score, positive),
                    }
                    for task, anchor, positive, score in rows
                ])
                loss = CachedPrefixRoutedLoss(model, mini_batch_size=2)
                args = SentenceTransformerTrainingArguments("out", per_device_train_batch_size=4, report_to="none")
                trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss)
                trainer.train()
        """
        super().__init__()
        if has_static_embedding_input(model):
            raise ValueError("CachedPrefixRoutedLoss cannot mini-batch a StaticEmbedding model; use PrefixRoutedLoss")
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be positive, got {mini_batch_size}")
        _validate_mini_batch_num_tokens(mini_batch_num_tokens)
        self.model = model
        # The wrapped loss owns and validates the loss hyperparameters and computes the loss; this class adds
        # the gradient caching and the chunking of the loss stage.
        self.loss = PrefixRoutedLoss(
            model,
            temperature=temperature,
            mse_weight=mse_weight,
            cosine_weight=cosine_weight,
            triplet_weight=triplet_weight,
            margins=margins,
            gather_across_devices=gather_across_devices,
            log_task_components=log_task_components,
        )
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar
        self._task_components: dict[str, Tensor] | None = None
        self._row_orders: list[Tensor] | None = None

    def take_task_loss_totals(self, split: str = "train") -> Tensor | None:
        """See :meth:`PrefixRoutedLoss.take_task_loss_totals`."""
        return self.loss.take_task_loss_totals(split)

    _delegated_to_wrapped_loss = (
        "temperature",
        "mse_weight",
        "cosine_weight",
        "triplet_weight",
        "margins",
        "gather_across_devices",
        "log_task_components",
    )

    def __setattr__(self, name: str, value: Any) -> None:
        # `loss.temperature = 0.02` must reach the wrapped loss, which does the computing.
        if name in self._delegated_to_wrapped_loss and isinstance(getattr(self, "loss", None), nn.Module):
            setattr(self.loss, name, value)
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name in type(self)._delegated_to_wrapped_loss:
            return getattr(super().__getattr__("loss"), name)
        return super().__getattr__(name)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> dict[str, Tensor] | Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(
                f"CachedPrefixRoutedLoss needs an anchor and a positive column, got {len(sentence_features)}"
            )
        tasks, scores, _ = decode_labels(labels)
        self.loss.validate_rows(tasks, scores)  # before paying for the forward passes
        self._task_components = None
        if self.mini_batch_num_tokens is not None:
            for index, feature in enumerate(sentence_features):
                if "video_grid_thw" in feature:  # select_rows gathers images only
                    raise ValueError(
                        f"column {index} holds videos, which mini_batch_num_tokens does not mini-batch; "
                        "use mini_batch_size alone"
                    )
            # Rows of similar length share a mini-batch, so that padding does not defeat the token budget: each
            # column carries its plan, each mini-batch gathers its rows (the column is not reordered as a whole),
            # and calculate_loss puts the embeddings back in batch order.
            config = getattr(getattr(unwrapped(self.model)[0], "model", None), "config", None)
            patch_cost = vision_patch_cost(config)
            budget = self.mini_batch_num_tokens
            plans = [plan_mini_batches(feature, budget, patch_cost) for feature in sentence_features]
            self._row_orders = [plan.order for plan in plans]
            sentence_features = [{**feature, MINI_BATCH_PLAN: plan} for feature, plan in zip(sentence_features, plans)]
        try:
            loss = self.forward_cached(sentence_features, labels)
        finally:
            self._row_orders = None
        components, self._task_components = self._task_components, None
        matryoshka_decorated = "calculate_loss" in vars(self) or _forward_is_patched(self.model)
        if not self.log_task_components or components is None or matryoshka_decorated:
            return loss
        # The loss returned by forward_cached carries the GradCache backward hook. Each component's value is the
        # task's share, and each passes 1/T of the gradient to that loss, so the trainer's sum of the components
        # back-propagates exactly once through the hook.
        link = (loss - loss.detach()) / len(components)
        return {name: value.detach().to(loss.dtype) + link for name, value in components.items()}

    def embed_minibatch_iter(
        self,
        sentence_feature: dict[str, Any],
        with_grad: bool,
        copy_random_state: bool,
        random_states: list[Any] | None = None,
        ranges: list[tuple[int, int]] | None = None,
    ):
        plan = sentence_feature.get(MINI_BATCH_PLAN)
        if plan is not None:  # the token budget's ranges replace sentence-transformers' (positions in plan.order)
            ranges = plan.ranges
        return super().embed_minibatch_iter(sentence_feature, with_grad, copy_random_state, random_states, ranges)

    def embed_minibatch(
        self,
        sentence_feature: dict[str, Any],
        begin: int,
        end: int,
        with_grad: bool,
        copy_random_state: bool,
        random_state: Any = None,
    ) -> tuple[Tensor, Any]:
        plan = sentence_feature.get(MINI_BATCH_PLAN)
        if plan is not None:  # positions begin:end of the length order
            sentence_feature = select_rows(sentence_feature, plan.order[begin:end])
            begin, end = 0, end - begin
        # Pixels deferred by DeferredPixelCollator are computed for this mini-batch only, in both passes.
        if has_deferred_pixels(sentence_feature):
            sentence_feature = with_pixels(sentence_feature, image_processor_of(self.model), begin, end)
            begin, end = 0, end - begin
        return super().embed_minibatch(sentence_feature, begin, end, with_grad, copy_random_state, random_state)

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The batch loss from the cached embeddings, in chunks of ``mini_batch_size`` local rows.

        With ``with_backward``, each chunk is back-propagated to normalised (and gathered) copies of the
        embeddings at once, so only one chunk of the similarity matrices is alive at a time; the accumulated
        gradients then go through the normalisation (and the gather) to ``reps`` in one backward pass.
        """
        tasks, scores, positive_keys = decode_labels(labels)
        columns = [torch.cat(column_reps) for column_reps in reps]
        if self._row_orders is not None:  # back from length order to batch order
            columns = [
                column[torch.argsort(order.to(column.device))] for column, order in zip(columns, self._row_orders)
            ]
        batch = self.loss.prepare_batch(columns[0], columns[1], tasks, scores, positive_keys, columns[2:])
        prepared_embeddings = batch.embeddings()
        if with_backward:
            leaves = [embedding.detach().requires_grad_() for embedding in prepared_embeddings]
            batch = batch.with_embeddings(leaves)

        total = torch.zeros((), device=batch.anchors.device)
        per_sample_parts = []
        for begin in range(0, batch.batch_size, self.mini_batch_size):
            end = min(begin + self.mini_batch_size, batch.batch_size)
            per_sample = self.loss.chunk_losses(batch, begin, end)
            chunk_loss = per_sample.sum() / batch.batch_size
            if with_backward:
                chunk_loss.backward()
                chunk_loss = chunk_loss.detach()
            total = total + chunk_loss
            per_sample_parts.append(per_sample.detach())

        if with_backward:
            gradients = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
            torch.autograd.backward(prepared_embeddings, gradients)
            total = total.detach()
        per_sample = torch.cat(per_sample_parts)
        self.loss.accumulate_task_losses(per_sample, tasks)
        self._task_components = self.loss.task_components(per_sample, tasks)
        return total

    def get_config_dict(self) -> dict[str, Any]:
        return {
            **self.loss.get_config_dict(),
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
        }

    @property
    def citation(self) -> str:
        return (
            self.loss.citation
            + """@misc{gao2021scaling,
    title = {Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author = {Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year = {2021},
    eprint = {2101.06983},
    archivePrefix = {arXiv},
    primaryClass = {cs.LG}
}
"""
        )
