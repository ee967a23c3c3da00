r"""Float32 and bfloat16 linear layers through oneDNN on CPU, on a bounded set of product shapes.

PyTorch runs a float32 ``nn.Linear`` on CPU as a BLAS ``sgemm`` (MKL in the PyPI wheels) and a bfloat16 one
through oneDNN. For float32, oneDNN's own kernel (``torch.ops.mkldnn._linear_pointwise``, the operator
PyTorch's compiler emits for CPU linear layers) is faster on a 2-core AMD EPYC with AVX-512: on the shapes of
Qwen2-VL-2B's layers,

.. math::

    y = x W^\top + b, \qquad x \in \mathbb{R}^{m \times k},\; W \in \mathbb{R}^{n \times k},

it reached 181-214 GFLOP/s where ``sgemm`` reached 107-194 (m = 100-1600 rows, 2 threads). Not so on Intel
CPUs, whose MKL runs its own fastest code: on a 2-core Intel Xeon (family 6 model 167) fp32 encode passes of
``proxy-2b`` took 13.2 s with ``sgemm`` and 18.7 s through this module on 24 items, 25.6 and 28.1 s on 48
(medians of alternating passes, every pair the same way), so float32 keeps ``sgemm`` there
(:func:`float32_in_onednn`).

**Why the shapes are bounded.** oneDNN keeps memory for every new problem shape it sees (generated code and
cached primitives with their buffers): about 0.7 MiB per new row count ``m`` for a fixed weight, with no
plateau in practice (1 GB after 300 encode calls of random lengths on ``proxy-2b``, in float32 through this
operator and in bfloat16 through PyTorch's default path alike; ``benchmarks/NOTES.md``, fifth and sixth
rounds). Encode batches have a new number of tokens almost every call, so the operator is never called
with the caller's ``m``: :func:`linear` splits the rows into chunks of :data:`CHUNK_ROWS` and pads the last
chunk with zero rows up to a multiple of :data:`ROW_GRANULE`, so oneDNN only ever sees :data:`ROW_BUCKETS` row
counts per weight shape (with or without bias), however long the process runs. What oneDNN keeps depends on
the shapes, not on the weights, so a deeper model of the same widths keeps no more. Padding rows are zeros and
are sliced off the result: each output row is computed from its own input row only, so they never change a
real row.

bfloat16 takes the same bounded path: PyTorch already runs it through oneDNN, at the caller's row count, so
a bfloat16 CPU process would otherwise grow without bound in the same way; through the operator its outputs
are bitwise those of ``torch.nn.functional.linear``, at the same speed.

**Inference only.** :func:`linear` takes the operator only under ``torch.inference_mode()``, which
``SentenceTransformer.encode`` (and so every evaluator) runs in, for CPU tensors of one dtype, float32 (on CPUs
other than Intel's) or bfloat16 (where the CPU runs bfloat16 in oneDNN), with a contiguous input, weight and
bias, oneDNN enabled (``torch.backends.mkldnn.flags(enabled=False)`` turns it off) and at least :data:`MIN_ROWS`
rows. Everything else is ``torch.nn.functional.linear``, as in stock PyTorch: CUDA, other dtypes, and all of
training, ``torch.no_grad()`` passes included. The operator has no autograd formula (on a tensor that requires a
gradient its result's backward silently drops that gradient), and keeping training on PyTorch's kernels means
that GradCache's gradient-free first pass and its recomputation with gradients compute the same embeddings, and
that a training process keeps no generated oneDNN code beyond what its evaluators' ``encode`` calls bring.
Float32 outputs agree with ``sgemm``'s to float rounding (summation order), and nothing saved changes.

Example::

    import torch
    from st_viomni.onednn_linear import use_onednn_linear

    model = torch.nn.Sequential(torch.nn.Linear(1536, 8960), torch.nn.SiLU(), torch.nn.Linear(8960, 1536))
    use_onednn_linear(model)  # 2: both layers switched
    with torch.inference_mode():
        embeddings = model(torch.randn(300, 1536))  # through oneDNN, as 256 + 48 rows (sgemm on Intel CPUs)
    model(torch.randn(8, 1536, requires_grad=True)).sum().backward()  # through sgemm, with gradients
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

ROW_GRANULE = 16
"""oneDNN sees row counts that are multiples of this. Padding costs up to ``ROW_GRANULE - 1`` rows of work: 16
kept the model's products within a few percent of oneDNN's speed at the exact row count from about 200 rows;
32 was 10-16% slower than 16 at 100 rows."""

CHUNK_ROWS = 256
"""Rows above this run in chunks of this many (a multiple of :data:`ROW_GRANULE`). oneDNN reaches its speed by
about 200 rows, so chunking costs only the concatenation of the outputs (chunks of 256 and of 512 rows were
within 1% over the model's shapes), while what oneDNN keeps per shape grows with the row count: all buckets of
all 13 weight shapes of ``proxy-2b`` (Qwen2-VL-2B's widths) kept 179 MiB with chunks of 256 rows, 490 MiB with
chunks of 512."""

ROW_BUCKETS = CHUNK_ROWS // ROW_GRANULE
"""The bound: oneDNN sees at most this many row counts (16, 32, ..., 256) per weight shape."""

MIN_ROWS = 2
"""Fewer rows take ``sgemm``: a single row padded to :data:`ROW_GRANULE` rows was slower than ``sgemm``; from 2
rows the padded oneDNN product was faster, summed over the model's weight shapes (2 threads)."""


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN linear operator (the x86 wheels on PyPI do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear``, through oneDNN on :data:`ROW_BUCKETS` row counts per weight shape for
    float32 and bfloat16 CPU tensors under ``torch.inference_mode()``."""
    if not _takes_onednn(inputs, weight, bias):
        return F.linear(inputs, weight, bias)
    rows = inputs.numel() // max(inputs.shape[-1], 1)  # a 1-D input is one row
    if rows < MIN_ROWS:
        return F.linear(inputs, weight, bias)
    flat = inputs.view(rows, inputs.shape[-1])  # contiguous: a view, no copy
    chunks = [flat[start : start + CHUNK_ROWS] for start in range(0, rows, CHUNK_ROWS)]
    outputs = [_bucketed_product(chunk, weight, bias) for chunk in chunks]
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return output.view(*inputs.shape[:-1], weight.shape[0])


def use_onednn_linear(model: torch.nn.Module) -> int:
    """Make every plain ``nn.Linear`` inside ``model`` call :func:`linear`; return how many were switched.

    Subclasses of ``nn.Linear`` (quantized or adapter layers) keep their own ``forward``; a LoRA layer's plain
    base layer is switched, and takes ``F.linear`` in training like every switched layer. Switches nothing
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


def _bucketed_product(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # rows: at most CHUNK_ROWS contiguous rows. Pad with zero rows to a multiple of ROW_GRANULE so that the
    # operator only ever sees ROW_BUCKETS row counts; the padded rows' outputs are sliced off (a view: the
    # kept rows come first and are contiguous).
    count = rows.shape[0]
    missing = -count % ROW_GRANULE
    if missing:
        rows = F.pad(rows, (0, 0, 0, missing))
    output = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return output[:count] if missing else output


def onednn_inference(tensor: torch.Tensor) -> bool:
    """Whether st-viomni's oneDNN paths may compute ``tensor``: under ``torch.inference_mode()``, on CPU, with
    oneDNN enabled (``torch.backends.mkldnn.flags(enabled=False)`` turns them off)."""
    # Inference mode records no graph, so an operator's missing backward cannot drop a gradient; training (the
    # torch.no_grad() passes of GradCache included) keeps PyTorch's kernels and computes what it always did.
    return torch.is_inference_mode_enabled() and torch.backends.mkldnn.enabled and tensor.device.type == "cpu"


def _takes_onednn(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not onednn_inference(inputs) or not _onednn_dtype(inputs.dtype):
        return False
    # Contiguous tensors only: the operator reads a strided bias as if it were contiguous (wrong outputs, no
    # error), and a strided input would need a copy before the padding copy. Parameters are contiguous, so only
    # a view of one (tied or sharded weights) takes F.linear.
    if not inputs.is_contiguous():
        return False
    parameters = (weight,) if bias is None else (weight, bias)
    return all(p.dtype == inputs.dtype and p.device.type == "cpu" and p.is_contiguous() for p in parameters)


def _onednn_dtype(dtype: torch.dtype) -> bool:
    # bfloat16 only where PyTorch itself would run it through oneDNN (CPUs with AVX-512 or AMX): elsewhere its
    # default path is not oneDNN, and so does not grow per shape. float32 takes oneDNN for speed alone.
    if dtype == torch.float32:
        return float32_in_onednn()
    return dtype == torch.bfloat16 and bfloat16_in_onednn()


@functools.cache
def float32_in_onednn() -> bool:
    """Whether float32 products take oneDNN: on every CPU but Intel's, where MKL's ``sgemm`` (PyTorch's default)
    is the faster kernel (module docstring)."""
    return not is_intel_cpu(_cpu_description())


def is_intel_cpu(description: str) -> bool:
    """Whether ``description`` (``/proc/cpuinfo``, or ``platform.processor()`` where there is none) is an Intel
    CPU's."""
    return "GenuineIntel" in description


def _cpu_description() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            return cpuinfo.read()
    except OSError:
        return platform.processor()


@functools.cache
def bfloat16_in_onednn() -> bool:
    """Whether PyTorch runs bfloat16 CPU products in oneDNN on this CPU (those with AVX-512 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
