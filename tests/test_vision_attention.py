"""bfloat16 vision attention on CPU as chunked matrix products (st_viomni.vision_attention): softmax attention at
every chunk boundary, products on lengths in multiples of the chunk, taken only where it applies, on the vision
tower only, with nothing saved changed."""

import contextlib
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sentence_transformers import SentenceTransformer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from st_viomni import ViOmniQwen, build_model, vision_attention
from st_viomni.vision_attention import ATTENTION_NAME, CHUNK, attention_forward, chunked_attention


def _reference(query, key, value, scaling):
    # sdpa's output in the layout of transformers' attention functions: (batch, length, heads, head_dim).
    return F.scaled_dot_product_attention(query, key, value, scale=scaling).transpose(1, 2)


@pytest.mark.parametrize(
    ("queries", "keys"), [(1, 1), (63, 63), (64, 64), (65, 65), (130, 130), (70, 129), (128, 5)]
)
def test_chunked_attention_is_softmax_attention_at_every_chunk_boundary(queries, keys):
    torch.manual_seed(queries * 1000 + keys)
    query = torch.randn(2, 3, queries, 8, dtype=torch.float64)
    key, value = torch.randn(2, 3, keys, 8, dtype=torch.float64), torch.randn(2, 3, keys, 8, dtype=torch.float64)
    output = chunked_attention(query, key, value, scaling=0.3)
    assert output.shape == (2, queries, 3, 8) and output.is_contiguous()
    torch.testing.assert_close(output, _reference(query, key, value, 0.3), rtol=1e-12, atol=1e-12)


def test_bfloat16_stays_within_bfloat16_rounding_of_exact_attention():
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 16, 300, 80, dtype=torch.bfloat16) for _ in range(3))
    exact = _reference(query.double(), key.double(), value.double(), 80**-0.5)
    chunked = chunked_attention(query, key, value, scaling=80**-0.5)
    kernel = _reference(query, key, value, 80**-0.5)
    assert chunked.dtype == torch.bfloat16
    # The kernel's own error here is about 4e-3; rounding the probabilities to bfloat16 before the product with
    # the values about doubles it (bfloat16 has 8 bits of mantissa: 4e-3 relative).
    assert (kernel.double() - exact).abs().max() < 1e-2
    assert (chunked.double() - exact).abs().max() < 3e-2
    assert F.cosine_similarity(chunked.double().flatten(), exact.flatten(), dim=0) > 0.9999


