"""Float32 and bfloat16 CPU linear layers through oneDNN on a bounded set of shapes (st_viomni.onednn_linear):
the same outputs as torch.nn.functional.linear, at most ROW_BUCKETS row counts per weight shape ever reach the
operator (oneDNN keeps memory for every shape it sees), and only under torch.inference_mode (encode): training,
no_grad passes included, keeps PyTorch's kernels."""

import copy
import pickle
import random

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from st_viomni import ViOmniQwen, build_model, onednn_linear
from st_viomni.onednn_linear import CHUNK_ROWS, MIN_ROWS, ROW_BUCKETS, ROW_GRANULE, linear, use_onednn_linear

pytestmark = pytest.mark.skipif(not onednn_linear.onednn_available(), reason="this PyTorch build has no oneDNN")

G, C = ROW_GRANULE, CHUNK_ROWS


@pytest.fixture
def onednn_calls(monkeypatch):
    """Records (input shape, weight shape, has bias) of every call of the oneDNN operator (and still runs it), on a
    CPU where float32 takes oneDNN (on Intel's it keeps sgemm: the tests of that rule say so)."""
    monkeypatch.setattr(onednn_linear, "float32_in_onednn", lambda: True)
    operator = torch.ops.mkldnn._linear_pointwise
    calls = []

    def counted(inputs, weight, bias, *args):
        calls.append((tuple(inputs.shape), tuple(weight.shape), bias is not None))
        return operator(inputs, weight, bias, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted)
    return calls


def _assert_matches_functional_linear(actual, inputs, weight, bias, msg):
    expected = F.linear(inputs, weight, bias)
    assert actual.shape == expected.shape and actual.is_contiguous(), msg
    # Float32 rounding only (oneDNN sums in another order than sgemm): relative to the outputs' scale.
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=msg)


