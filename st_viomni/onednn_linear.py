r"""Float32 linear layers through oneDNN on CPU when no gradient is needed: same weights, same outputs, faster.

PyTorch runs a float32 ``nn.Linear`` on CPU as a BLAS ``sgemm`` (MKL in the PyPI wheels) and a bfloat16 one
through oneDNN. For float32 oneDNN's own kernels are faster on the benchmark machine (2-core AMD EPYC with
AVX-512): on the shapes of Qwen2-VL-2B's layers,

.. math::

    y = x W^\top + b, \qquad x \in \mathbb{R}^{m \times k},\; W \in \mathbb{R}^{n \times k},

oneDNN with the weight as stored (no repacked copy, no extra memory) reached 197-215 GFLOP/s where ``sgemm``
reached 154-201 (m = 266-1638 rows; 162 against 90 at m = 40), and an encode pass of the benchmark corpus on
``proxy-2b`` took 17% less time (``benchmarks/NOTES.md``, lever (h)).

The oneDNN operator (``torch.ops.mkldnn._linear_pointwise``, the one PyTorch's own compiler emits for CPU
linear layers) has no autograd formula: called on a tensor that requires a gradient it returns a result whose
backward silently drops that gradient. So :func:`linear` takes it only when it cannot matter: float32 CPU
tensors with a contiguous weight and bias, oneDNN enabled (``torch.backends.mkldnn.flags(enabled=False)``
turns it off), and no input that requires a gradient while gradients are recorded. Everything else
(training, bfloat16, which already runs through oneDNN, CUDA) is ``torch.nn.functional.linear``. Outputs
agree with ``sgemm``'s to float rounding (summation order), and nothing saved changes.

Example::

    import torch
    from st_viomni.onednn_linear import use_onednn_linear

    model = torch.nn.Sequential(torch.nn.Linear(1536, 8960), torch.nn.SiLU(), torch.nn.Linear(8960, 1536))
    use_onednn_linear(model)  # 2: both layers switched
    with torch.inference_mode():
        embeddings = model(torch.randn(8, 1536))  # through oneDNN
    model(torch.randn(8, 1536, requires_grad=True)).sum().backward()  # through sgemm, with gradients
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear operator (the x86 wheels on PyPI do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear``, through oneDNN for float32 CPU tensors when no gradient is needed."""
    if _takes_onednn(inputs, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")
    return F.linear(inputs, weight, bias)


def use_onednn_linear(model: torch.nn.Module) -> int:
    """Make every plain ``nn.Linear`` inside ``model`` call :func:`linear`; return how many were switched.

    Subclasses of ``nn.Linear`` (quantized or adapter layers) keep their own ``forward``; a LoRA layer's plain
    base layer is switched, and still takes ``F.linear`` whenever its input needs a gradient. Switches nothing
    when oneDNN is not available. Idempotent.
    """
    if not onednn_available():
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            # A partial, not a bound method: it survives pickling (multi-process pools, torch.save, deepcopy).
            module.forward = functools.partial(_linear_forward, module)
            switched += 1
    return switched


def _linear_forward(self: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    return linear(inputs, self.weight, self.bias)


def _takes_onednn(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    parameters = (weight,) if bias is None else (weight, bias)
    if not torch.backends.mkldnn.enabled or inputs.dtype != torch.float32 or inputs.device.type != "cpu":
        return False
    # Contiguous parameters only: the operator reads a strided bias as if it were contiguous (wrong outputs, no
    # error). Parameters are contiguous, so only a view of one (tied or sharded weights) takes F.linear.
    if any(p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous() for p in parameters):
        return False
    # The operator has no backward: anything that needs a gradient goes through F.linear.
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (inputs, *parameters)))
