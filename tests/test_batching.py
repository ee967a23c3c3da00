"""Cost-aware encode batching (st_viomni.batching): same embeddings as stock sentence-transformers, in input
order, for any batch size; exact cost estimates before decoding; the padding bound; errors naming the input."""

import functools
import random

import numpy as np
import pytest
import torch
from PIL import Image
from sentence_transformers import SentenceTransformer

from st_viomni import ViOmniQwen, build_model, format_input
from st_viomni import batching
from st_viomni.batching import PixelBudget, cpu_batch_bounds, estimate_costs, padding_fraction, plan_batches

# (width, height): below min_pixels, above max_pixels, extreme and mild aspect ratios, odd sizes.
SIZES = [(20, 20), (57, 57), (100, 60), (60, 150), (800, 600), (1000, 90), (90, 1000), (333, 217), (640, 480)]


@pytest.fixture(scope="module")
def saved(tiny_base, tmp_path_factory):
    """A saved tiny viOmni model, loaded as ViOmniQwen and as plain SentenceTransformer."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("viomni-tiny"))
    build_model(tiny_base, embedding_dim=32).save(path)
    return ViOmniQwen(path), SentenceTransformer(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Images of varied sizes, each as a PIL image and as a JPEG path."""
    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    pil, paths = [], []
    for index, size in enumerate(SIZES):
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        for x in range(0, size[0], 7):
            image.putpixel((x, x * size[1] // size[0]), (0, 0, 0))
        path = folder / f"image{index}.jpg"
        image.save(path)
        pil.append(image)
        paths.append(str(path))
    return pil, paths


def _mixed_inputs(images):
    pil, paths = images
    return [
        "Con mèo ngồi trên tấm thảm.",
        format_input("ocr", images=[pil[4]]),
        paths[5],
        pil[2],
        {"image": paths[1], "text": "<vqa_single> Màu gì?"},
        "<instr> " + "hôm nay trời đẹp " * 20,
        {"text": "<vqa_multi> Which is taller?", "image": [pil[3], paths[6]]},
        format_input("vqa_single", "What colour?", [paths[7]]),
        "short",
        pil[0],
        {"image": [paths[8], pil[1]], "text": "<vqa_multi> Hai ảnh"},
        "The cat sat on the mat.",
    ]


def test_embeddings_equal_stock_in_input_order_for_any_batch_size_and_order(saved, images):
    model, stock = saved
    inputs = _mixed_inputs(images)
    reference = stock.encode(inputs, batch_size=len(inputs))
    for seed, batch_size in [(0, 1), (1, 3), (2, 5), (3, 32)]:
        order = list(range(len(inputs)))
        random.Random(seed).shuffle(order)
        encoded = model.encode([inputs[i] for i in order], batch_size=batch_size)
        np.testing.assert_allclose(encoded, reference[order], atol=1e-5, err_msg=f"batch_size={batch_size}")
    prompted = model.encode(inputs[:6], prompt_name="ocr", batch_size=2)
    np.testing.assert_allclose(prompted, stock.encode(inputs[:6], prompt_name="ocr"), atol=1e-5)


def test_inputs_each_over_the_token_budget_are_encoded_one_by_one_as_stock(saved, images, monkeypatch):
    model, stock = saved
    # An empty string and a repeated input among them; with a budget of 1 token every batch holds one input.
    inputs = [*_mixed_inputs(images)[:6], "", "short", _mixed_inputs(images)[0]]
    reference = stock.encode(inputs, batch_size=1)
    calls = []
    handle = model[0].register_forward_pre_hook(lambda module, args: calls.append(len(args[0]["input_ids"])))
    try:
        np.testing.assert_allclose(model.encode(inputs, max_batch_tokens=1), reference, atol=1e-5)
    finally:
        handle.remove()
    assert calls == [1] * len(inputs)
    # Without the background decoding of the next batch: the same embeddings.
    monkeypatch.setattr(batching, "PREFETCH", False)
    np.testing.assert_allclose(model.encode(inputs, batch_size=3), reference, atol=1e-5)


def test_encode_keeps_stock_output_forms(saved, images):
    model, stock = saved
    inputs = _mixed_inputs(images)[:5]
    expected = stock.encode(inputs)
    tensor = model.encode(inputs, convert_to_tensor=True, batch_size=2)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (5, 32)
    as_list = model.encode(inputs, convert_to_numpy=False, batch_size=2)
    assert isinstance(as_list, list) and len(as_list) == 5 and all(isinstance(row, torch.Tensor) for row in as_list)
    np.testing.assert_allclose(torch.stack(as_list).numpy(), expected, atol=1e-5)
    assert model.encode(inputs[1]).shape == (32,)  # a single input gives a single vector
    truncated = model.encode(inputs, truncate_dim=8, normalize_embeddings=True, batch_size=2)
    np.testing.assert_allclose(truncated, stock.encode(inputs, truncate_dim=8, normalize_embeddings=True), atol=1e-5)
    binary = model.encode(inputs, precision="ubinary", batch_size=2)
    np.testing.assert_array_equal(binary, stock.encode(inputs, precision="ubinary"))
    tokens = model.encode(inputs, output_value="token_embeddings")  # not planned: the stock path
    assert len(tokens) == 5 and tokens[0].shape[-1] == 64


def test_encode_query_and_document_are_planned_too(saved, images):
    model, stock = saved
    inputs = _mixed_inputs(images)
    calls = []
    handle = model[0].register_forward_pre_hook(lambda module, args: calls.append(len(args[0]["input_ids"])))
    try:
        queries = model.encode_query(inputs, batch_size=8)
        documents = model.encode_document(inputs, batch_size=8)
    finally:
        handle.remove()
    plan = plan_batches([cost.tokens for cost in estimate_costs(model, inputs)], 8)
    assert calls == [len(batch) for batch in plan] * 2
    np.testing.assert_allclose(queries, stock.encode_query(inputs), atol=1e-5)
    np.testing.assert_allclose(documents, stock.encode_document(inputs), atol=1e-5)


def test_cost_estimate_equals_the_processors_token_count(saved, images, tmp_path):
    model, _ = saved
    pil, paths = images
    rotated = Image.new("RGB", (300, 70), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: 70x300 once oriented
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    inputs = [*pil, *paths, str(tmp_path / "rotated.jpg"), Image.open(tmp_path / "rotated.jpg")]
    inputs += [{"image": [pil[0], paths[4]], "text": "<vqa_multi> hai"}, "chỉ có chữ", "<instr> " + "dài " * 50]
    for prompt in (None, model.prompts["ocr"]):
        costs = estimate_costs(model, inputs, prompt)
        for value, cost in zip(inputs, costs):
            features = model.preprocess([value], prompt=prompt)
            assert cost.tokens == int(features["attention_mask"].sum()), value
            grid = features.get("image_grid_thw")
            assert cost.image_patches == (0 if grid is None else int(grid.prod(dim=1).sum()))
            assert cost.visual_tokens == cost.image_patches // 4
    budget = PixelBudget.of(model[0].processor.image_processor)
    assert budget.visual_tokens(2000, 2000) == 64 and budget.visual_tokens(20, 20) == 4  # the tiny budget: 4..64


def test_plans_respect_the_padding_and_size_bounds():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(5, 40), rng.randint(100, 700)]) for _ in range(500)]
    cases = [(8, 0.05, None), (32, 0.0, None), (4, 0.2, 2000), (1, 0.05, None), (16, None, 3000)]
    for max_items, max_padding, max_tokens in cases:
        batches = plan_batches(lengths, max_items, max_padding=max_padding, max_tokens=max_tokens)
        assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
        for batch in batches:
            longest = max(lengths[index] for index in batch)
            assert len(batch) <= max_items
            assert max_padding is None or padding_fraction(lengths, [batch]) <= max_padding + 1e-12
            assert max_tokens is None or len(batch) == 1 or len(batch) * longest <= max_tokens
    assert plan_batches([5, 9, 9, 1], 2) == [[1, 2], [0], [3]]
    assert plan_batches([], 8) == []


