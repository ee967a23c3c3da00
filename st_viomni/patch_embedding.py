r"""Qwen2-VL's patch embedding run as the matrix product it is: same weights, same outputs, faster on CPU.

Qwen2-VL embeds each ``temporal_patch x patch x patch`` block of RGB pixels (2x14x14x3 = 1176 values) with a
``Conv3d`` whose kernel equals its stride, on input the image processor has already cut into patches. Each
output is then one dot product of a flattened patch with a flattened filter:

.. math::

    \text{embed}(P) = P \, W^\top, \qquad P \in \mathbb{R}^{n \times 1176},\;
    W = \text{proj.weight.view}(d, 1176)

PyTorch's CPU convolution runs this shape far below matrix-product speed: on the 2-core benchmark machine,
7912 patches of width 1280 take 867 ms as ``Conv3d`` and 228 ms as ``linear`` on a view of the same weight in
fp32 (3.8x; 3.6x in bf16), and the convolution was 5% of an image-heavy encode pass. Nothing saved changes
(the parameter is still ``proj.weight`` of the ``Conv3d``), so a model saved by st-viomni loads and encodes
with plain ``SentenceTransformer(path)``, which runs the convolution (embeddings agree to float rounding).
Gradients flow to the same parameter, so training uses it too. In inference, float32 and bfloat16 CPU patches
go through oneDNN like the model's linear layers (:mod:`st_viomni.onednn_linear`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .onednn_linear import linear


def use_matmul_patch_embedding(model: torch.nn.Module) -> int:
    """Make every Qwen2-VL patch embedding inside ``model`` run as a matrix product; return how many.

    Only a plain ``Conv3d`` whose kernel equals its stride (no padding, dilation or groups), the layout of
    every Qwen2-VL checkpoint, is switched; anything else keeps its own ``forward``. Idempotent.
    """
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

    switched = 0
    for module in model.modules():
        if isinstance(module, PatchEmbed) and _is_patchwise(module.proj):
            # A partial, not a bound method: it survives pickling (multi-process pools, torch.save, deepcopy).
            module.forward = functools.partial(_matmul_forward, module)
            switched += 1
    return switched


def _is_patchwise(conv: Any) -> bool:
    return (
        type(conv) is torch.nn.Conv3d
        and tuple(conv.kernel_size) == tuple(conv.stride)
        and tuple(conv.padding) == (0, 0, 0)
        and tuple(conv.dilation) == (1, 1, 1)
        and conv.groups == 1
    )


def _matmul_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    # hidden_states: (patches, channels * temporal * height * width) in the Conv3d weight's layout, which is
    # what the Qwen2-VL image processor emits and what PatchEmbed.forward views as 5-D.
    weight = self.proj.weight
    flat_weight = weight.view(weight.shape[0], -1)
    patches = hidden_states.to(dtype=weight.dtype).reshape(-1, flat_weight.shape[1])
    return linear(patches, flat_weight, self.proj.bias)
