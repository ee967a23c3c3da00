"""model.encode(x, prompt_name=task) renders exactly the tokens of model.encode(format_input(task, ...))."""

import numpy as np
import pytest
import torch
from PIL import Image

from st_viomni import TASK_NAMES, format_input


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    red = Image.new("RGB", (100, 60), (220, 20, 20))
    tall = Image.new("RGB", (50, 130), (20, 180, 40))
    red.save(folder / "red.png")
    return {"red": red, "tall": tall, "red_path": str(folder / "red.png")}


def _forms(images):
    red, tall, path = images["red"], images["tall"], images["red_path"]
    question = "Màu gì? What colour?"
    message = [{"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": question}]}]
    # (name, input for prompt_name, text and images for format_input)
    return [
        ("string", "Con mèo ngồi trên tấm thảm.", ("Con mèo ngồi trên tấm thảm.", [])),
        ("pil image", red, (None, [red])),
        ("image path", path, (None, [path])),
        ("text+image dict", {"text": question, "image": red}, (question, [red])),
        ("image+text dict", {"image": red, "text": question}, (question, [red])),
        ("dict with a list of images", {"image": [red, tall], "text": question}, (question, [red, tall])),
        ("chat messages", message, (question, [red])),
    ]


def _rendered(model, value, prompt=None):
    return model.preprocess([value], prompt=prompt)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_prompt_name_and_format_input_render_identical_tokens(tiny_model, images, task):
    for name, value, (text, imgs) in _forms(images):
        prompted = _rendered(tiny_model, value, prompt=tiny_model.prompts[task])
        formatted = _rendered(tiny_model, format_input(task, text, imgs))
        assert prompted["input_ids"].tolist() == formatted["input_ids"].tolist(), name
        if imgs:
            assert torch.equal(prompted["pixel_values"], formatted["pixel_values"]), name
            assert torch.equal(prompted["image_grid_thw"], formatted["image_grid_thw"]), name


def test_rendering_puts_the_prefix_at_the_start_of_the_user_text(tiny_model, images):
    tokenizer = tiny_model[0].processor.tokenizer
    features = _rendered(tiny_model, {"text": "What colour?", "image": images["red"]}, prompt="<vqa_single>")
    rendered = tokenizer.decode(features["input_ids"][0])
    visual = "<|image_pad|>" * int(features["image_grid_thw"][0].prod() // 4)
    assert rendered == (
        f"<|im_start|>user\n<|vision_start|>{visual}<|vision_end|><vqa_single> What colour?<|im_end|>\n"
    )
    text_only = tokenizer.decode(_rendered(tiny_model, "hello", prompt="<instr>")["input_ids"][0])
    assert text_only == "<|im_start|>user\n<instr> hello<|im_end|>\n"  # no default system turn


def test_a_system_prompt_that_is_not_a_task_prefix_stays_a_system_turn(tiny_model):
    tokenizer = tiny_model[0].processor.tokenizer
    rendered = tokenizer.decode(_rendered(tiny_model, "hello", prompt="Be brief.")["input_ids"][0])
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"


def test_encode_with_prompt_name_equals_encode_of_format_input(tiny_model, images):
    for name, value, (text, imgs) in _forms(images):
        prompted = tiny_model.encode([value], prompt_name="ocr")
        formatted = tiny_model.encode([format_input("ocr", text, imgs)])
        np.testing.assert_allclose(prompted, formatted, atol=1e-6, err_msg=name)
