import json

import numpy as np
import pytest
import torch
from PIL import Image
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from transformers import AutoProcessor, Qwen2VLModel

from st_viomni import PREFIXES, ViOmniQwen, build_model, format_input
from st_viomni.testing import make_tiny_base_model


def _scene(size, colour):
    return Image.new("RGB", size, colour)


def _items():
    red, wide, tall = _scene((100, 60), (220, 20, 20)), _scene((200, 80), (30, 30, 200)), _scene((60, 150), "green")
    return [
        ("text_pair", "Con mèo ngồi trên tấm thảm.", []),
        ("ocr", None, [red]),
        ("vqa_single", "What colour is the square on the left?", [wide]),
        ("vqa_multi", "Which picture is taller?", [red, tall]),
        ("instr", "Translate into English: " + "hôm nay trời đẹp " * 12, []),
    ]


def _reference_embedding(base_path, dense, task, text, images):
    """processor -> Qwen2-VL forward -> mean over the attention mask -> Dense weights -> L2, by hand."""
    processor = AutoProcessor.from_pretrained(base_path)
    model = Qwen2VLModel.from_pretrained(base_path).eval()
    prefix = PREFIXES[task]
    user_text = f"{prefix} {text}" if text else prefix
    prompt = "<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * len(images) + user_text + "<|im_end|>\n"
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    projected = mean @ dense.linear.weight.T + dense.linear.bias
    return torch.nn.functional.normalize(projected, dim=-1)[0].detach().numpy()


def test_build_model_composes_stock_modules(tiny_model):
    assert isinstance(tiny_model, ViOmniQwen)
    transformer, pooling, dense, normalize = list(tiny_model)
    assert type(transformer) is Transformer and type(pooling) is Pooling
    assert type(dense) is Dense and type(normalize) is Normalize
    assert pooling.pooling_mode == "mean" and pooling.include_prompt
    assert isinstance(dense.activation_function, torch.nn.Identity)
    assert (dense.in_features, dense.out_features) == (64, 32)
    assert tiny_model.get_embedding_dimension() == 32
    assert {name: tiny_model.prompts[name] for name in PREFIXES} == PREFIXES
    assert transformer.unpad_inputs is False


def test_default_embedding_dim_is_1024(tiny_base):
    assert build_model(tiny_base).get_embedding_dimension() == 1024


def test_max_seq_length_is_capped_to_the_language_model_limit(tiny_base):
    assert build_model(tiny_base, embedding_dim=8).max_seq_length == 4096  # tiny text max_position_embeddings
    assert build_model(tiny_base, embedding_dim=8, max_seq_length=512).max_seq_length == 512


def test_rejects_a_checkpoint_that_is_not_qwen2_vl(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="'bert' checkpoint; build_model expects Qwen2-VL"):
        build_model(tmp_path)


def test_accepts_a_conditional_generation_checkpoint(tmp_path):
    bare = build_model(make_tiny_base_model(tmp_path / "bare"), embedding_dim=8)
    with_head = build_model(make_tiny_base_model(tmp_path / "lm", with_lm_head=True), embedding_dim=8)
    assert type(with_head[0].model) is Qwen2VLModel
    for (name, a), (_, b) in zip(bare[0].model.state_dict().items(), with_head[0].model.state_dict().items()):
        assert torch.equal(a, b), name  # same seed: the backbone weights load identically in both forms


def test_encode_matches_an_independent_transformers_computation(tiny_base):
    torch.manual_seed(0)
    model = build_model(tiny_base, embedding_dim=32)
    items = _items()
    encoded = model.encode([format_input(task, text, images) for task, text, images in items], batch_size=5)
    for row, (task, text, images) in enumerate(items):
        expected = _reference_embedding(tiny_base, model[2], task, text, images)
        np.testing.assert_allclose(encoded[row], expected, atol=1e-5, err_msg=task)


def test_an_embedding_does_not_depend_on_the_rest_of_the_batch(tiny_model):
    inputs = [format_input(task, text, images) for task, text, images in _items()]
    batched = tiny_model.encode(inputs, batch_size=len(inputs))
    for row, value in enumerate(inputs):
        alone = tiny_model.encode([value])[0]
        np.testing.assert_allclose(batched[row], alone, atol=1e-5)
    reversed_batch = tiny_model.encode(inputs[::-1], batch_size=len(inputs))[::-1]
    np.testing.assert_allclose(batched, reversed_batch, atol=1e-5)


