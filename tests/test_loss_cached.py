"""CachedPrefixRoutedLoss computes PrefixRoutedLoss's value, components and gradients on the tiny Qwen2-VL."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from sentence_transformers import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

from st_viomni import format_input
from st_viomni.losses import CachedPrefixRoutedLoss, PrefixRoutedLoss, make_label

RELATIVE_TOLERANCE = 1e-5


def mixed_rows() -> list[dict]:
    """Five rows of four tasks, images on some anchors, a shared answer, and a hard-negative column."""
    red, blue = Image.new("RGB", (56, 56), (220, 30, 30)), Image.new("RGB", (84, 56), (30, 30, 220))
    samples = [
        ("text_pair", "Con mèo ngồi trên thảm.", [], "Một con mèo nằm trên tấm thảm.", 0.8, "Trời mưa."),
        ("instr", "Dịch sang tiếng Anh: xin chào", [], "hello", None, "goodbye"),
        ("vqa_single", "Hình vuông màu gì?", [red], "đỏ", None, "xanh"),
        ("ocr", "Biển báo ghi gì?", [blue], "dừng lại", None, "đi tiếp"),
        ("vqa_multi", "Còn hình bên trái?", [red, blue], "đỏ", None, "vàng"),  # same answer as row 2
    ]
    return [
        {
            "anchor": format_input(task, anchor, images),
            "positive": format_input(task, positive),
            "negative": format_input(task, negative),
            "label": make_label(task, score, positive),
        }
        for task, anchor, images, positive, score, negative in samples
    ]


def collate(model, rows):
    # Exactly what the trainer feeds a loss: the collator's batch, split by the trainer into per-column features.
    batch = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)(rows)
    return SentenceTransformerTrainer.collect_features(None, batch)


def loss_and_gradients(model, loss_fn, rows):
    model.zero_grad(set_to_none=True)
    features, labels = collate(model, rows)
    output = loss_fn(features, labels)
    total = torch.stack(list(output.values())).sum()
    total.backward()
    gradients = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    return total.item(), {name: value.item() for name, value in output.items()}, gradients


@pytest.mark.parametrize(
    "options",
    # A token budget also takes each column's rows by length (each mini-batch gathers its rows and their pixels),
    # then restores batch order.
    # A budget of 1 token makes every row its own mini-batch, text-only rows of an image column included.
    [{"mini_batch_size": 2}, {"mini_batch_size": 8, "mini_batch_num_tokens": 40},
     {"mini_batch_size": 8, "mini_batch_num_tokens": 1}],
    ids=["rows", "tokens", "a-row-each"],
)
def test_cached_loss_equals_plain_loss_in_value_components_and_gradients(tiny_model, options):
    tiny_model.train()
    rows = mixed_rows()
    plain = loss_and_gradients(tiny_model, PrefixRoutedLoss(tiny_model), rows)
    cached = loss_and_gradients(tiny_model, CachedPrefixRoutedLoss(tiny_model, **options), rows)

    plain_loss, plain_components, plain_gradients = plain
    cached_loss, cached_components, cached_gradients = cached
    assert cached_loss == pytest.approx(plain_loss, rel=RELATIVE_TOLERANCE)
    assert cached_components == pytest.approx(plain_components, rel=RELATIVE_TOLERANCE, abs=1e-9)
    assert plain_components["loss_vqa_multi"] > 0 and plain_components["loss_vqa_single"] > 0
    assert set(cached_gradients) == set(plain_gradients)
    # The images reach the vision tower in both.
    assert any(name.startswith("0.model.visual") for name in plain_gradients)
    for name, plain_gradient in plain_gradients.items():
        error = (cached_gradients[name] - plain_gradient).norm() / plain_gradient.norm().clamp_min(1e-30)
        assert error <= RELATIVE_TOLERANCE, f"{name}: relative gradient error {error:.2e}"


def test_cached_loss_without_gradients_returns_the_same_components(tiny_model):
    rows = mixed_rows()
    with torch.no_grad():
        plain = PrefixRoutedLoss(tiny_model)(*collate(tiny_model, rows))
        cached = CachedPrefixRoutedLoss(tiny_model, mini_batch_size=3)(*collate(tiny_model, rows))
    assert {name: value.item() for name, value in cached.items()} == pytest.approx(
        {name: value.item() for name, value in plain.items()}, rel=RELATIVE_TOLERANCE, abs=1e-9
    )


def test_cached_loss_delegates_hyperparameters_and_can_return_a_scalar(tiny_model):
    loss = CachedPrefixRoutedLoss(tiny_model, temperature=0.1, margins={"vqa_multi": 0.4}, log_task_components=False)
    assert loss.temperature == 0.1 and loss.margins["vqa_multi"] == 0.4
    loss.temperature = 0.02
    assert loss.loss.temperature == 0.02
    assert loss.get_config_dict()["mini_batch_size"] == 32
    with torch.no_grad():
        value = loss(*collate(tiny_model, mixed_rows()[:2]))
    assert isinstance(value, torch.Tensor) and value.dim() == 0


def test_token_budget_refuses_videos_before_the_forward_pass(tiny_model, monkeypatch):
    features, labels = collate(tiny_model, mixed_rows()[:2])
    features[1]["video_grid_thw"] = torch.tensor([[2, 4, 4]])
    def embed(*args, **kwargs):
        pytest.fail("embedded before refusing")

    monkeypatch.setattr(type(tiny_model), "forward", embed)
    with pytest.raises(ValueError, match="column 1 holds videos"):
        CachedPrefixRoutedLoss(tiny_model, mini_batch_num_tokens=100)(features, labels)


def test_bad_row_fails_before_the_forward_pass(tiny_model):
    rows = mixed_rows()[:2]
    rows[1]["label"] = [0.0, float("nan"), 0.0, 0.0]  # a text_pair without a score
    features, labels = collate(tiny_model, rows)
    for loss in (PrefixRoutedLoss(tiny_model), CachedPrefixRoutedLoss(tiny_model)):
        with pytest.raises(ValueError, match="row 1: task 'text_pair' needs a gold score"):
            loss(features, labels)


@pytest.mark.parametrize("options", [{"mini_batch_size": 2}, {"mini_batch_size": 8, "mini_batch_num_tokens": 40}],
                         ids=["rows", "tokens"])
def test_inside_matryoshka_loss_the_cached_loss_equals_the_plain_one(tiny_model, options):
    # MatryoshkaLoss decorates the cached loss's calculate_loss, inside which the token budget's reordering runs.
    from sentence_transformers.losses import MatryoshkaLoss

    tiny_model.train()
    rows = mixed_rows()

    def value_and_gradients(inner):
        tiny_model.zero_grad(set_to_none=True)
        value = MatryoshkaLoss(tiny_model, inner, matryoshka_dims=[32, 16])(*collate(tiny_model, rows))
        value.backward()
        return value.item(), {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}

    plain_value, plain_gradients = value_and_gradients(PrefixRoutedLoss(tiny_model))
    cached_value, cached_gradients = value_and_gradients(CachedPrefixRoutedLoss(tiny_model, **options))
    assert cached_value == pytest.approx(plain_value, rel=RELATIVE_TOLERANCE)
    assert set(cached_gradients) == set(plain_gradients)
    for name, plain_gradient in plain_gradients.items():
        error = (cached_gradients[name] - plain_gradient).norm() / plain_gradient.norm().clamp_min(1e-30)
        assert error <= RELATIVE_TOLERANCE, f"{name}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("loss_class", [PrefixRoutedLoss, CachedPrefixRoutedLoss])
def test_inside_matryoshka_loss_a_scalar_is_returned(tiny_model, loss_class):
    from sentence_transformers.losses import MatryoshkaLoss

    loss = MatryoshkaLoss(tiny_model, loss_class(tiny_model), matryoshka_dims=[32, 16])
    value = loss(*collate(tiny_model, mixed_rows()))
    assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.item() > 0
    value.backward()
    assert tiny_model[2].linear.weight.grad is not None
