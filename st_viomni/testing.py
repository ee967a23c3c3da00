"""An offline tiny Qwen2-VL base checkpoint, built locally: no hub, no download.

``make_tiny_base_model(path)`` writes a checkpoint of the real Qwen2-VL architecture family at tiny width:
Qwen2-VL text and vision configs, a byte-level BPE tokenizer trained here on a small Vietnamese / English /
Chinese text with Qwen2-VL's special tokens, Qwen2-VL's image and video processors with small pixel budgets,
and a Qwen2-VL-style chat template. ``build_model`` accepts it exactly like ``Qwen/Qwen2-VL-2B``. Tests,
the demo and the benchmarks use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Qwen2-VL's special tokens, in Qwen2-VL's order (their ids follow the learned vocabulary, as in Qwen).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation runs, whitespace.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
Con mèo ngồi trên tấm thảm. Một con mèo đang nằm nghỉ trên tấm thảm.
The cat sat on the mat. A feline rested upon the rug. The dog runs in the park.
Hôm nay trời đẹp và nắng ấm. Tôi thích đọc sách vào buổi tối. Hà Nội là thủ đô của Việt Nam.
Thành phố Hồ Chí Minh là thành phố lớn nhất Việt Nam. Phở là một món ăn truyền thống của người Việt.
Hãy dịch câu sau sang tiếng Anh. Translate the following sentence into Vietnamese.
Bao nhiêu hình tròn màu đỏ trong ảnh? How many red circles are in the image? Có ba hình vuông màu xanh.
What colour is the square on the left? Màu của hình tam giác bên phải là gì? The triangle is yellow.
Văn bản trong ảnh viết gì? What does the text in the image say? Biển báo ghi: cấm đỗ xe.
Đỏ, xanh lá, xanh dương, vàng, tím, cam, đen, trắng. Red, green, blue, yellow, purple, orange, black, white.
Một, hai, ba, bốn, năm, sáu, bảy, tám, chín, mười. One, two, three, four, five, six, seven, eight, nine, ten.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) , . ? ! : ; " ' <text_pair> <instr> <ocr>
<vqa_single> <vqa_multi> Question: Answer: Câu hỏi: Trả lời: user assistant system
猫坐在垫子上。今天天气很好。我喜欢读书。图片中有几个红色的圆圈？正方形是什么颜色的？
北京是中国的首都。这是一个测试句子。请把这句话翻译成英文。
Ăn quả nhớ kẻ trồng cây. Uống nước nhớ nguồn. Có công mài sắt, có ngày nên kim.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Học sinh đến trường lúc bảy giờ sáng. Students arrive at school at seven in the morning.
Giá của chiếc áo này là hai trăm nghìn đồng. The price of this shirt is two hundred thousand dong.
Trên bàn có một quyển sách, hai cây bút và một chiếc cốc. There is a book, two pens and a cup on the table.
ắ ằ ẳ ẵ ặ ấ ầ ẩ ẫ ậ é è ẻ ẽ ẹ ế ề ể ễ ệ í ì ỉ ĩ ị ó ò ỏ õ ọ ố ồ ổ ỗ ộ ớ ờ ở ỡ ợ ú ù ủ ũ ụ ứ ừ ử ữ ự ý ỳ ỷ ỹ ỵ đ Đ
"""

# The chat template Qwen2-VL-Instruct checkpoints ship (default system turn, vision placeholders, optional
# "Picture N:" ids). build_model replaces it with viOmni's template; the tiny base carries it so that tests
# see the same starting point as a real checkpoint.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_CONFIG: dict = {
    "text": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width)
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    },
    "vision": {
        "depth": 2,
        "embed_dim": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    # 28x28 pixels per visual token: 4 to 64 visual tokens per image.
    "min_pixels": 4 * 28 * 28,
    "max_pixels": 64 * 28 * 28,
    "vocab_size": 1024,
}


def _train_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS),
        model_max_length=32768,
        errors="replace",
    )


def make_tiny_base_model(path: str | os.PathLike, seed: int = 0, *, with_lm_head: bool = False) -> Path:
    """Write a tiny random-weight Qwen2-VL base checkpoint to ``path`` and return the path.

    Deterministic for a seed, about 1 MB, built in a few seconds on CPU without network.

    Args:
        path: Output directory (created if needed).
        seed: Seed for the random weights.
        with_lm_head: Save a ``Qwen2VLForConditionalGeneration`` checkpoint (as ``Qwen/Qwen2-VL-2B-Instruct``
            ships) instead of bare ``Qwen2VLModel`` weights.

    Example:
        ::

            from st_viomni import build_model
            from st_viomni.testing import make_tiny_base_model

            model = build_model(make_tiny_base_model("/tmp/tiny-qwen2-vl"), embedding_dim=32)
            model.encode("<text_pair> xin chào").shape  # (32,)
    """
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLModel,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = TINY_CONFIG
    tokenizer = _train_tokenizer(spec["vocab_size"])
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={
            **spec["text"],
            "vocab_size": len(tokenizer),
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
            "tie_word_embeddings": False,
        },
        vision_config={**spec["vision"], "hidden_size": spec["text"]["hidden_size"], "in_channels": 3},
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model_class = Qwen2VLForConditionalGeneration if with_lm_head else Qwen2VLModel
    model = model_class(config).eval()
    model.save_pretrained(path)

    vision = spec["vision"]
    processor_kwargs = {
        "min_pixels": spec["min_pixels"],
        "max_pixels": spec["max_pixels"],
        "patch_size": vision["patch_size"],
        "merge_size": vision["spatial_merge_size"],
        "temporal_patch_size": vision["temporal_patch_size"],
    }
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**processor_kwargs),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**processor_kwargs),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    (path / "README.md").write_text(
        "# tiny-qwen2-vl\n\nRandom-weight tiny Qwen2-VL built by `st_viomni.testing.make_tiny_base_model` "
        f"(seed={seed}) for offline tests.\n\n```json\n{json.dumps(spec, indent=2)}\n```\n",
        encoding="utf-8",
    )
    return path
