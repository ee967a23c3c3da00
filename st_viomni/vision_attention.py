r"""Qwen2-VL's vision attention in bfloat16 on CPU as chunked matrix products, on CPUs without AMX: about twice
PyTorch's kernel speed there.

Each image's patches attend to each other (no mask, not causal):

.. math::

    \text{attention}(Q, K, V) = \text{softmax}\!\left(s\, Q K^\top\right) V, \qquad s = d^{-1/2},
    \quad Q, K, V \in \mathbb{R}^{h \times n \times d}

On a 2-core AMD EPYC of family 26 (AVX-512 with BF16, no AMX) PyTorch's CPU
flash-attention kernel runs bfloat16 no faster than float32, while bfloat16 matrix products run at twice the
float32 speed: for a 1024-patch image (one thread, 16 heads of 80) the kernel took 56 ms in bfloat16 and 54 ms in
float32, and :func:`chunked_attention` takes 23 ms. It runs ``Q K^T`` and the product with ``V`` as bfloat16
matrix products (oneDNN) over :data:`CHUNK` queries at a time, on a chunk of scores small enough to stay in cache
(16 x 64 x 1024 values), with PyTorch's softmax in between (which computes a bfloat16 input in float32). Without
the chunks the full score matrix is slower than the kernel (102 ms). In float32 the kernel is faster than the
chunked products (70 ms), so float32 keeps it.

**Bounded shapes.** oneDNN keeps generated code for every product shape it sees, and every image brings its
own number of patches: unpadded, 300 images of random sizes grew a process by 459 MiB without a plateau. So
queries and keys are padded with zero rows to a multiple of :data:`CHUNK` (the scores of padded keys are set
to minus infinity, so they get exactly zero weight, and padded queries are sliced off): oneDNN sees one shape
per 64 patches of the longest image, and the same 300 images grew the process by 45 MiB, at the same speed.

**Not on CPUs with AMX.** On a 2-core Intel Xeon with AMX tiles (family 6 model 167) the kernel runs bfloat16 at
twice its float32 speed, and twice the chunked products' (1024 patches: 15 ms kernel, 33 ms chunked at two
threads; 30 and 66 ms at one), so :func:`chunks_beat_the_kernel` is false there and the kernel is kept.

**Where it applies.** :func:`use_chunked_vision_attention` (called by ``ViOmniQwen``) switches the vision tower's
attention from ``"sdpa"`` to :data:`ATTENTION_NAME`, a transformers attention function that takes the chunked
path only under ``torch.inference_mode()`` (``encode`` and every evaluator), for bfloat16 CPU tensors where
:func:`chunks_beat_the_kernel` says the CPU suits them, without mask, causality or dropout; everything else
(training, float32, CUDA, CPUs with AMX) is transformers' ``sdpa_attention_forward`` as before. The text model
keeps ``"sdpa"``. Outputs differ from the kernel's by bfloat16 rounding (the probabilities are rounded to
bfloat16 before the product with ``V``). Nothing saved changes: transformers does not save the attention
implementation, so a saved model loads with plain ``SentenceTransformer(path)`` and uses ``"sdpa"``.

Example::

    import torch
    from st_viomni.vision_attention import chunked_attention

    query, key, value = (torch.randn(1, 16, 1000, 80, dtype=torch.bfloat16) for _ in range(3))
    output = chunked_attention(query, key, value, scaling=80**-0.5)  # (1, 1000, 16, 80), as sdpa's
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .onednn_linear import bfloat16_in_onednn, onednn_inference

CHUNK = 64
"""Queries per product, and the granule of the padded lengths. Over images of 16 to 1024 patches in bfloat16, 64
took 56 ms in all at one thread and 29 ms at two, against 57 and 39 for 32, and 63 and 36 for 128."""

ATTENTION_NAME = "st_viomni_sdpa"
"""The transformers attention implementation that :func:`use_chunked_vision_attention` sets on vision towers."""


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """``softmax(scaling * query @ key^T) @ value`` over :data:`CHUNK` queries at a time, for ``(batch, heads,
    length, head_dim)`` tensors with as many key as query heads; returns ``(batch, query length, heads,
    head_dim)``, the layout of transformers' attention functions. Lengths are padded to a multiple of
    :data:`CHUNK` (see the module docstring).

    Three operations per chunk, all in the inputs' dtype: the scores' product (``scaling`` is applied to the
    queries once, before it), the softmax (PyTorch's CPU kernel computes a bfloat16 softmax in float32 and
    rounds its output: bitwise ``softmax(scores.float()).bfloat16()``) and the product with the values.
    Converting the scores to float32 and back around the softmax instead was 21% slower at one thread and 27%
    at two, for the same error."""
    queries, keys = query.shape[2], key.shape[2]
    missing_queries, missing_keys = -queries % CHUNK, -keys % CHUNK
    query = query * scaling
    if missing_queries:
        query = F.pad(query, (0, 0, 0, missing_queries))
    if missing_keys:
        key, value = F.pad(key, (0, 0, 0, missing_keys)), F.pad(value, (0, 0, 0, missing_keys))
    keys_transposed = key.transpose(-1, -2)
    # Written in (batch, length, heads, head_dim) order through a transposed view: for one image (batch 1, as
    # Qwen2-VL's vision tower calls it) the result needs no copy.
    output = query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for start in range(0, query.shape[2], CHUNK):
        scores = torch.matmul(query[:, :, start : start + CHUNK], keys_transposed)
        if missing_keys:
            scores[..., keys:] = float("-inf")
        torch.matmul(torch.softmax(scores, dim=-1), value, out=output[:, start : start + CHUNK].transpose(1, 2))
    return output[:, :queries].contiguous()


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function registered as :data:`ATTENTION_NAME`: :func:`chunked_attention` where it applies
    (see the module docstring), transformers' ``sdpa_attention_forward`` everywhere else."""
    if _takes_chunks(query, key, value, attention_mask, dropout, is_causal, kwargs):
        return chunked_attention(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


AttentionInterface.register(ATTENTION_NAME, attention_forward)


@functools.cache
def chunks_beat_the_kernel() -> bool:
    """Whether this CPU runs bfloat16 products in oneDNN (:func:`~st_viomni.onednn_linear.bfloat16_in_onednn`)
    and has no AMX tiles: where it has them, PyTorch's attention kernel is the faster (module docstring)."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return bfloat16_in_onednn() and not has_amx()


def use_chunked_vision_attention(model: torch.nn.Module) -> int:
    """Switch every Qwen2-VL vision tower inside ``model`` that uses ``"sdpa"`` to :data:`ATTENTION_NAME`; return
    how many. Towers loaded with another implementation (``"eager"``, flash attention) keep it. Idempotent."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    switched = 0
    for module in model.modules():
        if isinstance(module, Qwen2VisionTransformerPretrainedModel) and module.config._attn_implementation in (
            "sdpa",
            ATTENTION_NAME,
        ):
            module.config._attn_implementation = ATTENTION_NAME  # the config its attention layers read
            switched += 1
    return switched


def _takes_chunks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> bool:
    bfloat16 = query.dtype == key.dtype == value.dtype == torch.bfloat16
    if not (onednn_inference(query) and bfloat16 and chunks_beat_the_kernel()):
        return False
    if attention_mask is not None or is_causal or dropout or any(extra is not None for extra in kwargs.values()):
        return False
    return query.dim() == 4 and query.shape[1] == key.shape[1]