def test_pixel_budgets_bound_visual_tokens_and_are_saved(tiny_base, tmp_path):
    model = build_model(tiny_base, embedding_dim=8, min_pixels=4 * 28 * 28, max_pixels=8 * 28 * 28)
    big = format_input("ocr", images=[_scene((800, 600), "white")])
    grid = model.preprocess([big])["image_grid_thw"][0]
    assert int(grid.prod()) // 4 <= 8
    model.save(str(tmp_path))
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_processor"]["size"]["longest_edge"] == 8 * 28 * 28
    assert saved["image_processor"]["size"]["shortest_edge"] == 4 * 28 * 28
    reloaded = ViOmniQwen(str(tmp_path))
    assert torch.equal(reloaded.preprocess([big])["image_grid_thw"][0], grid)
    with pytest.raises(ValueError, match="min_pixels .* exceeds max_pixels"):
        build_model(tiny_base, embedding_dim=8, min_pixels=100 * 28 * 28, max_pixels=8 * 28 * 28)


def test_over_long_text_with_images_is_truncated_in_its_text(tiny_base):
    model = build_model(tiny_base, embedding_dim=8, max_seq_length=48)
    image = _scene((100, 60), "red")
    features = model.preprocess([format_input("ocr", "chữ rất dài " * 200, [image])])
    ids = features["input_ids"][0]
    assert len(ids) == 48
    image_token_id = model[0].processor.image_token_id
    assert int((ids == image_token_id).sum()) == int(features["image_grid_thw"][0].prod()) // 4
    tokenizer = model[0].processor.tokenizer
    assert tokenizer.decode(ids[-8:]).endswith("dài")  # the cut fell in the text
    assert model.encode([format_input("ocr", "chữ rất dài " * 200, [image])]).shape == (1, 8)


def test_images_that_do_not_fit_are_refused_naming_the_input(tiny_base):
    model = build_model(tiny_base, embedding_dim=8, max_seq_length=20)
    image = _scene((100, 60), "red")
    three = format_input("ocr", "three", [image, image, image])
    # Planned batches put the longest input first: the error still names the caller's index.
    described = r"\(text '<ocr> three' and 3 image\(s\): \d+ tokens, 24 of them image tokens\)"
    with pytest.raises(ValueError, match=rf"^input 1 {described} does not fit in max_seq_length=20 without cutting"):
        model.encode(["short", three])
    with pytest.raises(ValueError, match=r"^input 0 \(text '<ocr> three' and 3 image\(s\)"):
        model.encode(three)  # one input: the stock path


def test_an_overflow_reports_the_max_length_the_caller_set(tiny_model):
    image = _scene((100, 60), "red")
    # Text alone over the limit is truncated in its text: not reported.
    inputs = ["short", "a long text " * 30, format_input("ocr", "three", [image, image, image])]
    described = r"\(text '<ocr> three' and 3 image\(s\): \d+ tokens, 24 of them image tokens\)"
    limit = r"processing_kwargs\['text'\]\['max_length'\]=20 "
    with pytest.raises(ValueError, match=rf"^input 2 {described} does not fit in {limit}"):
        tiny_model.encode(inputs, processing_kwargs={"text": {"max_length": 20, "truncation": True}})


def test_bad_inputs_to_encode_name_the_offending_item(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="Prompt name 'caption' not found"):
        tiny_model.encode("x", prompt_name="caption")
    with pytest.raises(ValueError, match="input 2 is None"):
        tiny_model.encode(["a", "a much longer text that sorts first", None])
    with pytest.raises(FileNotFoundError, match=r"input 1 names an image file that does not exist: '.*typo\.png'"):
        tiny_model.encode(["fine", str(tmp_path / "typo.png")])
    with pytest.raises(FileNotFoundError, match=r"input 0\['image'\]: image file not found"):
        tiny_model.encode([{"image": str(tmp_path / "missing.jpg"), "text": "q"}])
    with pytest.raises(ValueError, match=r"input 0\['image'\]\[1\]: cannot decode image bytes"):
        tiny_model.encode([{"image": [_scene((30, 30), "red"), b"garbage"], "text": "q"}])
    with pytest.raises(ValueError, match="input 0 has neither text nor an image"):
        tiny_model.encode([{"text": None, "image": None}])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_any_image_mode_encodes_like_its_rgb_conversion(tiny_model, mode):
    from st_viomni import load_image

    image = Image.new(mode, (70, 50))
    direct = tiny_model.encode([image], prompt_name="ocr")
    converted = tiny_model.encode([format_input("ocr", images=[load_image(image)])])
    np.testing.assert_allclose(direct, converted, atol=1e-6)
