"""Token-budget mini-batches for CachedPrefixRoutedLoss: one large image costs what many short texts do.

Qwen2-VL's language model runs on right-padded rows, so a mini-batch costs ``rows x longest row`` tokens of
activations, not the sum of its rows' lengths. sentence-transformers' ``mini_batch_num_tokens`` packs rows in
batch order up to a budget of *non-padding* tokens: a mini-batch holding one 1,000-token image row and twenty
20-token texts fits a budget of 1,400 but computes 21,000 tokens. Here the rows of each column are taken in
order of length, longest first (:func:`rows_by_length`), and mini-batches are cut so that ``rows x longest
row`` stays within the budget (:func:`padded_token_ranges`): every mini-batch then costs at most the budget,
whatever the mix (a single row longer than the budget is a mini-batch of its own).

The collated column itself is never reordered: each mini-batch gathers its own rows (:func:`select_rows`), so
the step holds one copy of the batch's tokens (and, with sentence-transformers' collator, of its pixels), not
two.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor

from st_viomni.batching import plan_batches
from st_viomni.deferred_pixels import IMAGES

ROW_ORDER = "row_order"
"""Feature key under which :class:`~st_viomni.losses.CachedPrefixRoutedLoss` passes a column's
:func:`rows_by_length` order to its mini-batching (never seen by the model)."""


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
        if key == ROW_ORDER:
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


def padded_token_ranges(lengths: Sequence[int], num_tokens: int, max_rows: int) -> list[tuple[int, int]]:
    """``(begin, end)`` mini-batches of rows of ``lengths`` (ordered longest first), each with ``rows x longest
    <= num_tokens`` (or a single row) and at most ``max_rows`` rows: the encode planner's rule
    (:func:`st_viomni.batching.plan_batches`), which cuts contiguous ranges of rows ordered longest first."""
    lengths = list(lengths)
    if any(shorter > longer for longer, shorter in zip(lengths, lengths[1:])):
        raise ValueError("padded_token_ranges needs lengths ordered longest first (rows_by_length)")
    batches = plan_batches(lengths, max_rows, max_padding=None, max_tokens=num_tokens)
    return [(batch[0], batch[-1] + 1) for batch in batches]


_IMAGE_KEYS = ("image_grid_thw", "pixel_values")
