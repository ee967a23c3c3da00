"""Offline random-weight Qwen2-VL base checkpoints, built locally: no hub, no download.

``make_tiny_base_model(path)`` writes a checkpoint of the real Qwen2-VL architecture family at tiny width:
Qwen2-VL text and vision configs, a byte-level BPE tokenizer trained here on a small Vietnamese / English /
Chinese text with Qwen2-VL's special tokens, Qwen2-VL's image and video processors with small pixel budgets,
and a Qwen2-VL-style chat template. ``build_model`` accepts it exactly like ``Qwen/Qwen2-VL-2B``. Tests,
the demo and the benchmarks use it.

The same code path builds three presets (:data:`PRESETS`), all with random weights:

* ``tiny`` (default): about 1 MB, for tests.
* ``proxy-2b``: Qwen2-VL-2B's real widths (text hidden 1536, 12 heads, 2 KV heads, MLP 8960, vocabulary
  151936; vision width 1280, 16 heads, MLP ratio 4, patch 14, merge 2) with only 2 text layers and 2 vision
  blocks, so that a CPU can run it (about 1.6 GB in float32). At most 256 visual tokens per image.
* ``full-2b``: Qwen2-VL-2B's real depths too (28 text layers, 32 vision blocks; about 2.2 billion parameters,
  8.9 GB in float32, 4.4 GB in bfloat16), for GPU runs. At most 1280 visual tokens per image.

Every preset keeps the small locally trained tokenizer (1024 tokens): its ids are valid in the larger
vocabulary, and the 2B presets' embedding matrices have the real size, so memory numbers are realistic.
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

# Qwen2-VL-2B's widths (Qwen/Qwen2-VL-2B-Instruct config.json). The presets below differ only in depth.
_QWEN2_VL_2B_TEXT = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    # head_dim 128 -> 64 rotary frequencies split over (temporal, height, width)
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
_QWEN2_VL_2B_VISION = {
    "depth": 32,
    "embed_dim": 1280,
    "num_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
QWEN2_VL_2B_VOCAB_SIZE = 151936

PROXY_2B_CONFIG: dict = {
    "text": {**_QWEN2_VL_2B_TEXT, "num_hidden_layers": 2},
    "vision": {**_QWEN2_VL_2B_VISION, "depth": 2},
    # Qwen2-VL's minimum (56x56 pixels); at most 256 visual tokens per image keeps CPU runs short.
    "min_pixels": 4 * 28 * 28,
    "max_pixels": 256 * 28 * 28,
    "vocab_size": QWEN2_VL_2B_VOCAB_SIZE,
    "tie_word_embeddings": True,
}

FULL_2B_CONFIG: dict = {
    "text": dict(_QWEN2_VL_2B_TEXT),
    "vision": dict(_QWEN2_VL_2B_VISION),
    # 1280 visual tokens per image at most: the budget Qwen2-VL's model card suggests for limiting memory.
    "min_pixels": 4 * 28 * 28,
    "max_pixels": 1280 * 28 * 28,
    "vocab_size": QWEN2_VL_2B_VOCAB_SIZE,
    "tie_word_embeddings": True,
}

PRESETS: dict[str, dict] = {"tiny": TINY_CONFIG, "proxy-2b": PROXY_2B_CONFIG, "full-2b": FULL_2B_CONFIG}
"""Model presets by name: ``tiny`` (tests), ``proxy-2b`` (2B widths, 2 layers, for CPU), ``full-2b`` (GPU)."""

# Every preset uses the tokenizer trained here, with the tiny preset's vocabulary.
TOKENIZER_VOCAB_SIZE = TINY_CONFIG["vocab_size"]


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


def preset_config(preset: str = "tiny"):
    """The ``Qwen2VLConfig`` that :func:`make_tiny_base_model` writes for ``preset`` (no weights are built)."""
    return _make_config(_preset_spec(preset), _train_tokenizer(TOKENIZER_VOCAB_SIZE))


def _preset_spec(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


def _make_config(spec: dict, tokenizer):
    from transformers import Qwen2VLConfig

    token_id = tokenizer.convert_tokens_to_ids
    tie_word_embeddings = spec.get("tie_word_embeddings", False)
    return Qwen2VLConfig(
        text_config={
            **spec["text"],
            # The small tokenizer's ids are valid in the 2B presets' full-size vocabulary.
            "vocab_size": max(spec["vocab_size"], len(tokenizer)),
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
            "pad_token_id": token_id("<|endoftext|>"),
            "tie_word_embeddings": tie_word_embeddings,
        },
        vision_config={**spec["vision"], "hidden_size": spec["text"]["hidden_size"], "in_channels": 3},
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=tie_word_embeddings,
    )


def make_tiny_base_model(
    path: str | os.PathLike,
    seed: int = 0,
    *,
    with_lm_head: bool = False,
    preset: str = "tiny",
    dtype: str | None = None,
) -> Path:
    """Write a random-weight Qwen2-VL base checkpoint (tiny by default) to ``path`` and return the path.

    Deterministic for a seed and preset. The ``tiny`` preset is about 1 MB and built in a few seconds on CPU
    without network; ``proxy-2b`` takes about 1.6 GB of disk and memory, ``full-2b`` 8.9 GB (float32).

    Args:
        path: Output directory (created if needed).
        seed: Seed for the random weights.
        with_lm_head: Save a ``Qwen2VLForConditionalGeneration`` checkpoint (as ``Qwen/Qwen2-VL-2B-Instruct``
            ships) instead of bare ``Qwen2VLModel`` weights.
        preset: A name in :data:`PRESETS`: ``"tiny"``, ``"proxy-2b"`` or ``"full-2b"``.
        dtype: Dtype of the saved weights (``"float32"``, ``"bfloat16"``, ``"float16"``); None saves float32.
            The same seed gives the same weights up to rounding in every dtype.

    Example:
        ::

            from st_viomni import build_model
            from st_viomni.testing import make_tiny_base_model

            model = build_model(make_tiny_base_model("/tmp/tiny-qwen2-vl"), embedding_dim=32)
            model.encode("<text_pair> xin chào").shape  # (32,)
    """
    import torch
    from transformers import (
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLModel,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    spec = _preset_spec(preset)
    tokenizer = _train_tokenizer(TOKENIZER_VOCAB_SIZE)
    config = _make_config(spec, tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model_class = Qwen2VLForConditionalGeneration if with_lm_head else Qwen2VLModel
    model = model_class(config).eval()
    if dtype is not None:
        model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    del model

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
        f"# {preset}-qwen2-vl\n\nRandom-weight Qwen2-VL (preset {preset!r}) built by "
        f"`st_viomni.testing.make_tiny_base_model` (seed={seed}) for offline tests and benchmarks.\n\n"
        f"```json\n{json.dumps(spec, indent=2)}\n```\n",
        encoding="utf-8",
    )
    return path
