"""DeferredPixelCollator: the stock collator's batch without its pixels, and the losses compute them per mini-batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sentence_transformers import SentenceTransformerTrainer
from sentence_transformers.base.losses.gradcache import _create_minibatch
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
from torch.utils.data import DataLoader

from st_viomni import DeferredPixelCollator, deferred_pixels, format_input, formatting
from st_viomni.deferred_pixels import IMAGES, image_grid, with_pixels
from st_viomni.losses import CachedPrefixRoutedLoss, PrefixRoutedLoss, make_label
from st_viomni.losses.token_budget import (
    MINI_BATCH_PLAN,
    MiniBatchPlan,
    padded_token_ranges,
    row_patches,
    rows_by_length,
    select_rows,
    vision_patch_cost,
)
from st_viomni.testing import preset_config

from test_loss_cached import RELATIVE_TOLERANCE, mixed_rows


def image_rows() -> list[dict]:
    """Eight rows, text-only and one- and two-image anchors of varied sizes, so mini-batches differ."""
    sizes = [(56, 56), (300, 90), (40, 40), (700, 500), (28, 280), (123, 77)]
    images = [Image.new("RGB", size, (40 * index, 100, 200 - 30 * index)) for index, size in enumerate(sizes)]
    anchors = [
        ("ocr", "Biển báo ghi gì?", [images[0]]),
        ("instr", "Dịch sang tiếng Anh: xin chào", []),
        ("vqa_multi", "So sánh hai hình.", [images[1], images[2]]),
        ("text_pair", "Con mèo ngồi trên thảm.", []),
        ("vqa_single", "Có bao nhiêu hình?", [images[3]]),
        ("ocr", "Dòng đầu tiên là gì?", [images[4]]),
        ("instr", "Viết một câu về trường học.", []),
        ("vqa_single", "Màu gì?", [images[5]]),
    ]
    return [
        {
            "anchor": format_input(task, text, pictures),
            "positive": format_input(task, f"câu trả lời {index}"),
            "label": make_label(task, 0.5 if task == "text_pair" else None, f"câu trả lời {index}"),
        }
        for index, (task, text, pictures) in enumerate(anchors)
    ]


def features(collator, rows):
    # What the trainer hands a loss: the collated batch split into per-column features.
    return SentenceTransformerTrainer.collect_features(None, collator(rows))


def loss_and_gradients(model, loss_fn, collator, rows):
    model.zero_grad(set_to_none=True)
    output = loss_fn(*features(collator, rows))
    total = torch.stack(list(output.values())).sum()
    total.backward()
    gradients = {
        name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None
    }
    return total.item(), {name: value.item() for name, value in output.items()}, gradients


def test_the_collated_tokens_are_the_stock_collators_and_the_pixels_are_computed_later(tiny_model):
    rows = image_rows()
    (stock_anchor, stock_positive), _ = features(SentenceTransformerDataCollator(tiny_model.preprocess), rows)
    (anchor, positive), _ = features(DeferredPixelCollator(tiny_model.preprocess), rows)
    assert "pixel_values" not in anchor and len(anchor[IMAGES]) == 6
    assert IMAGES not in positive  # a text-only column is collated as usual
    for key, value in stock_anchor.items():
        if key != "pixel_values" and isinstance(value, torch.Tensor):
            assert torch.equal(anchor[key], value), key

    image_processor = tiny_model[0].processor.image_processor
    assert torch.equal(with_pixels(anchor, image_processor)["pixel_values"], stock_anchor["pixel_values"])
    for begin, end in [(0, 3), (1, 2), (3, 4), (4, 8)]:  # includes a text-only mini-batch (3, 4)
        expected = _create_minibatch(stock_anchor, begin, end)
        mini_batch = with_pixels(anchor, image_processor, begin, end)
        assert set(mini_batch) == set(expected), (begin, end)
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(mini_batch[key], value), (begin, end, key)


def noise_rows(sizes, transparency=False) -> list[dict]:
    """One vqa_single row per size, each with a random-noise image (a resize of a flat colour proves nothing)."""
    generator = np.random.default_rng(0)
    rows = []
    for index, (width, height) in enumerate(sizes):
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if transparency:
            pixels[: height // 2] = 0  # the transparent colour, so that compositing it onto white shows
        image = Image.fromarray(pixels)
        if transparency:
            image.info["transparency"] = (0, 0, 0)
        rows.append(
            {
                "anchor": format_input("vqa_single", f"Hình {index} có gì?", [image]),
                "positive": format_input("vqa_single", f"câu trả lời {index}"),
                "label": make_label("vqa_single", None, f"câu trả lời {index}"),
            }
        )
    return rows


# tiny's pixel budget is 56x56 to 224x224: these are scaled down, up, and kept.
NOISE_SIZES = [(700, 500), (40, 40), (300, 90), (112, 56), (1344, 896)]


def assert_the_pixels_are_the_stock_collators(model, rows, anchor) -> dict:
    """The whole column's pixels from ``anchor`` (collated by DeferredPixelCollator) equal the stock collator's
    bitwise; returns the stock column."""
    (stock_anchor, _), _ = features(SentenceTransformerDataCollator(model.preprocess), rows)
    image_processor = model[0].processor.image_processor
    assert torch.equal(with_pixels(anchor, image_processor)["pixel_values"], stock_anchor["pixel_values"])
    return stock_anchor


def row_images(rows) -> list[Image.Image]:
    return [image for row in rows for image in row["anchor"]["image"]]


def assert_resized_or_shared(anchor, rows, image_processor) -> None:
    """Each image the collator hands on is the uint8 tensor of its resize, or, where it already has the
    model's size, the row's own image (no copy)."""
    patch = image_processor.patch_size
    grids = anchor["image_grid_thw"].tolist()
    for image, original, (_, grid_rows, grid_columns) in zip(anchor[IMAGES], row_images(rows), grids, strict=True):
        if original.size == (grid_columns * patch, grid_rows * patch):
            assert image is original
        else:
            assert image.dtype == torch.uint8 and tuple(image.shape) == (3, grid_rows * patch, grid_columns * patch)


def test_the_collator_resizes_each_image_once_and_the_pixels_are_the_stock_collators_bitwise(tiny_model):
    rows = noise_rows(NOISE_SIZES)
    (anchor, _), _ = features(DeferredPixelCollator(tiny_model.preprocess), rows)
    image_processor = tiny_model[0].processor.image_processor
    assert_resized_or_shared(anchor, rows, image_processor)
    assert sum(isinstance(image, Image.Image) for image in anchor[IMAGES]) == 1  # the 112x56 image is kept

    stock_anchor = assert_the_pixels_are_the_stock_collators(tiny_model, rows, anchor)
    for begin, end in [(0, 2), (2, 5), (4, 5)]:
        expected = _create_minibatch(stock_anchor, begin, end)["pixel_values"]
        assert torch.equal(with_pixels(anchor, image_processor, begin, end)["pixel_values"], expected), (begin, end)


def test_a_data_loader_worker_collates_the_resized_images(tiny_model):
    # The recipes collate in data-loader worker processes: the resize happens there, the pixels stay exact.
    rows = noise_rows(NOISE_SIZES)
    collator = DeferredPixelCollator(tiny_model.preprocess)
    loader = DataLoader(rows, batch_size=len(rows), collate_fn=collator, num_workers=1)
    (anchor, _), _ = SentenceTransformerTrainer.collect_features(None, next(iter(loader)))
    resized = [image for image in anchor[IMAGES] if isinstance(image, torch.Tensor)]
    assert len(resized) == len(NOISE_SIZES) - 1 and all(image.dtype == torch.uint8 for image in resized)
    assert_the_pixels_are_the_stock_collators(tiny_model, rows, anchor)


def test_images_the_processor_composites_are_handed_on_as_they_are(tiny_model):
    # An RGB image with a transparent colour is composited onto white by the processor before it resizes.
    rows = noise_rows(NOISE_SIZES[:2], transparency=True)
    (anchor, _), _ = features(DeferredPixelCollator(tiny_model.preprocess), rows)
    assert all(isinstance(image, Image.Image) for image in anchor[IMAGES])
    assert_the_pixels_are_the_stock_collators(tiny_model, rows, anchor)


@pytest.mark.parametrize(
    "size", [(1, 1), (27, 29), (56, 56), (57, 111), (300, 90), (90, 300), (1344, 1344), (2000, 37), (640, 480)]
)
def test_the_grid_from_the_size_is_the_image_processors(tiny_model, size):
    image_processor = tiny_model[0].processor.image_processor
    image = Image.new("RGB", size)
    processed = image_processor([image], return_tensors="pt")
    assert image_grid(image, image_processor) == processed["image_grid_thw"][0].tolist()


@pytest.mark.parametrize(
    "options",
    # A budget of 1: every row is a mini-batch of its own, with its own images or none.
    [{"mini_batch_size": 2}, {"mini_batch_size": 8, "mini_batch_num_tokens": 40},
     {"mini_batch_size": 8, "mini_batch_num_tokens": 1}],
    ids=["rows", "tokens", "a-row-each"],
)
def test_the_cached_loss_on_deferred_pixels_equals_the_plain_loss_on_stock_batches(tiny_model, monkeypatch, options):
    # With a token budget the rows are also taken by length (and the embeddings put back in batch order).
    tiny_model.train()
    rows = mixed_rows()
    stock = SentenceTransformerDataCollator(tiny_model.preprocess)
    plain = loss_and_gradients(tiny_model, PrefixRoutedLoss(tiny_model), stock, rows)
    plain_loss, plain_components, plain_gradients = plain

    image_processor = type(tiny_model[0].processor.image_processor)
    images_per_call = []
    original_call = image_processor.__call__

    def spy(self, images, *args, **kwargs):
        images_per_call.append(len(images))
        return original_call(self, images, *args, **kwargs)

    monkeypatch.setattr(image_processor, "__call__", spy)
    deferred = DeferredPixelCollator(tiny_model.preprocess)
    cached = loss_and_gradients(tiny_model, CachedPrefixRoutedLoss(tiny_model, **options), deferred, rows)
    cached_loss, cached_components, cached_gradients = cached

    assert cached_loss == pytest.approx(plain_loss, rel=RELATIVE_TOLERANCE)
    assert cached_components == pytest.approx(plain_components, rel=RELATIVE_TOLERANCE, abs=1e-9)
    assert set(cached_gradients) == set(plain_gradients)
    for name, plain_gradient in plain_gradients.items():
        error = (cached_gradients[name] - plain_gradient).norm() / plain_gradient.norm().clamp_min(1e-30)
        assert error <= RELATIVE_TOLERANCE, f"{name}: relative gradient error {error:.2e}"
    # Pixels were computed per mini-batch, in both GradCache passes, never for the batch's 4 images at once.
    assert sum(images_per_call) == 2 * 4 and max(images_per_call) < 4, images_per_call


def test_the_plain_loss_computes_deferred_pixels_for_the_whole_batch(tiny_model):
    rows = image_rows()
    loss = PrefixRoutedLoss(tiny_model)
    with torch.no_grad():
        stock = loss(*features(SentenceTransformerDataCollator(tiny_model.preprocess), rows))
        deferred = loss(*features(DeferredPixelCollator(tiny_model.preprocess), rows))
    for name, value in stock.items():
        assert deferred[name].item() == pytest.approx(value.item(), rel=RELATIVE_TOLERANCE, abs=1e-9), name


def test_the_collator_needs_a_qwen2_vl_model():
    with pytest.raises(ValueError, match="preprocess_fn=model.preprocess of a Qwen2-VL model"):
        DeferredPixelCollator(lambda inputs, **kwargs: {})


def test_token_budget_mini_batches_bound_padded_tokens_plus_priced_patches(tiny_model, monkeypatch):
    # One long image row among short texts: in batch order, a non-padding budget would pad the short rows to it.
    rows = image_rows()
    budget = 120
    patch_cost = vision_patch_cost(tiny_model[0].model.config)
    mini_batches = []
    original = CachedPrefixRoutedLoss.embed_minibatch

    def spy(self, sentence_feature, begin, end, *args, **kwargs):
        reps, state = original(self, sentence_feature, begin, end, *args, **kwargs)
        rows = sentence_feature[MINI_BATCH_PLAN].order[begin:end]  # positions in the column's length order
        longest = int(sentence_feature["attention_mask"][rows].sum(dim=1).max())
        patches = int(row_patches(sentence_feature)[rows].sum())
        mini_batches.append((end - begin, longest, patches))
        return reps, state

    monkeypatch.setattr(CachedPrefixRoutedLoss, "embed_minibatch", spy)
    # mini_batch_size=1: the budget, not the row count, cuts the mini-batches (as in sentence-transformers).
    loss = CachedPrefixRoutedLoss(tiny_model, mini_batch_size=1, mini_batch_num_tokens=budget)
    with torch.no_grad():
        loss(*features(DeferredPixelCollator(tiny_model.preprocess), rows))
    assert len(mini_batches) > 2
    assert any(size > 1 and patches for size, _, patches in mini_batches), "no mini-batch shares rows with images"
    for size, longest, patches in mini_batches:
        assert size * longest + patch_cost * patches <= budget or size == 1, mini_batches


def test_token_budget_ranges_are_contiguous_and_need_rows_ordered_by_length():
    lengths = [10, 9, 5, 5, 4, 1]
    assert padded_token_ranges(lengths, num_tokens=20) == [(0, 2), (2, 6)]
    assert padded_token_ranges(lengths, num_tokens=5) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    assert padded_token_ranges([], num_tokens=5) == []
    with pytest.raises(ValueError, match="longest first"):
        padded_token_ranges(lengths[::-1], num_tokens=20)


def test_token_budget_replaces_the_row_count_as_in_sentence_transformers():
    # 64 one-token rows fit a budget of 64 as one mini-batch: the budget bounds activations, not rows.
    assert padded_token_ranges([1] * 64, num_tokens=64) == [(0, 64)]
    assert padded_token_ranges([1] * 65, num_tokens=64) == [(0, 64), (64, 65)]


def test_token_budget_ranges_count_the_vision_cost_of_each_row():
    lengths = [10, 9, 5, 5]
    assert padded_token_ranges(lengths, num_tokens=20) == [(0, 2), (2, 4)]
    # Row 1's images cost 8 tokens: 2 x 10 + 8 and then 2 x 9 + 8 exceed 20; two text rows of 5 fit.
    assert padded_token_ranges(lengths, 20, vision_costs=[0, 8, 0, 0]) == [(0, 1), (1, 2), (2, 4)]
    # A row whose images alone exceed the budget is a mini-batch of its own.
    assert padded_token_ranges(lengths, 20, vision_costs=[0, 0, 30, 0]) == [(0, 2), (2, 3), (3, 4)]


def test_row_patches_sums_each_rows_image_grids(tiny_model):
    (feature, text_column), _ = features(DeferredPixelCollator(tiny_model.preprocess), image_rows())
    grids = feature["image_grid_thw"].prod(dim=1).tolist()
    per_row = feature["num_images_per_sample"].tolist()
    expected, first = [], 0
    for count in per_row:
        expected.append(sum(grids[first : first + count]))
        first += count
    assert row_patches(feature).tolist() == expected
    assert 0 in expected and sum(expected) == sum(grids)
    assert row_patches(text_column).tolist() == [0] * 8


def test_vision_patch_cost_prices_a_patch_by_the_towers_depths_and_widths():
    # depth x width x (1 + mlp_ratio) / (text layers x (hidden + intermediate))
    assert vision_patch_cost(preset_config("tiny")) == 2 * 32 * 3 / (2 * (64 + 128))
    assert vision_patch_cost(preset_config("full-2b")) == pytest.approx(32 * 1280 * 5 / (28 * (1536 + 8960)))
    assert vision_patch_cost(preset_config("proxy-2b")) == pytest.approx(2 * 1280 * 5 / (2 * (1536 + 8960)))
    assert vision_patch_cost(None) == 0.0  # no vision tower


def test_vision_patch_cost_refuses_a_vision_tower_it_cannot_price():
    from transformers import Qwen2_5_VLConfig

    with pytest.raises(ValueError, match="Qwen2_5_VLVisionConfig"):
        vision_patch_cost(Qwen2_5_VLConfig())


def test_rows_by_length_is_longest_first_with_ties_in_batch_order():
    mask = torch.zeros(5, 6, dtype=torch.long)
    for row, length in enumerate([2, 6, 2, 4, 6]):
        mask[row, :length] = 1
    assert rows_by_length({"attention_mask": mask}).tolist() == [1, 4, 3, 0, 2]


@pytest.mark.parametrize("collator", [SentenceTransformerDataCollator, DeferredPixelCollator])
def test_select_rows_gathers_the_rows_and_their_images_only(tiny_model, collator):
    (anchor, _), _ = features(collator(tiny_model.preprocess), image_rows())
    images_per_row = anchor["num_images_per_sample"].tolist()  # [1, 0, 2, 0, 1, 1, 0, 1]
    first_image = [sum(images_per_row[:row]) for row in range(len(images_per_row))]
    rows = [4, 2, 1]  # one image, two images, none: in this order
    plan = MiniBatchPlan(torch.arange(8), [(0, 8)])
    selected = select_rows({**anchor, MINI_BATCH_PLAN: plan}, torch.tensor(rows))

    assert MINI_BATCH_PLAN not in selected
    for key, value in anchor.items():
        if isinstance(value, torch.Tensor) and key not in ("image_grid_thw", "pixel_values"):
            assert torch.equal(selected[key], value[rows]), key
    images = [first_image[row] + k for row in rows for k in range(images_per_row[row])]
    assert torch.equal(selected["image_grid_thw"], anchor["image_grid_thw"][images])
    if IMAGES in anchor:
        assert all(a is b for a, b in zip(selected[IMAGES], [anchor[IMAGES][i] for i in images], strict=True))
    else:
        patches = anchor["image_grid_thw"].prod(dim=1).tolist()
        starts = [sum(patches[:i]) for i in range(len(patches))]
        expected = torch.cat([anchor["pixel_values"][starts[i] : starts[i] + patches[i]] for i in images])
        assert torch.equal(selected["pixel_values"], expected)

    text_only = select_rows(anchor, torch.tensor([3, 6]))
    assert text_only["image_grid_thw"].shape == (0, 3)
    assert text_only.get("pixel_values", torch.empty(0)).numel() == 0 and not text_only.get(IMAGES)


def test_an_image_qwen2_vl_cannot_resize_is_named_by_column_row_and_index(tiny_model, monkeypatch):
    # Qwen2-VL's smart_resize refuses aspect ratios over 200 (a tall receipt strip). Data validation refuses such
    # an image first (st_viomni.formatting.load_image); should one reach the collator, it says which it is.
    monkeypatch.setattr(formatting, "MAX_ASPECT_RATIO", math.inf, raising=False)  # a validation that lets it in
    square = Image.new("RGB", (56, 56), (200, 30, 30))
    strip = Image.new("RGB", (20, 4200), (255, 255, 255))
    positives = [[], [square], [square, strip]]
    rows = [
        {
            "anchor": format_input("ocr", f"Ảnh {index} ghi gì?", [square]),
            "positive": format_input("ocr", f"câu trả lời {index}", images),
            "label": make_label("ocr", None, f"câu trả lời {index}", images),
        }
        for index, images in enumerate(positives)
    ]
    message = (
        r"column 'positive': row 2 of the batch, image 1 of the row \(image 2 of the column, 20x4200 pixels\): "
        r"Qwen2-VL's image processor cannot resize it: absolute aspect ratio must be smaller than 200, got 210"
    )
    with pytest.raises(ValueError, match=message):
        DeferredPixelCollator(tiny_model.preprocess)(rows)


def test_the_collator_names_the_column_of_an_input_the_model_refuses(tiny_model):
    rows = image_rows()[:3]
    rows[1]["positive"] = None
    with pytest.raises(ValueError, match=r"^column 'positive': input 1\b"):
        DeferredPixelCollator(tiny_model.preprocess)(rows)


@pytest.mark.parametrize(
    ("loss_class", "options"),
    [
        (PrefixRoutedLoss, {}),
        (CachedPrefixRoutedLoss, {"mini_batch_size": 2}),
        (CachedPrefixRoutedLoss, {"mini_batch_size": 8, "mini_batch_num_tokens": 120}),
    ],
    ids=["plain", "rows", "tokens"],
)
def test_a_grid_mismatch_gives_both_grids_and_the_image_size(tiny_model, monkeypatch, loss_class, options):
    # Should the size-only grid ever disagree with the image processor, the step stops rather than embed misaligned
    # tokens, with what the disagreement is debugged from; no positions, which the token budget's length order
    # would make misleading.
    rows = image_rows()
    bad = rows[4]["anchor"]["image"][0]
    size_only_grid = deferred_pixels.image_grid

    def wrong_grid_for_bad(image, processor):
        return [1, 2, 2] if image is bad else size_only_grid(image, processor)

    monkeypatch.setattr(deferred_pixels, "image_grid", wrong_grid_for_bad)
    batch = features(DeferredPixelCollator(tiny_model.preprocess), rows)
    processor = tiny_model[0].processor.image_processor
    _, grid_rows, grid_columns = size_only_grid(bad, processor)  # the collator hands it on resized to this grid
    width, height = grid_columns * processor.patch_size, grid_rows * processor.patch_size
    message = (
        rf"the image processor gave grids \[.*\] for images of \(width, height\) \[.*\({width}, {height}\).*\], "
        r"DeferredPixelCollator computed \[.*\[1, 2, 2\].*\] from their sizes"
    )
    with torch.no_grad(), pytest.raises(RuntimeError, match=message):
        loss_class(tiny_model, **options)(*batch)