def test_plans_respect_the_patch_bound():
    rng = random.Random(1)
    lengths = [rng.randint(5, 700) for _ in range(300)]
    patches = [rng.choice([0, 0, rng.randint(16, 4096)]) for _ in lengths]
    batches = plan_batches(lengths, 8, max_padding=0.5, patches=patches, max_patches=3000)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    assert all(len(batch) == 1 or sum(patches[index] for index in batch) <= 3000 for batch in batches)
    assert any(len(batch) == 1 and patches[batch[0]] > 3000 for batch in batches)  # an oversized image alone
    assert plan_batches([9, 9, 9], 8, patches=[10, 10, 10], max_patches=20) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="patches"):
        plan_batches([9, 9], 8, max_patches=20)


def test_cpu_bounds_keep_mlp_activations_within_the_budget(saved):
    model, _ = saved
    text, vision = model[0].model.config.text_config, model[0].model.config.vision_config
    max_tokens, max_patches = cpu_batch_bounds(model)
    assert max_tokens == batching.CPU_ACTIVATION_BYTES // (text.intermediate_size * 4)  # float32
    assert max_patches == batching.CPU_ACTIVATION_BYTES // (vision.embed_dim * vision.mlp_ratio * 4)


def test_cpu_bounds_use_each_towers_dtype(tiny_base):
    torch.manual_seed(0)
    model = build_model(tiny_base, embedding_dim=32)
    text, vision = model[0].model.config.text_config, model[0].model.config.vision_config
    model[0].model.language_model.to(torch.bfloat16)  # the vision tower stays in float32
    max_tokens, max_patches = cpu_batch_bounds(model)
    assert max_tokens == batching.CPU_ACTIVATION_BYTES // (text.intermediate_size * 2)
    assert max_patches == batching.CPU_ACTIVATION_BYTES // (vision.embed_dim * vision.mlp_ratio * 4)


