"""Token-budget mini-batches for CachedPrefixRoutedLoss: one large image costs what many short texts do.

Qwen2-VL's language model runs on right-padded rows, so a mini-batch costs ``rows x longest row`` tokens of
activations, not the sum of its rows' lengths. sentence-transformers' ``mini_batch_num_tokens`` packs rows in
batch order up to a budget of *non-padding* tokens: a mini-batch holding one 1,000-token image row and twenty
20-token texts fits a budget of 1,400 but computes 21,000 tokens. Here the rows of each column are first
ordered by length, longest first (:func:`order_rows_by_length`), and mini-batches are cut so that
``rows x longest row`` stays within the budget (:func:`padded_token_ranges`): every mini-batch then costs at
most the budget, whatever the mix (a single row longer than the budget is a mini-batch of its own).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import torch
from torch import Tensor

from st_viomni.batching import plan_batches
from st_viomni.deferred_pixels import IMAGES


def order_rows_by_length(feature: dict[str, Any]) -> tuple[dict[str, Any], Tensor]:
    """The collated column ``feature`` with its rows ordered longest first, and that order (row indices).

    Reorders every per-row tensor, and the per-image ones (``image_grid_thw``, ``pixel_values`` or the deferred
    images of :class:`~st_viomni.DeferredPixelCollator`) by the rows the images belong to.
    """
    lengths = feature["attention_mask"].sum(dim=1)
    order = torch.sort(lengths, descending=True, stable=True).indices
    batch_size = lengths.shape[0]
    ordered = {}
    for key, value in feature.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size and key not in _IMAGE_KEYS:
            ordered[key] = value[order]
        else:
            ordered[key] = value
    if "image_grid_thw" in feature:
        images_per_row = feature["num_images_per_sample"].tolist()
        starts = [0, *accumulate(images_per_row)]
        image_order = [starts[row] + k for row in order.tolist() for k in range(images_per_row[row])]
        ordered["image_grid_thw"] = feature["image_grid_thw"][image_order]
        if IMAGES in feature:
            ordered[IMAGES] = [feature[IMAGES][index] for index in image_order]
        if "pixel_values" in feature:
            patches = feature["image_grid_thw"].prod(dim=1).tolist()
            offsets = [0, *accumulate(patches)]
            ordered["pixel_values"] = torch.cat(
                [feature["pixel_values"][offsets[index] : offsets[index] + patches[index]] for index in image_order]
            )
    return ordered, order


def padded_token_ranges(attention_mask: Tensor, num_tokens: int, max_rows: int) -> list[tuple[int, int]]:
    """``(begin, end)`` mini-batches of rows ordered longest first, each with ``rows x longest <= num_tokens``
    (or a single row) and at most ``max_rows`` rows: the encode planner's rule
    (:func:`st_viomni.batching.plan_batches`), which cuts contiguous ranges of rows ordered longest first."""
    lengths = attention_mask.sum(dim=1).tolist()
    if any(shorter > longer for longer, shorter in zip(lengths, lengths[1:])):
        raise ValueError("padded_token_ranges needs rows ordered longest first (order_rows_by_length)")
    batches = plan_batches(lengths, max_rows, max_padding=None, max_tokens=num_tokens)
    return [(batch[0], batch[-1] + 1) for batch in batches]


_IMAGE_KEYS = ("image_grid_thw", "pixel_values")
