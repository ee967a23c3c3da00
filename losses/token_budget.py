"""Token-budget mini-batches for CachedPrefixRoutedLoss: one large image costs what many short texts do.

Qwen2-VL's language model runs on right-padded rows, so a mini-batch costs ``rows x longest row`` tokens of
activations, not the sum of its rows' lengths. sentence-transformers' ``mini_batch_num_tokens`` packs rows in
batch order up to a budget of *non-padding* tokens: a mini-batch holding one 1,000-token image row and twenty
20-token texts fits a budget of 1,400 but computes 21,000 tokens. Here the rows of each column are taken in
order of length, longest first (:func:`rows_by_length`), and mini-batches are cut so that their cost stays
within the budget (:func:`padded_token_ranges`), a single row over the budget being a mini-batch of its own.

The cost, in language-model tokens, is what the mini-batch's activations take::

    cost = rows x longest row + patch_cost x image patches

Every visual token is a language-model token, and before that four 14x14 patches of the vision tower (Qwen2-VL
merges 2x2), which keep activations of their own for the backward pass. :func:`vision_patch_cost` prices a
patch against a token from the two towers' widths and depths; for Qwen2-VL-2B a patch costs 0.70 tokens, so a
visual token costs about 3.8 text tokens, and counting it as one would let an image-heavy mini-batch take
several times the memory of a text one.

Each column's order and mini-batches are planned once per step (:func:`plan_mini_batches`), before any
forward pass, and both GradCache passes follow that plan. The collated column itself is never reordered: each
mini-batch gathers its own rows (:func:`select_rows`), so the step holds one copy of the batch's tokens (and,
with sentence-transformers' collator, of its pixels), not two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor

from st_viomni.deferred_pixels import IMAGES

MINI_BATCH_PLAN = "mini_batch_plan"
"""Feature key under which :class:`~st_viomni.losses.CachedPrefixRoutedLoss` passes a column's
:class:`MiniBatchPlan` to both GradCache passes (never seen by the model)."""


@dataclass(frozen=True)
class MiniBatchPlan:
    """A column's token-budget mini-batches: its rows longest first, and ``(begin, end)`` ranges of that order.

    Planned once per step, before any forward pass, so that the pass with gradients replays the mini-batches of
    the pass without, whatever a module does to the features in between."""

    order: Tensor
    ranges: list[tuple[int, int]]


def plan_mini_batches(feature: dict[str, Any], num_tokens: int, patch_cost: float) -> MiniBatchPlan:
    """The :class:`MiniBatchPlan` of the collated column ``feature``: rows by length (:func:`rows_by_length`),
    cut by :func:`padded_token_ranges` with each row's image patches priced at ``patch_cost`` tokens
    (:func:`vision_patch_cost`)."""
    order = rows_by_length(feature)
    lengths = feature["attention_mask"].sum(dim=1)[order]
    vision_costs = row_patches(feature)[order.cpu()] * patch_cost
    return MiniBatchPlan(order, padded_token_ranges(lengths.tolist(), num_tokens, vision_costs.tolist()))


def rows_by_length(feature: dict[str, Any]) -> Tensor:
    """Row indices of the collated column ``feature``, longest row first (ties in batch order)."""
    lengths = feature["attention_mask"].sum(dim=1)
    return torch.sort(lengths, descending=True, stable=True).indices


def select_rows(feature: dict[str, Any], rows: Tensor) -> dict[str, Any]:
    """Rows ``rows`` (indices, in this order) of the collated column ``feature``, as a column of their own.

    Copies the selected rows of every per-row tensor, and the per-image entries of their images
    (``image_grid_thw``, ``pixel_values`` or the deferred images of :class:`~st_viomni.DeferredPixelCollator`),
    so a mini-batch costs the memory of its own rows only.
    """
    batch_size = feature["attention_mask"].shape[0]
    selected = {}
    for key, value in feature.items():
        if key == MINI_BATCH_PLAN:
            continue
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size and key not in _IMAGE_KEYS:
            selected[key] = value[rows.to(value.device)]
        else:
            selected[key] = value
    if "image_grid_thw" in feature:
        images_per_row = feature["num_images_per_sample"].tolist()
        starts = [0, *accumulate(images_per_row)]
        images = [starts[row] + k for row in rows.tolist() for k in range(images_per_row[row])]
        grids = feature["image_grid_thw"]
        selected["image_grid_thw"] = grids[torch.tensor(images, dtype=torch.long, device=grids.device)]
        if IMAGES in feature:
            selected[IMAGES] = [feature[IMAGES][index] for index in images]
        if "pixel_values" in feature:
            pixels = feature["pixel_values"]
            patches = grids.prod(dim=1).tolist()
            offsets = [0, *accumulate(patches)]
            parts = [pixels[offsets[index] : offsets[index] + patches[index]] for index in images]
            selected["pixel_values"] = torch.cat(parts) if parts else pixels[:0]
    return selected


def row_patches(feature: dict[str, Any]) -> Tensor:
    """Image patches the vision tower computes for each row of the collated column ``feature`` (0 for text)."""
    batch_size = feature["attention_mask"].shape[0]
    patches = torch.zeros(batch_size, dtype=torch.long)
    if "image_grid_thw" in feature:
        rows = torch.repeat_interleave(torch.arange(batch_size), feature["num_images_per_sample"].cpu())
        patches.index_add_(0, rows, feature["image_grid_thw"].prod(dim=1).cpu())
    return patches


def vision_patch_cost(config: Any) -> float:
    """Language-model tokens that one vision-tower patch costs in activations, from a Qwen2-VL config.

    Both towers keep, per token and layer, activations proportional to their hidden plus MLP widths (attention,
    norms and the MLP's input and output at the hidden width, its gate or activation at the MLP width), so::

        patch_cost = vision depth x (vision width + vision MLP width) / (text layers x (text width + MLP width))

    0.70 for Qwen2-VL-2B. Measured on one mini-batch's forward and backward (live tensors, benchmarks/NOTES.md):
    0.61 for ``proxy-2b`` (formula 0.61), 0.52 for ``tiny`` (formula 0.5). 0 for a model without a vision tower
    (``config`` None or without ``vision_config``).
    """
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return 0.0
    # Qwen2-VL's vision width is embed_dim (its hidden_size is the merger's output) and its MLP a ratio of it.
    width, mlp_ratio = getattr(vision, "embed_dim", None), getattr(vision, "mlp_ratio", None)
    if not width or not mlp_ratio:
        raise ValueError(
            f"cannot price the image patches of {type(vision).__name__} (no embed_dim and mlp_ratio): the token "
            "budget of st-viomni's losses knows Qwen2-VL's vision tower"
        )
    text = config.text_config
    text_cost = text.num_hidden_layers * (text.hidden_size + text.intermediate_size)
    return vision.depth * width * (1 + mlp_ratio) / text_cost


def padded_token_ranges(
    lengths: Sequence[int], num_tokens: int, vision_costs: Sequence[float] | None = None
) -> list[tuple[int, int]]:
    """``(begin, end)`` mini-batches of consecutive rows of ``lengths`` (ordered longest first), each with a cost
    ``rows x longest + sum(vision_costs)`` within ``num_tokens``, or of a single row. ``vision_costs``: per row,
    its image patches times :func:`vision_patch_cost` (None: no images).

    As in sentence-transformers, the budget replaces the row count: it bounds what a mini-batch's activations
    take, so many short rows share one mini-batch (fewer, fuller forward passes) at the memory of a few long
    ones."""
    lengths = list(lengths)
    if any(shorter > longer for longer, shorter in zip(lengths, lengths[1:])):
        raise ValueError("padded_token_ranges needs lengths ordered longest first (rows_by_length)")
    vision_costs = [0.0] * len(lengths) if vision_costs is None else list(vision_costs)
    ranges: list[tuple[int, int]] = []
    begin, vision = 0, 0.0
    for row in range(len(lengths)):
        # lengths[begin] is the longest row of the mini-batch; a row is only ever shorter.
        if row > begin and (row - begin + 1) * lengths[begin] + vision + vision_costs[row] > num_tokens:
            ranges.append((begin, row))
            begin, vision = row, 0.0
        vision += vision_costs[row]
    if lengths:
        ranges.append((begin, len(lengths)))
    return ranges


_IMAGE_KEYS = ("image_grid_thw", "pixel_values")