def test_cpu_encode_keeps_each_batch_within_the_bounds(saved, images, monkeypatch):
    model, stock = saved
    inputs = _mixed_inputs(images) * 2
    reference = stock.encode(inputs, batch_size=4)
    text, vision = model[0].model.config.text_config, model[0].model.config.vision_config
    # A budget that binds on the tiny model: 100 padded tokens or 300 image patches per batch.
    monkeypatch.setattr(batching, "CPU_ACTIVATION_BYTES", 100 * text.intermediate_size * 4)
    max_patches = 100 * text.intermediate_size // (vision.embed_dim * vision.mlp_ratio)
    assert cpu_batch_bounds(model) == (100, max_patches)
    seen = []
    handle = model[0].register_forward_pre_hook(lambda module, args: seen.append(dict(args[0])))
    try:
        encoded = model.encode(inputs, batch_size=8)
        calls = len(seen)
        model.encode(inputs, batch_size=8, max_batch_tokens=10**6)  # an explicit token bound replaces the CPU one
    finally:
        handle.remove()
    np.testing.assert_allclose(encoded, reference, atol=1e-5)
    unbounded = plan_batches([cost.tokens for cost in estimate_costs(model, inputs)], 8)
    assert calls > len(unbounded)
    for features in seen[:calls]:
        rows, length = features["attention_mask"].shape
        grid = features.get("image_grid_thw")
        assert rows == 1 or rows * length <= 100
        assert rows == 1 or grid is None or int(grid.prod(dim=1).sum()) <= max_patches
    assert any(features["attention_mask"].numel() > 100 for features in seen[calls:])


def test_encoded_batches_stay_within_the_padding_bound(saved, images):
    model, _ = saved
    inputs = _mixed_inputs(images) * 3
    seen = []
    handle = model[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]["attention_mask"]))
    try:
        model.encode(inputs, batch_size=8)
    finally:
        handle.remove()
    plan = plan_batches([cost.tokens for cost in estimate_costs(model, inputs)], 8)
    assert [mask.shape[0] for mask in seen] == [len(batch) for batch in plan]
    computed = sum(mask.numel() for mask in seen)
    useful = sum(int(mask.sum()) for mask in seen)
    assert sum(mask.shape[0] for mask in seen) == len(inputs)
    assert all(mask.shape[0] <= 8 for mask in seen)
    assert (computed - useful) / computed <= 0.05


