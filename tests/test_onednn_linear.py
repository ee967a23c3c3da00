"""Float32 CPU linear layers through oneDNN when no gradient is needed (st_viomni.onednn_linear): the same
outputs as torch.nn.functional.linear, and never on a path that needs a gradient, since the oneDNN operator has
no backward."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from st_viomni import ViOmniQwen, build_model
from st_viomni import onednn_linear
from st_viomni.onednn_linear import linear, use_onednn_linear


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts calls of the oneDNN operator (and still runs it)."""
    operator = torch.ops.mkldnn._linear_pointwise
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return operator(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counted)
    return calls


def test_linear_equals_functional_linear_without_gradients(onednn_calls):
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 40), torch.randn(24)
    cases = {
        "2-D": torch.randn(7, 40),
        "3-D (batch, sequence, features)": torch.randn(3, 5, 40),
        "non-contiguous": torch.randn(40, 9).t(),
        "every other row": torch.randn(10, 40)[::2],
        "one row repeated (stride 0)": torch.randn(1, 40).expand(6, 40),
        "3-D, transposed": torch.randn(3, 40, 5).transpose(1, 2),
        "1-D": torch.randn(40),
        "no rows": torch.randn(0, 40),
    }
    with torch.inference_mode():
        for name, inputs in cases.items():
            for b in (bias, None):
                torch.testing.assert_close(linear(inputs, weight, b), F.linear(inputs, weight, b), msg=name)
    with torch.no_grad():
        torch.testing.assert_close(linear(cases["2-D"], weight, bias), F.linear(cases["2-D"], weight, bias))
    assert len(onednn_calls) == 2 * len(cases) + 1


def test_anything_that_needs_a_gradient_takes_functional_linear(onednn_calls):
    torch.manual_seed(0)
    weight = torch.randn(6, 4, requires_grad=True)
    inputs = torch.randn(3, 4, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    for needs_grad in ({"inputs"}, {"weight"}, {"bias"}):
        tensors = {"inputs": inputs, "weight": weight, "bias": bias}
        tensors = {name: t if name in needs_grad else t.detach() for name, t in tensors.items()}
        output = linear(tensors["inputs"], tensors["weight"], tensors["bias"])
        (grad,) = torch.autograd.grad(output.square().sum(), tensors[next(iter(needs_grad))])
        expected = F.linear(tensors["inputs"], tensors["weight"], tensors["bias"])
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), tensors[next(iter(needs_grad))])
        torch.testing.assert_close(grad, expected_grad, msg=str(needs_grad))
    # Gradients recorded but nothing requires one (a frozen layer on frozen inputs): oneDNN is safe and used.
    linear(inputs.detach(), weight.detach(), bias.detach())
    assert len(onednn_calls) == 1


def test_other_dtypes_strided_parameters_and_disabled_onednn_take_functional_linear(onednn_calls):
    weight, inputs = torch.randn(6, 4), torch.randn(3, 4)
    with torch.inference_mode():
        # Views of parameters (tied or sharded weights): the operator would read a strided bias wrongly.
        every_other_bias, transposed_weight = torch.randn(12)[::2], torch.randn(4, 6).t()
        torch.testing.assert_close(linear(inputs, weight, every_other_bias), F.linear(inputs, weight, every_other_bias))
        torch.testing.assert_close(linear(inputs, transposed_weight), F.linear(inputs, transposed_weight))
        linear(inputs.bfloat16(), weight.bfloat16())  # bfloat16 already runs through oneDNN in PyTorch
        linear(inputs.double(), weight.double())
        with torch.backends.mkldnn.flags(enabled=False):
            torch.testing.assert_close(linear(inputs, weight), F.linear(inputs, weight))
    assert onednn_calls == []


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
    assert onednn_calls == [(5, 4)]
    monkeypatch.setattr(onednn_linear, "onednn_available", lambda: False)
    assert use_onednn_linear(torch.nn.Linear(2, 2)) == 0


def test_viomni_models_encode_through_onednn_and_train_with_stock_gradients(tiny_base, tmp_path, onednn_calls):
    build_model(tiny_base, embedding_dim=32).save(str(tmp_path))
    model, plain = ViOmniQwen(str(tmp_path)), SentenceTransformer(str(tmp_path))
    linears = [module for module in model.modules() if type(module) is torch.nn.Linear]
    assert linears and all("forward" in vars(module) for module in linears)
    assert not any("forward" in vars(module) for module in plain.modules())

    texts = ["<text_pair> một câu ngắn", "<instr> a longer English sentence about embeddings"]
    torch.testing.assert_close(
        torch.as_tensor(model.encode(texts)), torch.as_tensor(plain.encode(texts)), rtol=1e-5, atol=1e-5
    )
    assert len(onednn_calls) >= len(linears)

    # Training: gradients through the model equal the plain model's, and never touch the oneDNN operator.
    onednn_calls.clear()
    model.train(), plain.train()
    gradients = []
    for m in (model, plain):
        m.zero_grad()
        features = m.preprocess(texts)
        m(features)["sentence_embedding"][:, 0].sum().backward()
        gradients.append({name: p.grad for name, p in m.named_parameters() if p.grad is not None})
    assert onednn_calls == []
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 0
    for name, grad in gradients[0].items():
        torch.testing.assert_close(grad, gradients[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_copies_of_a_viomni_model_keep_their_fast_paths_on_their_own_layers(tiny_base, tmp_path):
    # Multi-process encode pools pickle the model; trainers and users deepcopy it. Each copy's switched layers
    # (linear and patch embedding) must run on that copy's weights, not fail to load or point at the original.
    build_model(tiny_base, embedding_dim=32).save(str(tmp_path))
    model = ViOmniQwen(str(tmp_path))
    texts = ["<text_pair> một câu ngắn", "<ocr> chữ trên ảnh"]
    expected = torch.as_tensor(model.encode(texts))
    for copy_of in (lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy):
        duplicate = copy_of(model)
        switched = [m for m in duplicate.modules() if "forward" in vars(m)]
        assert len(switched) == sum("forward" in vars(m) for m in model.modules()) > 0
        assert all(m.forward.args[0] is m for m in switched)
        torch.testing.assert_close(torch.as_tensor(duplicate.encode(texts)), expected)
