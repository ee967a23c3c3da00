"""Forward FLOPs of a Qwen2-VL embedding model, counted from its config and the real token counts.

Conventions (the usual ones for "model FLOPs" / MFU): a multiply-add is 2 FLOPs; only matrix products are
counted. Norms, activations, softmax, rotary embeddings, the embedding lookup, the residual additions and mean
pooling are left out (each is linear in the tokens with a constant far below the matrix products: well under
1% of the total at Qwen2-VL-2B's widths). The Dense projection after pooling is counted.

Vision tower, per image with ``P = t * h * w`` patches (``image_grid_thw``), width ``d``, MLP width
``m = d * mlp_ratio``, merge size ``s``, text width ``D``:

* patch embedding (a Conv3d that is a matrix product): ``2 * P * (3 * temporal_patch * patch**2) * d``;
* per block: q/k/v/o projections ``2 * P * 4 * d**2``, MLP ``2 * P * 2 * d * m``, attention scores and the
  weighted sum ``4 * P**2 * d`` (Qwen2-VL's vision attention is full, not causal, within each image);
* patch merger on ``P / s**2`` merged tokens: ``2 * (P / s**2) * ((s**2 d)**2 + s**2 d * D)``.

Language model, per sequence of ``L`` non-padding tokens (text and visual tokens together), width ``D``,
``H`` heads, ``K`` key/value heads, head width ``h = D / H``, MLP width ``I``, per layer:

* projections: q and o ``2 * L * D * D`` each, k and v ``2 * L * D * K * h`` each (grouped-query attention);
* attention: ``2 * D * L * (L + 1)``: token ``i`` attends to ``i + 1`` tokens (causal), each query-key pair
  costs ``2 * h`` for the score and ``2 * h`` for the weighted sum, over ``H`` heads;
* SwiGLU MLP: three ``D x I`` products, ``6 * L * D * I``.

Dense: ``2 * D * embedding_dim`` per sequence.

"Useful" FLOPs count only non-padding tokens; :func:`padded_forward_flops` counts the padded batch as the
model computes it (every row at the padded length), for reference.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def vision_flops(vision_config: Any, text_hidden_size: int, grid_thw: Iterable[Sequence[int]]) -> int:
    """Forward FLOPs of Qwen2-VL's vision tower (patch embedding, blocks, merger) on images of these grids."""
    d = _get(vision_config, "embed_dim")
    m = int(d * _get(vision_config, "mlp_ratio"))
    depth = _get(vision_config, "depth")
    merge = _get(vision_config, "spatial_merge_size")
    patch_in = _get(vision_config, "in_channels", 3) * _get(vision_config, "temporal_patch_size") * (
        _get(vision_config, "patch_size") ** 2
    )
    total = 0
    for t, h, w in grid_thw:
        patches = int(t) * int(h) * int(w)
        total += 2 * patches * patch_in * d
        per_block = 2 * patches * 4 * d * d + 2 * patches * 2 * d * m + 4 * patches * patches * d
        total += depth * per_block
        merged = patches // (merge**2)
        merged_width = d * merge**2
        total += 2 * merged * (merged_width * merged_width + merged_width * text_hidden_size)
    return total


def text_flops(text_config: Any, lengths: Iterable[int]) -> int:
    """Forward FLOPs of Qwen2-VL's language model on sequences of these (non-padding) lengths."""
    hidden = _get(text_config, "hidden_size")
    heads = _get(text_config, "num_attention_heads")
    kv_heads = _get(text_config, "num_key_value_heads")
    head_dim = _get(text_config, "head_dim") or hidden // heads
    inter = _get(text_config, "intermediate_size")
    layers = _get(text_config, "num_hidden_layers")
    total = 0
    for length in lengths:
        length = int(length)
        projections = 2 * length * hidden * (heads * head_dim) * 2 + 2 * length * hidden * (kv_heads * head_dim) * 2
        attention = 2 * heads * head_dim * length * (length + 1)
        mlp = 6 * length * hidden * inter
        total += layers * (projections + attention + mlp)
    return total


def forward_flops(
    config: Any,
    *,
    lengths: Sequence[int],
    image_grid_thw: Iterable[Sequence[int]] = (),
    embedding_dim: int | None = None,
) -> dict[str, int]:
    """Useful forward FLOPs of one encode of sequences with these non-padding lengths and images.

    Args:
        config: A ``Qwen2VLConfig`` (or a dict with ``text_config`` and ``vision_config``).
        lengths: Non-padding length of every sequence (text and visual tokens together).
        image_grid_thw: ``(t, h, w)`` patch grid of every image.
        embedding_dim: Output width of the Dense projection; None leaves Dense out.

    Returns:
        ``{"vision": ..., "text": ..., "dense": ..., "total": ...}``.
    """
    text_config = _get(config, "text_config")
    vision_config = _get(config, "vision_config")
    hidden = _get(text_config, "hidden_size")
    vision = vision_flops(vision_config, hidden, image_grid_thw)
    text = text_flops(text_config, lengths)
    dense = 2 * hidden * embedding_dim * len(lengths) if embedding_dim else 0
    return {"vision": vision, "text": text, "dense": dense, "total": vision + text + dense}


def padded_forward_flops(
    config: Any,
    *,
    batches: Iterable[tuple[int, int]],
    image_grid_thw: Iterable[Sequence[int]] = (),
    embedding_dim: int | None = None,
) -> int:
    """Forward FLOPs as computed on padded batches: every row of a ``(rows, padded_length)`` batch counts in full."""
    lengths = [length for rows, length in batches for _ in range(rows)]
    return forward_flops(config, lengths=lengths, image_grid_thw=image_grid_thw, embedding_dim=embedding_dim)[
        "total"
    ]