def test_bad_inputs_name_the_callers_index(saved, images, tmp_path):
    model, _ = saved
    good = _mixed_inputs(images)[:4]
    with pytest.raises(ValueError, match="input 5 is None"):
        model.encode([*good, "fine", None, "a much longer text than the others, sorted first"])
    with pytest.raises(FileNotFoundError, match=r"input 4 names an image file that does not exist"):
        model.encode([*good, str(tmp_path / "typo.png")])
    with pytest.raises(FileNotFoundError, match=r"input 4\['image'\]\[1\]: image file not found"):
        model.encode([*good, {"image": [images[0][0], str(tmp_path / "missing.jpg")], "text": "q"}])
    (tmp_path / "garbage.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"input 2: cannot decode image file"):
        model.encode(["a", "b", str(tmp_path / "garbage.jpg")])
    # A valid header with a truncated body fails only when decoded (a batch later), still naming its index.
    Image.new("RGB", (400, 300), "red").save(tmp_path / "truncated.png")
    data = (tmp_path / "truncated.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"input 3: cannot decode image file"):
        model.encode(["a", "b", "c", str(tmp_path / "truncated.png")], batch_size=1)
    with pytest.raises(ValueError, match=r"input 2: cannot decode image: image file is truncated"):
        model.encode(["a", "b", Image.open(tmp_path / "truncated.png")])  # a PIL image, opened lazily
    with pytest.raises(ValueError, match=r"input 2 has unknown key\(s\) \['foo'\]; expected 'text' and/or 'image'"):
        model.encode(["hello", images[1][0], {"text": "x", "foo": 1}])


def test_every_batch_type_stock_accepts_is_planned_and_errors_name_the_callers_index(saved, tmp_path):
    import datasets

    model, stock = saved
    texts = ["a", "hello there", "b", "một câu dài hơn nhiều so với những câu khác"]
    expected = stock.encode(texts)
    column = datasets.Dataset.from_dict({"x": texts})["x"]
    for batch in (column, np.array(texts), np.array(texts, dtype=object), tuple(texts)):
        np.testing.assert_allclose(model.encode(batch, batch_size=2), expected, atol=1e-5, err_msg=type(batch))
    missing = [*texts[:3], str(tmp_path / "missing.png")]
    with pytest.raises(FileNotFoundError, match="input 3 names an image file that does not exist"):
        model.encode(np.array(missing))
    with pytest.raises(FileNotFoundError, match="input 3 names an image file that does not exist"):
        model.encode(datasets.Dataset.from_dict({"x": missing})["x"])
    with pytest.raises(ValueError, match="input 2 is None"):
        model.encode(np.array(["hello", "some longer text here", None], dtype=object))


def test_images_qwen2_vl_cannot_take_are_refused_before_encoding_naming_the_input(saved, images, tmp_path, monkeypatch):
    model, _ = saved
    good = _mixed_inputs(images)[:3]
    Image.new("RGB", (5000, 20)).save(tmp_path / "wide.png")
    wide = r"image file '.*wide\.png' is 5000x20, an aspect ratio of 250; Qwen2-VL takes at most 200"
    with pytest.raises(ValueError, match=rf"input 3: {wide}"):
        model.encode([*good, str(tmp_path / "wide.png")])
    with pytest.raises(ValueError, match=rf"input 0: {wide}"):
        model.encode(str(tmp_path / "wide.png"))  # one input: the stock path
    with pytest.raises(ValueError, match=r"input 3\['image'\]\[1\]: image is 20x5000, an aspect ratio of 250"):
        model.encode([*good, {"image": [images[0][0], Image.new("RGB", (20, 5000))], "text": "q"}])
    Image.new("1", (150, 150)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 150x150 is then over the limit (twice this)
    with pytest.raises(ValueError, match=r"input 1\['image'\]: image file '.*bomb\.png' is too large to decode"):
        model.encode(["a", {"image": str(tmp_path / "bomb.png")}])


def test_an_unknown_precision_is_refused_before_anything_is_encoded(saved, images):
    model, _ = saved
    calls = []
    handle = model[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"Precision 'float16' is not supported, must be one of \{"):
            model.encode(_mixed_inputs(images), precision="float16", batch_size=2)
    finally:
        handle.remove()
    assert calls == []


def test_the_stock_path_decodes_images_batch_by_batch(saved, images, monkeypatch):
    model, _ = saved
    paths = images[1][:5]
    planned = model.encode(paths, batch_size=2)
    received = []
    stock_encode = SentenceTransformer.encode

    @functools.wraps(stock_encode)  # encode binds its arguments to stock's signature
    def recording(self, inputs, *args, **kwargs):
        received.append([type(value).__name__ for value in inputs])
        return stock_encode(self, inputs, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", recording)
    unplanned = model.encode(paths, batch_size=2, max_padding=None)
    tokens = model.encode(paths, batch_size=2, output_value="token_embeddings")
    # Stock encode gets the paths; preprocess decodes each batch's images (with load_image) as it comes.
    assert received == [["str"] * 5] * 2
    np.testing.assert_allclose(unplanned, planned, atol=1e-5)
    assert len(tokens) == 5
