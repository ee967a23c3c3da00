"""Shared pieces of the benchmarks: cached random-weight models, peak memory, matmul FLOP/s, machine info, output."""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.flops import forward_flops, padded_forward_flops

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / "benchmarks" / ".cache"
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Pixels per visual token of Qwen2-VL (14 px patches merged 2 x 2).
PIXELS_PER_VISUAL_TOKEN = 28 * 28


# ----------------------------------------------------------------------------------------------------------------
# Models


def _spec_hash(preset: str) -> str:
    from st_viomni.testing import PRESETS

    return hashlib.sha1(json.dumps(PRESETS[preset], sort_keys=True).encode()).hexdigest()[:8]


def _complete(path: Path) -> bool:
    return (path / ".complete").is_file()


def prepare_base(preset: str, *, seed: int = 0, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The random-weight Qwen2-VL base checkpoint of ``preset``, built once and cached under ``cache_dir``."""
    from st_viomni.testing import make_tiny_base_model

    path = Path(cache_dir) / f"base-{preset}-seed{seed}-{_spec_hash(preset)}"
    if not _complete(path):
        # full-2b is saved in bfloat16 (4.4 GB instead of 8.9 GB); GPU runs load it in bfloat16 anyway.
        dtype = "bfloat16" if preset == "full-2b" else None
        log(f"building the {preset} base checkpoint in {path} (once; cached)")
        make_tiny_base_model(path, seed=seed, preset=preset, dtype=dtype)
        (path / ".complete").write_text("ok\n")
    return path


def prepare_viomni(
    preset: str,
    *,
    seed: int = 0,
    embedding_dim: int = 1024,
    max_visual_tokens: int | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> Path:
    """A saved viOmni model (``build_model`` on the preset's base, Dense seeded), built once and cached."""
    from st_viomni import build_model

    base = prepare_base(preset, seed=seed, cache_dir=cache_dir)
    tokens = "base" if max_visual_tokens is None else str(max_visual_tokens)
    path = Path(cache_dir) / f"viomni-{preset}-seed{seed}-{_spec_hash(preset)}-e{embedding_dim}-v{tokens}"
    if not _complete(path):
        import torch

        log(f"building the viOmni model in {path} (once; cached)")
        torch.manual_seed(seed)
        max_pixels = None if max_visual_tokens is None else max_visual_tokens * PIXELS_PER_VISUAL_TOKEN
        model = build_model(base, embedding_dim=embedding_dim, max_pixels=max_pixels)
        model.save(str(path))
        del model
        gc.collect()
        (path / ".complete").write_text("ok\n")
    return path


def count_parameters(model_dir: Path) -> int:
    """Parameters of the saved Qwen2-VL weights (read from the safetensors header, nothing loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            numel = 1
            for size in handle.get_slice(key).get_shape():
                numel *= size
            total += numel
    return total


def resolve_dtype(name: str):
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def best_attention(device: str) -> str:
    """The fastest attention implementation transformers can use here: FlashAttention-2 on CUDA when installed."""
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


# ----------------------------------------------------------------------------------------------------------------
# Memory


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory growth over a block of code.

    CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes at the start (the caching allocator's
    own statistics, exact). CPU: the process's peak resident set size (Linux ``VmHWM``, reset at the start by
    writing ``5`` to ``/proc/self/clear_refs``) minus its resident set size at the start. RSS counts every
    allocation (PyTorch tensors, image decoding, the processor's numpy buffers). Freed memory that the C
    allocator keeps for reuse would stay resident and hide part of the next block's growth, so the start first
    returns it to the system (glibc ``malloc_trim(0)``); a fresh process per configuration is cleaner still
    (the encode benchmark's default).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = ""
        self.start_bytes = 0
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
        else:
            _malloc_trim()
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.method = "peak RSS (VmHWM reset via /proc/self/clear_refs)"
            except OSError:
                self.method = "peak RSS (ru_maxrss, not resettable: peak of the whole process)"
            self.start_bytes = (_proc_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            hwm = _proc_status_kib("VmHWM")
            if hwm is None:
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_bytes = hwm * 1024

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_growth_mib": round(self.growth_bytes / 2**20, 1),
            "peak_mib": round(self.peak_bytes / 2**20, 1),
            "start_mib": round(self.start_bytes / 2**20, 1),
            "method": self.method,
        }


def peak_tensor_growth_bytes(function: Callable[[], Any]) -> int:
    """Peak growth of the bytes of live CPU tensors while ``function()`` runs.

    What ``torch.cuda.max_memory_allocated`` counts on a GPU, measured on CPU from PyTorch's profiler: the
    running sum of tensor allocations minus frees on its memory timeline (``profile_memory``, ``record_shapes``
    and ``with_stack``, which the timeline needs; a private but long-standing profiler API). Unlike RSS it leaves
    out the C allocator's retention and fragmentation, Python objects and image buffers. Slow: the profiler
    records every operator with its stack (seconds per step on ``tiny``, minutes on ``proxy-2b``).
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        function()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action.name == "CREATE":
            live += size
        elif action.name == "DESTROY":  # also tensors that existed before: growth is counted from the start
            live -= size
        peak = max(peak, live)
    return peak


def _malloc_trim() -> None:
    """Return the C heap's free memory to the system (glibc only; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def minor_page_faults() -> int | None:
    """Minor page faults of this process so far (Linux, macOS): each is a page of memory touched for the first
    time since it was mapped. Large tensors that the C allocator maps afresh on every allocation show up here."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def current_rss_bytes() -> int | None:
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def run_probe(module: str, argv: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m <module> <argv>`` in a fresh process and return the JSON it prints after ``PROBE ``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in completed.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE ") :])
    tail = (completed.stderr or completed.stdout)[-2000:]
    raise RuntimeError(f"memory probe {module} {' '.join(argv)} failed (exit {completed.returncode}):\n{tail}")


# ----------------------------------------------------------------------------------------------------------------
# Counting what a model computes


class TokenCounter:
    """Records what every forward of the model receives (a forward pre-hook; the forward itself is unchanged).

    Hook it on the module the system calls: sentence-transformers' ``Transformer`` module (which calls
    ``Qwen2VLModel.forward`` directly, past any hook on the Qwen2-VL model) or the ``Qwen2VLModel`` of the
    hand-written loop. Per forward: rows, padded length, non-padding length of every row (from the attention
    mask fed), visual tokens (``<|image_pad|>`` positions) and the image patch grids.
    """

    def __init__(self, module: Any, image_token_id: int) -> None:
        self.image_token_id = image_token_id
        self.forwards: list[dict[str, Any]] = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: tuple, kwargs: dict) -> None:
        features = args[0] if args and isinstance(args[0], Mapping) else kwargs
        input_ids = features["input_ids"]
        mask = features.get("attention_mask")
        rows, padded = input_ids.shape
        if mask is None:
            lengths = [padded] * rows
            visual = int((input_ids == self.image_token_id).sum())
        else:
            lengths = mask.sum(dim=1).tolist()
            visual = int(((input_ids == self.image_token_id) & mask.bool()).sum())
        grid = features.get("image_grid_thw")
        self.forwards.append(
            {
                "rows": rows,
                "padded_length": padded,
                "lengths": [int(length) for length in lengths],
                "visual_tokens": visual,
                "image_grid_thw": [] if grid is None else grid.tolist(),
            }
        )

    def reset(self) -> None:
        self.forwards = []

    def summary(self, config: Any, embedding_dim: int) -> dict[str, Any]:
        lengths = [length for forward in self.forwards for length in forward["lengths"]]
        grids = [grid for forward in self.forwards for grid in forward["image_grid_thw"]]
        useful = sum(lengths)
        computed = sum(forward["rows"] * forward["padded_length"] for forward in self.forwards)
        visual = sum(forward["visual_tokens"] for forward in self.forwards)
        flops = forward_flops(config, lengths=lengths, image_grid_thw=grids, embedding_dim=embedding_dim)
        padded = padded_forward_flops(
            config,
            batches=[(forward["rows"], forward["padded_length"]) for forward in self.forwards],
            image_grid_thw=grids,
            embedding_dim=embedding_dim,
        )
        return {
            "forward_calls": len(self.forwards),
            "sequences": len(lengths),
            "tokens": {
                "text": useful - visual,
                "visual": visual,
                "useful": useful,
                "computed": computed,
                "padding": computed - useful,
                "image_patches": sum(t * h * w for t, h, w in grids),
            },
            "padding_fraction": round((computed - useful) / computed, 4) if computed else 0.0,
            "useful_flops": flops,
            "padded_flops": padded,
        }


# ----------------------------------------------------------------------------------------------------------------
# Compute reference


MATMUL_KERNELS = ("torch.mm", "onednn")
"""The products the reference times: ``torch.mm``, PyTorch's default (MKL ``sgemm`` for float32 on CPU), and
oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise`` for float32 on CPU, where it is faster on some
CPUs; ``F.linear`` otherwise, which is oneDNN already for bfloat16 on CPU). The reference is the faster of the
two, so that it is the best product the machine offers, not the default one."""


def _onednn_product(a, b):
    import torch

    if a.device.type == "cpu" and a.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # a @ b.T
    return torch.nn.functional.linear(a, b)


def matmul_rates(size: int, dtype_name: str, device: str, repeats: int = 5) -> dict[str, list[float]]:
    """FLOP/s of ``repeats`` ``size x size`` by ``size x size`` products (2 * size**3 FLOPs each) per kernel
    of :data:`MATMUL_KERNELS`."""
    import torch


    dtype = resolve_dtype(dtype_name)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    products = {"torch.mm": lambda: torch.mm(a, b), "onednn": lambda: _onednn_product(a, b)}
    rates: dict[str, list[float]] = {kernel: [] for kernel in MATMUL_KERNELS}
    with torch.inference_mode():
        for kernel, product in products.items():
            for index in range(repeats + 1):
                sync(device)
                start = time.perf_counter()
                product()
                sync(device)
                if index:  # the first product warms up the kernel
                    rates[kernel].append(2 * size**3 / (time.perf_counter() - start))
    return rates


class MatmulReference:
    """The machine's matmul FLOP/s in the run's dtypes, measured at the start of a run and again between its
    repeats: on a shared machine the compute available changes during a run, and the reference should see the
    same conditions as the measurements it is compared with. The reference of a dtype is the median over all
    products of its faster kernel (:data:`MATMUL_KERNELS`)."""

    def __init__(self, size: int, dtypes: Sequence[str], device: str) -> None:
        self.size = size
        self.device = device
        self.rates: dict[str, dict[str, list[float]]] = {
            dtype: {kernel: [] for kernel in MATMUL_KERNELS} for dtype in dict.fromkeys(dtypes)
        }
        self.measurements = 0

    def measure(self, repeats: int = 5) -> None:
        for dtype, kernels in self.rates.items():
            for kernel, rates in matmul_rates(self.size, dtype, self.device, repeats).items():
                kernels[kernel].extend(rates)
        self.measurements += 1

    def fastest_kernel(self, dtype: str) -> str:
        return max(MATMUL_KERNELS, key=lambda kernel: statistics.median(self.rates[dtype][kernel]))

    def median(self, dtype: str) -> float:
        return statistics.median(self.rates[dtype][self.fastest_kernel(dtype)])

    def summary(self) -> dict[str, Any]:
        return {
            dtype: {
                "size": self.size,
                "dtype": dtype,
                "measurements": self.measurements,
                "kernel": self.fastest_kernel(dtype),
                **summarize(kernels[self.fastest_kernel(dtype)]),
                "kernels": {kernel: summarize(rates) for kernel, rates in kernels.items()},
            }
            for dtype, kernels in self.rates.items()
        }


def describe_matmul(summary: dict[str, Any]) -> str:
    """One line for a results table: each dtype's reference and the kernels it was the faster of."""
    parts = []
    for dtype, reference in summary.items():
        kernels = ", ".join(
            f"{kernel} {fmt_si(rates['median'], 'FLOP/s')}" for kernel, rates in reference["kernels"].items()
        )
        parts.append(f"{dtype} {fmt_si(reference['median'], 'FLOP/s')} ({kernels})")
    first = next(iter(summary.values()))
    return (
        f"Matmul reference ({first['size']}x{first['size']}, the faster kernel, median of {first['measurements']} "
        f"measurements through the run): {'; '.join(parts)}."
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# Statistics, machine, output


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the values themselves (rounded)."""
    values = [float(value) for value in values]
    return {
        "median": _round(statistics.median(values)),
        "min": _round(min(values)),
        "max": _round(max(values)),
        "values": [_round(value) for value in values],
    }


def _round(value: float) -> float:
    if value == 0 or not (abs(value) < float("inf")):
        return value
    return float(f"{value:.4g}")


def machine_info(device: str) -> dict[str, Any]:
    """Where and with what a benchmark ran (CPU, threads, memory, GPU, library versions, git commit, load)."""
    import sentence_transformers
    import torch
    import transformers

    try:
        identity = cpu_identity(Path("/proc/cpuinfo").read_text())
    except OSError:
        identity = {}
    cpu = identity.pop("cpu", None) or platform.processor() or platform.machine()
    memory_kib = None
    try:
        match = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        memory_kib = int(match.group(1)) if match else None
    except OSError:
        pass
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname_hash": hashlib.sha1(platform.node().encode()).hexdigest()[:8],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        **identity,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory_kib / 2**20, 1) if memory_kib else None,
        "load_average_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
    }
    return info


# The instruction sets that decide which kernel wins: oneDNN against sgemm, bfloat16 products and attention.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_identity(cpuinfo: str) -> dict[str, Any]:
    """Name, family, model and :data:`CPU_FEATURES` of the first processor in ``/proc/cpuinfo``'s text.

    A cloud CPU's name alone ("AMD EPYC") does not tell generations apart, and the ratios between kernels
    differ by generation: two 2-core "AMD EPYC" machines gave st-viomni 1.64x and 2.78x stock's encode speed."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor only
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    identity: dict[str, Any] = {"cpu": fields.get("model name")}
    if fields.get("cpu family", "").isdigit() and fields.get("model", "").isdigit():
        identity["cpu_family"], identity["cpu_model"] = int(fields["cpu family"]), int(fields["model"])
    if flags:
        identity["cpu_features"] = [feature for feature in CPU_FEATURES if feature in flags]
    return identity


def describe_machine(machine: Mapping[str, Any]) -> str:
    """Where a run ran, for a results table's header: the GPU, or the CPU with its family and features."""
    if machine.get("gpu"):
        return machine["gpu"]
    details = []
    if "cpu_family" in machine:
        details.append(f"family {machine['cpu_family']} model {machine['cpu_model']}")
    if machine.get("cpu_features"):
        details.append(", ".join(machine["cpu_features"]))
    cpu = machine["cpu"] + (f" ({'; '.join(details)})" if details else "")
    return f"{cpu}, {machine['cpu_count']} cores, {machine['torch_threads']} torch threads"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def output_paths(results_dir: Path, name: str) -> dict[str, Path]:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = Path(results_dir) / f"{name}-{stamp}"
    return {"json": stem.with_suffix(".json"), "png": stem.with_suffix(".png"), "md": stem.with_suffix(".md")}


def display_path(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(function: Callable[[], Any], device: str) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    result = function()
    sync(device)
    return result, time.perf_counter() - start


def fmt_si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()
