"""The text-only-batch hook that keeps Qwen2-VL's vision tower in the graph under DDP (single-process view).

The real thing, 2-process DDP with and without the hook, is in test_loss_distributed.py.
"""

from __future__ import annotations

import torch

import st_viomni.losses.vision_graph as vision_graph
from st_viomni import format_input
from st_viomni.losses import PrefixRoutedLoss, keep_vision_tower_in_graph, remove_vision_tower_hook


def vision_gradients(model) -> list:
    return [parameter.grad for parameter in model[0].model.visual.parameters()]


def embed_text_batch(model) -> torch.Tensor:
    features = model.preprocess([format_input("instr", "xin chào"), format_input("text_pair", "một câu")])
    return model(dict(features))["sentence_embedding"]


def test_the_loss_installs_the_hook_once(tiny_model):
    PrefixRoutedLoss(tiny_model)
    PrefixRoutedLoss(tiny_model)
    assert len(tiny_model[0]._forward_hooks) == 1
    assert keep_vision_tower_in_graph(tiny_model) == 1
    assert len(tiny_model[0]._forward_hooks) == 1
    remove_vision_tower_hook(tiny_model)
    assert len(tiny_model[0]._forward_hooks) == 0


def test_single_process_training_is_untouched(tiny_model):
    tiny_model.train()
    keep_vision_tower_in_graph(tiny_model)
    embed_text_batch(tiny_model).sum().backward()
    # No DDP: the vision tower keeps no gradient on text-only batches, so an optimizer skips it as before.
    assert all(gradient is None for gradient in vision_gradients(tiny_model))


def test_under_ddp_text_only_batches_give_the_vision_tower_a_zero_gradient(tiny_model, monkeypatch):
    tiny_model.train()
    torch.manual_seed(0)
    without_hook = embed_text_batch(tiny_model).detach()
    keep_vision_tower_in_graph(tiny_model)
    monkeypatch.setattr(vision_graph, "_distributed_world", lambda: True)
    with_hook = embed_text_batch(tiny_model)
    assert torch.equal(with_hook.detach(), without_hook)  # the embeddings do not change
    with_hook.sum().backward()
    gradients = vision_gradients(tiny_model)
    assert all(gradient is not None and not gradient.any() for gradient in gradients)
    # Evaluation and inference (eval mode) are never touched.
    tiny_model.zero_grad(set_to_none=True)
    tiny_model.eval()
    embed_text_batch(tiny_model).sum().backward()
    assert all(gradient is None for gradient in vision_gradients(tiny_model))
