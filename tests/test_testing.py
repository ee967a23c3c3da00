import json

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor

from st_viomni.testing import PRESETS, SPECIAL_TOKENS, make_tiny_base_model, preset_config


def test_tiny_base_is_a_small_qwen2_vl_checkpoint(tiny_base):
    config = AutoConfig.from_pretrained(tiny_base)
    assert config.model_type == "qwen2_vl" and config.architectures == ["Qwen2VLModel"]
    assert config.vision_config.patch_size == 14 and config.vision_config.spatial_merge_size == 2
    size = sum(path.stat().st_size for path in tiny_base.iterdir())
    assert size < 5_000_000
    processor = AutoProcessor.from_pretrained(tiny_base)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    tokenizer = processor.tokenizer
    assert all(tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id for token in SPECIAL_TOKENS)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # Byte-level BPE: Vietnamese and Chinese round-trip exactly.
    for text in ("Thành phố Hồ Chí Minh", "猫坐在垫子上", "ỹ ự ẫ"):
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    # The base carries Qwen2-VL-Instruct's template, with its default system turn.
    rendered = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_same_seed_same_checkpoint_other_seed_other_weights(tmp_path):
    first = make_tiny_base_model(tmp_path / "a", seed=3)
    second = make_tiny_base_model(tmp_path / "b", seed=3)
    third = make_tiny_base_model(tmp_path / "c", seed=4)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    weights = [load_file(path / "model.safetensors") for path in (first, second, third)]
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][key].equal(weights[1][key]) for key in weights[0])
    assert not all(weights[0][key].equal(weights[2][key]) for key in weights[0])
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())


def test_presets_have_qwen2_vl_2b_widths_and_the_asked_depths():
    proxy, full = preset_config("proxy-2b"), preset_config("full-2b")
    for config in (proxy, full):
        text, vision = config.text_config, config.vision_config
        assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (1536, 12, 2)
        assert text.intermediate_size == 8960 and text.vocab_size == 151936
        assert (vision.embed_dim, vision.num_heads, vision.mlp_ratio) == (1280, 16, 4)
        assert (vision.patch_size, vision.spatial_merge_size, vision.hidden_size) == (14, 2, 1536)
    assert (proxy.text_config.num_hidden_layers, proxy.vision_config.depth) == (2, 2)
    assert (full.text_config.num_hidden_layers, full.vision_config.depth) == (28, 32)
    # At most 256 visual tokens (28x28 pixels each) per image on the CPU proxy.
    assert PRESETS["proxy-2b"]["max_pixels"] == 256 * 28 * 28


def test_full_2b_preset_has_qwen2_vl_2b_parameter_count():
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2VLForConditionalGeneration(preset_config("full-2b"))
    assert sum(parameter.numel() for parameter in model.parameters()) == 2_208_985_600


def test_unknown_preset_is_rejected_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="known presets: tiny, proxy-2b, full-2b"):
        make_tiny_base_model(tmp_path / "x", preset="7b")
    assert not (tmp_path / "x").exists()