def test_bucket_boundaries_equal_functional_linear_and_every_call_is_bucketed(onednn_calls):
    assert C % G == 0 and ROW_BUCKETS == C // G
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 40), torch.randn(24)
    row_counts = [MIN_ROWS, G - 1, G, G + 1, 2 * G - 1, C - G + 1, C - 1, C, C + 1, C + G, 2 * C + 7, 3 * C]
    with torch.inference_mode():
        for rows in row_counts:
            inputs = torch.randn(rows, 40)
            for b in (bias, None):
                _assert_matches_functional_linear(linear(inputs, weight, b), inputs, weight, b, f"{rows} rows")
    # Every row was computed by the operator, in chunks of at most C rows padded to a multiple of G.
    assert {rows for (rows, _), _, _ in onednn_calls} <= set(range(G, C + 1, G))
    expected_calls = sum(-(-rows // C) for rows in row_counts)
    assert len(onednn_calls) == 2 * expected_calls


def test_padding_rows_never_change_real_rows(onednn_calls):
    # Outputs of the real rows are the same whatever rows share their bucket (the padding is zero rows).
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 48), torch.randn(64)
    inputs = torch.randn(2 * C + 7, 48) * 1e3
    with torch.inference_mode():
        whole = linear(inputs, weight, bias)
        alone = torch.cat([linear(inputs[i : i + G - 3], weight, bias) for i in range(0, len(inputs), G - 3)])
    _assert_matches_functional_linear(whole, inputs, weight, bias, "whole")
    _assert_matches_functional_linear(alone, inputs, weight, bias, "in pieces")


@pytest.mark.skipif(not onednn_linear.bfloat16_in_onednn(), reason="this CPU does not run bfloat16 in oneDNN")
def test_bfloat16_is_bucketed_too_with_the_outputs_of_functional_linear(onednn_calls):
    # PyTorch runs bfloat16 products through oneDNN at the caller's row count (a new shape, and new generated
    # code, for every new row count); bucketed, oneDNN sees the same bounded row counts as in float32, and the
    # outputs are bitwise F.linear's.
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 40).bfloat16(), torch.randn(24).bfloat16()
    row_counts = [MIN_ROWS, G - 1, G + 1, C - 1, C + 1, 2 * C + 7]
    with torch.inference_mode():
        for rows in row_counts:
            inputs = torch.randn(1, rows, 40).bfloat16()
            for b in (bias, None):
                output = linear(inputs, weight, b)
                assert output.dtype == torch.bfloat16
                torch.testing.assert_close(output, F.linear(inputs, weight, b), rtol=0, atol=0, msg=f"{rows} rows")
    assert {rows for (rows, _), _, _ in onednn_calls} <= set(range(G, C + 1, G))
    assert len(onednn_calls) == 2 * sum(-(-rows // C) for rows in row_counts)


def test_bfloat16_takes_functional_linear_where_the_cpu_does_not_run_it_in_onednn(onednn_calls, monkeypatch):
    monkeypatch.setattr(onednn_linear, "bfloat16_in_onednn", lambda: False)
    inputs, weight = torch.randn(3 * G, 40).bfloat16(), torch.randn(6, 40).bfloat16()
    with torch.inference_mode():
        torch.testing.assert_close(linear(inputs, weight), F.linear(inputs, weight), rtol=0, atol=0)
        linear(inputs.float(), weight.float())
    assert [weight_shape for _, weight_shape, _ in onednn_calls] == [(6, 40)]  # the float32 call only


def test_float32_keeps_sgemm_on_intel_cpus_and_bfloat16_stays_bounded(onednn_calls, monkeypatch):
    monkeypatch.setattr(onednn_linear, "float32_in_onednn", lambda: False)
    torch.manual_seed(0)
    weight, bias, inputs = torch.randn(48, 32), torch.randn(48), torch.randn(70, 32)
    with torch.inference_mode():
        assert torch.equal(linear(inputs, weight, bias), F.linear(inputs, weight, bias))
        assert onednn_calls == []
        if onednn_linear.bfloat16_in_onednn():
            linear(inputs.bfloat16(), weight.bfloat16(), bias.bfloat16())
            assert onednn_calls == [((80, 32), (48, 32), True)]


@pytest.mark.parametrize(
    ("description", "intel"),
    [
        ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n", True),
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n", False),
        ("Intel64 Family 6 Model 143 Stepping 8, GenuineIntel", True),  # platform.processor() on Windows
        ("", False),
    ],
)
def test_intel_cpus_are_told_apart_by_their_vendor(description, intel):
    assert onednn_linear.is_intel_cpu(description) is intel


def test_3d_inputs(onednn_calls):
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 40), torch.randn(24)
    with torch.inference_mode():
        for shape in ((3, 5, 40), (2, C + 3, 40), (4, 1, 40), (1, 1, 40)):
            inputs = torch.randn(shape)
            _assert_matches_functional_linear(linear(inputs, weight, bias), inputs, weight, bias, str(shape))
    # (1, 1, 40) has one row: sgemm; every other call went through the operator.
    assert len(onednn_calls) == 1 + 3 + 1


def test_distinct_shapes_reaching_onednn_are_bounded(onednn_calls):
    rng = random.Random(0)
    weights = [(torch.randn(24, 40), torch.randn(24)), (torch.randn(24, 40), None), (torch.randn(8, 40), None)]
    with torch.inference_mode():
        for _ in range(300):
            rows = rng.randint(1, 3 * C)
            inputs = torch.randn(rows, 40) if rng.random() < 0.5 else torch.randn(1, rows, 40)
            for weight, bias in weights:
                linear(inputs, weight, bias)
    shapes = set(onednn_calls)
    # Three weight shapes (same width with and without bias count apart): at most ROW_BUCKETS shapes each.
    assert len({shape[1:] for shape in shapes}) == 3
    assert len(shapes) <= 3 * ROW_BUCKETS
    assert {inputs[0] for inputs, _, _ in shapes} <= set(range(G, C + 1, G))


def test_what_takes_functional_linear(onednn_calls):
    torch.manual_seed(0)
    weight, inputs = torch.randn(6, 40), torch.randn(3 * G, 40)
    with torch.inference_mode():
        cases = {
            "one row": (torch.randn(1, 40), weight, None),
            "1-D": (torch.randn(40), weight, None),
            "no rows": (torch.randn(0, 40), weight, None),
            "non-contiguous input": (torch.randn(40, 3 * G).t(), weight, None),
            "every other row": (torch.randn(6 * G, 40)[::2], weight, None),
            "stride 0": (torch.randn(1, 40).expand(3 * G, 40), weight, None),
            # Views of parameters (tied or sharded weights): the operator would read a strided bias wrongly.
            "strided bias": (inputs, weight, torch.randn(12)[::2]),
            "transposed weight": (inputs, torch.randn(40, 6).t(), None),
        }
        for name, (x, w, b) in cases.items():
            _assert_matches_functional_linear(linear(x, w, b), x, w, b, name)
        for dtype in (torch.float16, torch.float64):
            x, w = inputs.to(dtype), weight.to(dtype)
            torch.testing.assert_close(linear(x, w), F.linear(x, w), msg=str(dtype))
        # Mixed dtypes take F.linear, which refuses them as it always does.
        with pytest.raises(RuntimeError):
            linear(inputs.bfloat16(), weight)
        with torch.backends.mkldnn.flags(enabled=False):
            _assert_matches_functional_linear(linear(inputs, weight, None), inputs, weight, None, "disabled")
    assert onednn_calls == []


def test_training_takes_functional_linear_no_grad_passes_included(onednn_calls):
    torch.manual_seed(0)
    weight = torch.randn(6, 4, requires_grad=True)
    inputs = torch.randn(3 * G + 1, 4, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    for needs_grad in ("inputs", "weight", "bias"):
        tensors = {"inputs": inputs, "weight": weight, "bias": bias}
        tensors = {name: t if name == needs_grad else t.detach() for name, t in tensors.items()}
        output = linear(tensors["inputs"], tensors["weight"], tensors["bias"])
        (grad,) = torch.autograd.grad(output.square().sum(), tensors[needs_grad])
        expected = F.linear(tensors["inputs"], tensors["weight"], tensors["bias"])
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), tensors[needs_grad])
        torch.testing.assert_close(grad, expected_grad, msg=needs_grad)
    # Nothing requires a gradient, and GradCache's gradient-free first pass: PyTorch's kernels too, bitwise, so
    # that the first pass and its recomputation with gradients compute the same embeddings.
    frozen = (inputs.detach(), weight.detach(), bias.detach())
    torch.testing.assert_close(linear(*frozen), F.linear(*frozen), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(linear(inputs, weight, bias), F.linear(inputs, weight, bias), rtol=0, atol=0)
        with torch.inference_mode(False):
            linear(inputs, weight, bias)
    assert onednn_calls == []
    with torch.inference_mode():
        linear(inputs, weight, bias)
        with torch.inference_mode(False):  # switched off inside: PyTorch's kernel again
            linear(inputs, weight, bias)
    assert len(onednn_calls) == 1


def test_use_onednn_linear_switches_plain_linear_layers_only(onednn_calls, monkeypatch):
    class Scaled(torch.nn.Linear):  # a subclass (think of a quantized or adapter layer) keeps its forward
        def forward(self, inputs):
            return 2 * super().forward(inputs)

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), Scaled(8, 3))
    inputs = torch.randn(5, 4)
    with torch.inference_mode():
        expected = model(inputs)
        assert use_onednn_linear(model) == 1 and use_onednn_linear(model) == 1
        assert "forward" in vars(model[0]) and "forward" not in vars(model[2])
        torch.testing.assert_close(model(inputs), expected)
    assert onednn_calls == [((G, 4), (8, 4), True)]
    monkeypatch.setattr(onednn_linear, "onednn_available", lambda: False)
    assert use_onednn_linear(torch.nn.Linear(2, 2)) == 0