def test_products_only_ever_see_lengths_in_multiples_of_the_chunk(monkeypatch):
    shapes = set()
    matmul = torch.matmul

    def recording(left, right, **kwargs):
        shapes.add((tuple(left.shape), tuple(right.shape)))
        return matmul(left, right, **kwargs)

    monkeypatch.setattr(torch, "matmul", recording)
    rng = random.Random(0)
    lengths = [4 * rng.randint(1, 100) for _ in range(60)]
    for length in lengths:
        query, key, value = (torch.randn(1, 2, length, 8, dtype=torch.bfloat16) for _ in range(3))
        assert chunked_attention(query, key, value, scaling=0.5).shape == (1, length, 2, 8)
    padded = {-(-length // CHUNK) * CHUNK for length in lengths}
    # Scores: one chunk of queries times the padded keys; outputs: the chunk's probabilities times the values.
    assert shapes == {((1, 2, CHUNK, 8), (1, 2, 8, keys)) for keys in padded} | {
        ((1, 2, CHUNK, keys), (1, 2, keys, 8)) for keys in padded
    }


@pytest.fixture
def chunks_beat_the_kernel(monkeypatch):
    # The chunked path runs on any CPU; where it is slower than the kernel it is not taken (the CPU tests after the
    # dispatch's), so the tests that need it say the CPU is one where it is faster.
    monkeypatch.setattr(vision_attention, "chunks_beat_the_kernel", lambda: True)


@pytest.fixture
def chunked_calls(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return chunked_attention(*args, **kwargs)

    monkeypatch.setattr(vision_attention, "chunked_attention", spy)
    return calls


def _inputs(dtype=torch.bfloat16, key_heads=4):
    torch.manual_seed(0)
    query = torch.randn(1, 4, 70, 16, dtype=dtype)
    return query, torch.randn(1, key_heads, 70, 16, dtype=dtype), torch.randn(1, key_heads, 70, 16, dtype=dtype)


def test_takes_the_chunks_for_bfloat16_cpu_inference_without_mask(chunks_beat_the_kernel, chunked_calls):
    module = torch.nn.Module()
    query, key, value = _inputs()
    with torch.inference_mode():
        output, weights = attention_forward(module, query, key, value, None, scaling=0.25, is_causal=False)
    assert chunked_calls == [query.shape] and weights is None
    torch.testing.assert_close(output, chunked_attention(query, key, value, 0.25), rtol=0, atol=0)


def _no_grad_pass():
    return torch.no_grad()  # GradCache's first pass: not inference mode


def _inference():
    return torch.inference_mode()


@contextlib.contextmanager
def _mkldnn_disabled():
    # sdpa's own kernels also change with oneDNN switched off (on CPUs with AMX), so the reference runs under it too.
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):
        yield


@pytest.mark.parametrize(
    ("case", "run", "dtype", "key_heads", "mask", "kwargs"),
    [
        ("training and GradCache's no_grad pass", _no_grad_pass, torch.bfloat16, 4, None, {}),
        ("float32, where the kernel is faster", _inference, torch.float32, 4, None, {}),
        ("a mask", _inference, torch.bfloat16, 4, torch.ones(1, 1, 70, 70, dtype=torch.bool), {}),
        ("causal attention (the text model's)", _inference, torch.bfloat16, 4, None, {"is_causal": True}),
        ("dropout", _inference, torch.bfloat16, 4, None, {"dropout": 0.1}),
        ("grouped key heads", _inference, torch.bfloat16, 2, None, {}),
        ("a position bias", _inference, torch.bfloat16, 4, None, {"position_bias": torch.zeros(1, 4, 70, 70)}),
        ("oneDNN switched off", _mkldnn_disabled, torch.bfloat16, 4, None, {}),
    ],
)
def test_everything_else_is_transformers_sdpa(
    chunks_beat_the_kernel, chunked_calls, case, run, dtype, key_heads, mask, kwargs
):
    module = torch.nn.Module()
    module.num_key_value_groups = 4 // key_heads
    query, key, value = _inputs(dtype, key_heads)
    kwargs = {"scaling": 0.25, "is_causal": False, **kwargs}
    if "position_bias" in kwargs:
        kwargs["position_bias"] = kwargs["position_bias"].to(dtype)
    with run():
        torch.manual_seed(1)  # the same dropout
        output, _ = attention_forward(module, query, key, value, mask, **kwargs)
        torch.manual_seed(1)
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    torch.testing.assert_close(output, expected, rtol=0, atol=0, msg=case)
    assert chunked_calls == [], case


@pytest.mark.parametrize(
    ("bfloat16_in_onednn", "amx_tiles", "chunks"),
    [(True, False, True), (True, True, False), (False, False, False), (False, True, False)],
)
def test_chunks_only_on_cpus_that_run_bfloat16_in_onednn_without_amx(
    monkeypatch, bfloat16_in_onednn, amx_tiles, chunks
):
    monkeypatch.setattr(vision_attention, "bfloat16_in_onednn", lambda: bfloat16_in_onednn)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx_tiles)
    vision_attention.chunks_beat_the_kernel.cache_clear()
    try:
        assert vision_attention.chunks_beat_the_kernel() is chunks
    finally:
        vision_attention.chunks_beat_the_kernel.cache_clear()  # this CPU's answer again for the other tests


def test_bfloat16_keeps_the_kernel_where_it_beats_the_chunks(monkeypatch, chunked_calls):
    monkeypatch.setattr(vision_attention, "chunks_beat_the_kernel", lambda: False)
    with torch.inference_mode():
        output, _ = attention_forward(torch.nn.Module(), *_inputs(), None, scaling=0.25, is_causal=False)
        expected, _ = sdpa_attention_forward(torch.nn.Module(), *_inputs(), None, scaling=0.25, is_causal=False)
    assert chunked_calls == []
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


def _implementations(model):
    config = model[0].model.config
    return config.vision_config._attn_implementation, config.text_config._attn_implementation


def test_viomni_models_switch_their_vision_tower_only_and_save_nothing_of_it(tiny_base, tmp_path):
    built = build_model(tiny_base, embedding_dim=32)
    assert _implementations(built) == (ATTENTION_NAME, "sdpa")
    visual = built[0].model.visual
    assert all(block.attn.config is visual.config for block in visual.blocks)  # what the layers read
    assert vision_attention.use_chunked_vision_attention(built) == 1  # idempotent
    built.save(str(tmp_path))
    assert ATTENTION_NAME not in (tmp_path / "config.json").read_text()
    assert _implementations(SentenceTransformer(str(tmp_path))) == ("sdpa", "sdpa")
    assert _implementations(ViOmniQwen(str(tmp_path))) == (ATTENTION_NAME, "sdpa")
    eager = ViOmniQwen(str(tmp_path), model_kwargs={"attn_implementation": "eager"})
    assert _implementations(eager) == ("eager", "eager")  # the caller's choice stands


def _images():
    return [
        {"image": Image.new("RGB", (90 + 28 * index, 60), (40 * index, 90, 200)), "text": f"scene {index}"}
        for index in range(3)
    ]


def test_bfloat16_encode_takes_the_chunks_close_to_the_kernel_and_float32_is_unchanged(
    tiny_base, chunks_beat_the_kernel, chunked_calls
):
    model = build_model(tiny_base, embedding_dim=32)
    vision_config = model[0].model.config.vision_config
    inputs = [*_images(), "text only"]

    def encode_both_ways():
        chunked = model.encode(inputs, convert_to_tensor=True)
        vision_config._attn_implementation = "sdpa"
        try:
            kernel = model.encode(inputs, convert_to_tensor=True)
        finally:
            vision_config._attn_implementation = ATTENTION_NAME
        return chunked, kernel

    chunked, kernel = encode_both_ways()
    assert chunked_calls == [] and torch.equal(chunked, kernel)  # float32: the kernel either way

    model.to(torch.bfloat16)
    chunked, kernel = encode_both_ways()
    depth = len(model[0].model.visual.blocks)
    assert len(chunked_calls) == 3 * depth  # each image, in each block
    assert F.cosine_similarity(chunked.float(), kernel.float()).min() > 0.999
