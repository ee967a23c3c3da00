"""Keep a vision-language model's vision tower in the autograd graph of text-only batches under DDP.

Why: ``DistributedDataParallel`` expects every trainable parameter to receive a gradient in every backward
pass that it synchronises. A batch (or a GradCache mini-batch, or one column of a batch) without any image
never runs Qwen2-VL's vision tower, so its parameters get no gradient and DDP fails:

* ``find_unused_parameters=False``: the next step raises "Expected to have finished reduction in the prior
  iteration before starting a new one";
* ``find_unused_parameters=True`` (the trainer's default for sentence-transformers models): DDP decides which
  parameters are unused from the graph of the *last* forward call before ``backward``. When the anchors carry
  images and the positives do not, the vision tower is marked unused by the positives' forward and then receives
  a gradient through the anchors' forward: "Expected to mark a variable ready only once".

The fix: a forward hook on the ``Transformer`` module that, on a forward without ``pixel_values`` (and without
``pixel_values_videos``), adds ``0 * sum(one element of every trainable vision parameter)`` to the token
embeddings. The embeddings do not change (the term is an exact zero while the vision weights are finite), every
vision parameter now receives a zero gradient, and because the term is added *inside* the model's forward, DDP's
unused-parameter search sees the vision tower as used. This works for plain losses (one backward per step) and
for GradCache losses (one forward and backward per mini-batch, the last one synchronised).

The hook only acts while ``torch.distributed`` is initialised with more than one process, the module is in
training mode and gradients are enabled: single-process training keeps skipping the vision tower's update on
text-only steps (an optimizer skips parameters whose gradient is None, but would apply momentum and weight decay
to a zero gradient), and inference is untouched.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import torch.distributed as dist
from torch import nn

_VISION_INPUT_KEYS = ("pixel_values", "pixel_values_videos")
_HOOK_ATTRIBUTE = "_st_viomni_vision_graph_hook"


def keep_vision_tower_in_graph(model: nn.Module) -> int:
    """Install the text-only-batch hook (see the module docstring) on every vision-language ``Transformer``
    module of ``model``. Idempotent; models without a vision tower are left alone.

    Args:
        model: A :class:`~sentence_transformers.SentenceTransformer` (or one wrapped in DDP), or any module.

    Returns:
        The number of ``Transformer`` modules that carry the hook after the call.
    """
    from sentence_transformers.base.modules import Transformer

    model = getattr(model, "module", model)  # DDP / DataParallel wrappers
    hooked = 0
    for module in model.modules():
        if not isinstance(module, Transformer):
            continue
        vision_tower = _find_vision_tower(module.model)
        if vision_tower is None:
            continue
        if getattr(module, _HOOK_ATTRIBUTE, None) is None:
            handle = module.register_forward_hook(_VisionGraphHook(vision_tower))
            setattr(module, _HOOK_ATTRIBUTE, handle)
        hooked += 1
    return hooked


def remove_vision_tower_hook(model: nn.Module) -> None:
    """Remove the hooks installed by :func:`keep_vision_tower_in_graph` (e.g. to reproduce the DDP failure)."""
    model = getattr(model, "module", model)
    for module in model.modules():
        handle = getattr(module, _HOOK_ATTRIBUTE, None)
        if handle is not None:
            handle.remove()
            setattr(module, _HOOK_ATTRIBUTE, None)


def _find_vision_tower(hf_model: nn.Module) -> nn.Module | None:
    # Qwen2-VL, Qwen2.5-VL and Qwen3-VL call it `visual`, both on the bare model and under `.model` of the
    # ForConditionalGeneration classes.
    for candidate in (hf_model, getattr(hf_model, "model", None)):
        visual = getattr(candidate, "visual", None) if candidate is not None else None
        if isinstance(visual, nn.Module):
            return visual
    return None


def _distributed_world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _VisionGraphHook:
    def __init__(self, vision_tower: nn.Module) -> None:
        self.vision_tower = vision_tower

    def __call__(self, module: nn.Module, args: tuple, output: MutableMapping) -> None:
        if not (module.training and torch.is_grad_enabled() and _distributed_world()):
            return
        # Features are a dict, or a transformers BatchFeature (a UserDict) straight from the collator.
        if not isinstance(output, MutableMapping) or any(output.get(key) is not None for key in _VISION_INPUT_KEYS):
            return
        output_name = getattr(module, "module_output_name", None) or "token_embeddings"
        embeddings = output.get(output_name)
        if not isinstance(embeddings, torch.Tensor):
            return
        parameters = [parameter for parameter in self.vision_tower.parameters() if parameter.requires_grad]
        if not parameters:
            return
        # One element per parameter is enough to put the parameter in the graph; `[:1]` (not `[0]`) also copes
        # with parameters that a sharding engine has emptied outside their module's forward.
        touch = torch.stack([parameter.reshape(-1)[:1].sum().float() for parameter in parameters]).sum()
        output[output_name] = embeddings + (touch * 0.0).to(embeddings.dtype)