TEXTS = [
    "<text_pair> một câu ngắn",
    "<instr> a longer English sentence about embeddings and the rows they make",
    "<ocr> chữ trên ảnh",
]


def test_viomni_models_encode_through_onednn_and_train_with_stock_gradients(tiny_base, tmp_path, onednn_calls):
    from PIL import Image

    build_model(tiny_base, embedding_dim=32).save(str(tmp_path))
    model, plain = ViOmniQwen(str(tmp_path)), SentenceTransformer(str(tmp_path))
    linears = [module for module in model.modules() if type(module) is torch.nn.Linear]
    assert linears and all("forward" in vars(module) for module in linears)
    assert not any("forward" in vars(module) for module in plain.modules())

    inputs = [*TEXTS, {"image": Image.new("RGB", (56, 84), (200, 40, 90)), "text": "<ocr> chữ trên ảnh"}]
    switched_on = torch.as_tensor(model.encode(inputs))
    assert len(onednn_calls) >= len(linears)
    assert {rows for (rows, *_), _, _ in onednn_calls} <= set(range(G, C + 1, G))
    with torch.backends.mkldnn.flags(enabled=False):
        switched_off = torch.as_tensor(model.encode(inputs))
    torch.testing.assert_close(switched_on, switched_off, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(switched_on, torch.as_tensor(plain.encode(inputs)), rtol=1e-5, atol=1e-5)

    # Training: gradients through the model equal the plain model's; neither they nor a no_grad pass touch oneDNN.
    onednn_calls.clear()
    model.train(), plain.train()
    gradients = []
    for m in (model, plain):
        m.zero_grad()
        features = m.preprocess(TEXTS)
        m(features)["sentence_embedding"][:, 0].sum().backward()
        gradients.append({name: p.grad for name, p in m.named_parameters() if p.grad is not None})
    with torch.no_grad():  # the gradient-free first pass of the cached losses
        model(model.preprocess(TEXTS))
    assert onednn_calls == []
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 0
    for name, grad in gradients[0].items():
        torch.testing.assert_close(grad, gradients[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_copies_of_a_viomni_model_keep_their_linear_layers_on_their_own_weights(tiny_base, tmp_path):
    # Multi-process encode pools pickle the model; trainers and users deepcopy it. Each copy's switched layers
    # must run on that copy's weights, not fail to load or point at the original.
    build_model(tiny_base, embedding_dim=32).save(str(tmp_path))
    model = ViOmniQwen(str(tmp_path))
    expected = torch.as_tensor(model.encode(TEXTS))
    for copy_of in (lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy):
        duplicate = copy_of(model)
        switched = [m for m in duplicate.modules() if type(m) is torch.nn.Linear]
        assert switched and all("forward" in vars(m) and m.forward.args[0] is m for m in switched)
        torch.testing.assert_close(torch.as_tensor(duplicate.encode(TEXTS)), expected)


@pytest.mark.skipif(not onednn_linear.bfloat16_in_onednn(), reason="this CPU does not run bfloat16 in oneDNN")
def test_bfloat16_viomni_models_encode_through_onednn_bitwise_like_plain_sentence_transformers(
    tiny_base, tmp_path, onednn_calls
):
    build_model(tiny_base, embedding_dim=32).save(str(tmp_path))
    kwargs = {"model_kwargs": {"dtype": torch.bfloat16}}
    model, plain = ViOmniQwen(str(tmp_path), **kwargs), SentenceTransformer(str(tmp_path), **kwargs)
    for text in TEXTS:  # one at a time: the same tokens in both (batched, stock pads and st-viomni does not)
        onednn_calls.clear()
        embedding = model.encode(text, convert_to_tensor=True)
        assert onednn_calls and {rows for (rows, *_), _, _ in onednn_calls} <= set(range(G, C + 1, G))
        torch.testing.assert_close(embedding, plain.encode(text, convert_to_tensor=True), rtol=0, atol=0, msg=text)
