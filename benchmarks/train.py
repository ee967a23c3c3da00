"""Training benchmark: step time and peak memory of PrefixRoutedLoss (plain and cached) next to
sentence-transformers' MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss, on the same batches.

Run from the repository root::

    python -m benchmarks.train                               # tiny at 16/64/256 and proxy-2b at 16, CPU float32
    python -m benchmarks.train --run proxy-2b:16,64,256      # the full proxy-2b grid (about an hour on 2 cores)
    python -m benchmarks.train --device cuda                 # full-2b at 16/64/256 in bfloat16
    python -m benchmarks.train --run tiny:16 --repeats 1     # seconds, smoke size

A step is what the trainer does per batch, minus the optimizer update (identical for every loss): collate the
global batch (``model.preprocess``: chat template, tokenizer, image processor) with sentence-transformers' data
collator, or for the cached PrefixRoutedLoss with ``st_viomni.DeferredPixelCollator`` as ``st-viomni train``
does (its pixels are then computed per mini-batch inside the loss), the loss's forward, and the backward pass. The batches are the first ``B`` rows of
``build_training_dataset(mini_mixture(...))``, the same rows for every loss; the losses alternate within each
repeat. See ``benchmarks/README.md`` for how each number is measured.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.flops import forward_flops

LOSS_DESCRIPTIONS = {
    "prefix-routed": "st_viomni.losses.PrefixRoutedLoss(model) (temperature 0.05)",
    "cached-prefix-routed": (
        "st_viomni.losses.CachedPrefixRoutedLoss(model, mini_batch_size=M) on batches collated by "
        "st_viomni.DeferredPixelCollator (pixels computed per mini-batch)"
    ),
    "mnrl": (
        "sentence_transformers MultipleNegativesRankingLoss(model, scale=20, directions=('query_to_doc', "
        "'doc_to_query'), partition_mode='per_direction'): the symmetric InfoNCE that PrefixRoutedLoss builds on"
    ),
    "cached-mnrl": "sentence_transformers CachedMultipleNegativesRankingLoss, same settings, mini_batch_size=M",
}
ALL_LOSSES = tuple(LOSS_DESCRIPTIONS)
DEFERRED_PIXELS = {"cached-prefix-routed"}  # collated by st_viomni.DeferredPixelCollator, as `st-viomni train` does
CACHED_PAIRS = {"cached-prefix-routed": "prefix-routed", "cached-mnrl": "mnrl"}


def make_loss(name: str, model: Any, mini_batch_size: int, mini_batch_num_tokens: int | None = None):
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from st_viomni.losses import CachedPrefixRoutedLoss, PrefixRoutedLoss

    # The InfoNCE settings of PrefixRoutedLoss, so that the baselines compute the same contrastive core.
    mnrl_kwargs = {"scale": 20.0, "directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"}
    if name == "prefix-routed":
        return PrefixRoutedLoss(model)
    if name == "cached-prefix-routed":
        return CachedPrefixRoutedLoss(
            model, mini_batch_size=mini_batch_size, mini_batch_num_tokens=mini_batch_num_tokens
        )
    if name == "mnrl":
        return MultipleNegativesRankingLoss(model, **mnrl_kwargs)
    if name == "cached-mnrl":
        return CachedMultipleNegativesRankingLoss(
            model, mini_batch_size=mini_batch_size, mini_batch_num_tokens=mini_batch_num_tokens, **mnrl_kwargs
        )
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(ALL_LOSSES)}")


MIXTURE_ROWS = 256  # the mixture is drawn for at least this many rows, so batch B is the same rows in every run


def training_rows(n_rows: int, seed: int) -> list[dict[str, Any]]:
    """The first ``n_rows`` trainer rows (``anchor, positive, label``) of the mini mixture (tasks shuffled)."""
    from st_viomni.data import build_training_dataset, mini_mixture

    n_per_task = math.ceil(max(n_rows, MIXTURE_ROWS) / 5)
    dataset = build_training_dataset(mini_mixture(n_per_task, split="train", seed=seed))
    return [dataset[index] for index in range(n_rows)]


def _collect_features(batch: dict[str, Any], device: str) -> tuple[list[dict[str, Any]], Any]:
    """The trainer's ``collect_features``: split the collated batch into one feature dict per column."""
    labels = batch.pop("label", None)
    features = []
    for column in ("anchor", "positive"):
        prefix = column + "_"
        features.append(
            {
                key[len(prefix) :]: value.to(device) if hasattr(value, "to") else value
                for key, value in batch.items()
                if key.startswith(prefix)
            }
        )
    return features, None if labels is None else labels.to(device)


def train_step(model: Any, loss: Any, collator: Any, rows: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """One step: collate, loss forward, backward. Returns its timings, loss value and the batch's sequences."""
    import time

    common.sync(device)
    start = time.perf_counter()
    batch = collator(rows)
    collated = time.perf_counter()
    features, labels = _collect_features(batch, device)
    lengths = [int(n) for f in features for n in f["attention_mask"].sum(dim=1).tolist()]
    grids = [grid for f in features if "image_grid_thw" in f for grid in f["image_grid_thw"].tolist()]
    output = loss(features, labels)
    value = sum(output.values()) if isinstance(output, dict) else output
    value.backward()
    loss_value = float(value.detach())
    common.sync(device)
    end = time.perf_counter()
    model.zero_grad(set_to_none=False)  # keep the gradient buffers: every step then starts from the same memory
    return {"seconds": end - start, "collate_seconds": collated - start, "loss": loss_value, "lengths": lengths,
            "grids": grids}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train",
        description="Training step time and peak memory: PrefixRoutedLoss plain and cached vs sentence-transformers' "
        "MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss, same batches of the mini mixture.",
    )
    parser.add_argument("--run", action="append", default=None, metavar="PRESET:B1,B2,...",
                        help="a preset and its global batch sizes; repeat for more (default: tiny:16,64,256 and "
                        "proxy-2b:16 on CPU, full-2b:16,64,256 on CUDA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--attention", default=None, help="attention implementation (default: flash_attention_2 on "
                        "CUDA when installed, else sdpa)")
    parser.add_argument("--losses", default=",".join(ALL_LOSSES), help="comma-separated subset of losses")
    parser.add_argument("--mini-batch-size", type=int, default=8, help="mini-batch of both cached losses (default 8)")
    parser.add_argument("--mini-batch-num-tokens", type=int, default=None,
                        help="token budget of both cached losses' embedding mini-batches, in place of "
                        "--mini-batch-size rows (which still sets the loss's chunks), each by its own rule (cached "
                        "PrefixRoutedLoss: padded tokens plus priced image patches; cached MNRL: non-padding tokens "
                        "in batch order; default: none)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per loss and batch size (default 3)")
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="skip a configuration whose memory, extrapolated linearly from the same loss at the "
                        "previous batch size, exceeds this (default: 80%% of available memory at start)")
    parser.add_argument("--embedding-dim", type=int, default=None, help="Dense output width (default 1024; tiny 32)")
    parser.add_argument("--max-visual-tokens", type=int, default=None, help="visual tokens per image at most "
                        "(default: the preset's; the mini mixture's images use at most 100)")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="matmul reference size (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice, one per core)")
    parser.add_argument("--tensor-peak", action="store_true",
                        help="CPU: after all timed steps, one more step per loss and batch size under PyTorch's "
                        "profiler, for the peak growth of live tensor bytes (without the allocator's retention; slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="result file stem (default train-<device>-<dtype>)")
    parser.add_argument("--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument("--cache-dir", type=Path, default=common.DEFAULT_CACHE_DIR)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    args.run = args.run or (["full-2b:16,64,256"] if cuda else ["tiny:16,64,256", "proxy-2b:16"])
    runs = []
    for spec in args.run:
        preset, _, sizes = spec.partition(":")
        if preset not in ("tiny", "proxy-2b", "full-2b") or not sizes:
            parser.error(f"--run expects PRESET:B1,B2,... with PRESET tiny, proxy-2b or full-2b; got {spec!r}")
        runs.append((preset, sorted({int(size) for size in sizes.split(",")})))
    args.runs = runs
    if args.tensor_peak and cuda:
        parser.error("--tensor-peak is for CPU; on CUDA the peak memory already counts tensors only")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.attention = args.attention or common.best_attention(args.device)
    args.matmul_size = args.matmul_size or (8192 if cuda else 2048)
    args.losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    for name in args.losses:
        if name not in ALL_LOSSES:
            parser.error(f"unknown loss {name!r}; known: {', '.join(ALL_LOSSES)}")
    if args.memory_budget_gib is None:
        args.memory_budget_gib = _default_budget_gib(args.device)
    return args


def _default_budget_gib(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(0.8 * int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 16.0


def run_preset(preset: str, batch_sizes: list[int], rows: list[dict[str, Any]], args: argparse.Namespace,
               matmul: common.MatmulReference) -> dict[str, Any]:
    import torch
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from st_viomni import DeferredPixelCollator, ViOmniQwen

    embedding_dim = args.embedding_dim or (32 if preset == "tiny" else 1024)
    model_dir = common.prepare_viomni(
        preset, seed=args.seed, embedding_dim=embedding_dim, max_visual_tokens=args.max_visual_tokens,
        cache_dir=args.cache_dir,
    )
    dtype = common.resolve_dtype(args.dtype)
    common.log(f"{preset}: loading the model")
    model = ViOmniQwen(str(model_dir), device=args.device,
                       model_kwargs={"dtype": dtype, "attn_implementation": args.attention})
    model.to(dtype)
    model.train()
    config = model[0].model.config
    # Each loss gets the collator it is trained with: st-viomni trains its cached loss on batches whose pixels it
    # computes per mini-batch (what `st-viomni train` does); the other losses get sentence-transformers' own.
    stock_collator = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)
    collators = {name: DeferredPixelCollator(model.preprocess) if name in DEFERRED_PIXELS else stock_collator
                 for name in args.losses}
    losses = {name: make_loss(name, model, args.mini_batch_size, args.mini_batch_num_tokens) for name in args.losses}
    counter = common.TokenCounter(model[0], config.image_token_id)

    # Warm-up: every loss once on a small batch (allocates the gradient buffers, initialises kernels).
    for name, loss in losses.items():
        common.log(f"{preset}: warm-up {name}")
        train_step(model, loss, collators[name], rows[: min(8, len(rows))], args.device)

    budget_bytes = args.memory_budget_gib * 2**30
    results: dict[str, Any] = {}
    previous: dict[str, tuple[int, float]] = {}  # loss -> (batch size, peak growth bytes)
    for batch_size in batch_sizes:
        batch_rows = rows[:batch_size]
        matmul.measure()  # the reference follows the machine's load through the run
        runs: dict[str, dict[str, Any]] = {name: {"seconds": [], "collate_seconds": [], "memory": [], "loss": []}
                                           for name in losses}
        skipped: dict[str, str] = {}
        for name in losses:
            if name in previous:
                size, growth = previous[name]
                estimate = growth * batch_size / size
                if estimate > budget_bytes:
                    skipped[name] = (f"skipped: peak memory extrapolated from batch {size} "
                                     f"({estimate / 2**30:.1f} GiB) exceeds the budget ({args.memory_budget_gib} GiB)")
        order = [name for name in losses if name not in skipped]
        for repeat in range(args.repeats):
            shift = repeat % max(1, len(order))
            for name in order[shift:] + order[:shift]:
                if name in skipped:
                    continue
                gc.collect()
                counter.reset()
                try:
                    with common.PeakMemory(args.device) as peak:
                        step = train_step(model, losses[name], collators[name], batch_rows, args.device)
                except torch.cuda.OutOfMemoryError:
                    model.zero_grad(set_to_none=False)
                    torch.cuda.empty_cache()
                    skipped[name] = "out of GPU memory"
                    continue
                run = runs[name]
                run["seconds"].append(step["seconds"])
                run["collate_seconds"].append(step["collate_seconds"])
                run["memory"].append(peak.as_dict())
                run["loss"].append(step["loss"])
                run["counts"] = counter.summary(config, embedding_dim)
                run["lengths"], run["grids"] = step["lengths"], step["grids"]
                common.log(f"{preset} batch {batch_size} repeat {repeat + 1}/{args.repeats} {name}: "
                           f"{step['seconds']:.2f} s, peak +{peak.growth_bytes / 2**20:.0f} MiB, "
                           f"loss {step['loss']:.5f}")
        per_loss: dict[str, Any] = {}
        for name in losses:
            if name in skipped or not runs[name]["seconds"]:
                per_loss[name] = {"skipped": skipped.get(name, "not run")}
                continue
            run = runs[name]
            growth = max(memory["peak_growth_mib"] for memory in run["memory"])
            previous[name] = (batch_size, growth * 2**20)
            useful = 3 * forward_flops(config, lengths=run["lengths"], image_grid_thw=run["grids"],
                                       embedding_dim=embedding_dim)["total"]
            rates = [useful / seconds for seconds in run["seconds"]]
            counts = run["counts"]
            per_loss[name] = {
                "step_seconds": common.summarize(run["seconds"]),
                "collate_seconds": common.summarize(run["collate_seconds"]),
                "samples_per_s": common.summarize([batch_size / seconds for seconds in run["seconds"]]),
                "peak_memory": {
                    "peak_growth_mib": growth,
                    "peak_growth_mib_per_repeat": [memory["peak_growth_mib"] for memory in run["memory"]],
                    "start_mib": run["memory"][0]["start_mib"],
                    "method": run["memory"][0]["method"],
                },
                "loss_value": run["loss"][0],
                "forward_calls": counts["forward_calls"],
                "tokens": {key: counts["tokens"][key] for key in ("text", "visual", "computed", "padding")},
                "padding_fraction": counts["padding_fraction"],
                "useful_flops": useful,
                "achieved_flops_per_s": common.summarize(rates),
            }
            per_loss[name]["_seconds"] = run["seconds"]
        results[str(batch_size)] = per_loss
    if args.tensor_peak:
        # After every timed step: a profiled step leaves the C heap fragmented, which inflates the RSS growth of
        # the steps that follow it.
        for batch_size in batch_sizes:
            for name, entry in results[str(batch_size)].items():
                if "step_seconds" in entry:
                    step = functools.partial(
                        train_step, model, losses[name], collators[name], rows[:batch_size], args.device
                    )
                    entry["peak_tensor_growth_mib"] = round(common.peak_tensor_growth_bytes(step) / 2**20, 2)
    counter.handle.remove()
    del losses, model, collators, stock_collator
    gc.collect()
    return {
        "embedding_dim": embedding_dim,
        "parameters": common.count_parameters(model_dir),
        "batch_sizes": results,
    }


def _paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    if "_seconds" not in a or "_seconds" not in b:
        return None
    return common.summarize([sa / sb for sa, sb in zip(a["_seconds"], b["_seconds"])])


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    machine = common.machine_info(args.device)
    common.log(f"matmul reference ({args.matmul_size}^2)")
    matmul = common.MatmulReference(args.matmul_size, ["float32", args.dtype], args.device)
    matmul.measure()
    max_rows = max(size for _, sizes in args.runs for size in sizes)
    common.log(f"mini mixture: {max_rows} rows")
    rows = training_rows(max(max_rows, 8), args.seed)
    presets = {preset: run_preset(preset, sizes, rows, args, matmul) for preset, sizes in args.runs}

    for result in presets.values():
        for per_loss in result["batch_sizes"].values():
            for entry in per_loss.values():
                if "achieved_flops_per_s" in entry:
                    entry["fraction_of_fp32_matmul"] = round(
                        entry["achieved_flops_per_s"]["median"] / matmul.median("float32"), 4
                    )
    ratios: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    tolerance = 1e-4 if args.dtype == "float32" else 2e-2
    for preset, result in presets.items():
        sizes = result["batch_sizes"]
        for size, per_loss in sizes.items():
            for cached, plain in CACHED_PAIRS.items():
                if "loss_value" in per_loss.get(cached, {}) and "loss_value" in per_loss.get(plain, {}):
                    difference = abs(per_loss[cached]["loss_value"] - per_loss[plain]["loss_value"])
                    scale = max(1.0, abs(per_loss[plain]["loss_value"]))
                    checks[f"{preset}/{size}/{cached}_vs_{plain}_loss_abs_diff"] = float(f"{difference:.3g}")
                    checks.setdefault("ok", True)
                    checks["ok"] = checks["ok"] and difference <= tolerance * scale
            ratio = _paired_ratio(per_loss.get("cached-prefix-routed", {}), per_loss.get("cached-mnrl", {}))
            if ratio:
                ratios[f"{preset}/{size}/cached_prefix_routed_vs_cached_mnrl_step_time"] = ratio
            ratio = _paired_ratio(per_loss.get("prefix-routed", {}), per_loss.get("mnrl", {}))
            if ratio:
                ratios[f"{preset}/{size}/prefix_routed_vs_mnrl_step_time"] = ratio
        measured = [int(size) for size, per_loss in sizes.items()
                    if "peak_memory" in per_loss.get("cached-prefix-routed", {})]
        if len(measured) >= 2:
            low, high = min(measured), max(measured)
            memory = {size: sizes[str(size)]["cached-prefix-routed"]["peak_memory"]["peak_growth_mib"]
                      for size in (low, high)}
            ratios[f"{preset}/cached_prefix_routed_peak_memory_{high}_vs_{low}"] = (
                round(memory[high] / memory[low], 3) if memory[low] else None
            )
            tensors = {size: sizes[str(size)]["cached-prefix-routed"].get("peak_tensor_growth_mib")
                       for size in (low, high)}
            if tensors[low]:
                ratios[f"{preset}/cached_prefix_routed_peak_tensors_{high}_vs_{low}"] = round(
                    tensors[high] / tensors[low], 3
                )
        for per_loss in sizes.values():
            for entry in per_loss.values():
                entry.pop("_seconds", None)
    checks["tolerance"] = tolerance
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    result = {
        "benchmark": "train",
        "command": "python -m benchmarks.train" + ("" if not argv else " " + shlex.join(argv)),
        "config": {
            "runs": {preset: sizes for preset, sizes in args.runs},
            "device": args.device,
            "dtype": args.dtype,
            "attention": args.attention,
            "losses": {
                name: LOSS_DESCRIPTIONS[name].replace("mini_batch_size=M", f"mini_batch_size={args.mini_batch_size}")
                for name in args.losses
            },
            "mini_batch_size": args.mini_batch_size,
            "mini_batch_num_tokens": args.mini_batch_num_tokens,
            "repeats": args.repeats,
            "memory_budget_gib": args.memory_budget_gib,
            "threads": args.threads,
            "tensor_peak": args.tensor_peak,
            "seed": args.seed,
            "step": "collate (model.preprocess) + loss forward + backward; no optimizer update",
            "data": "first B rows of build_training_dataset(mini_mixture(ceil(max(256, max B) / 5), 'train', seed))",
        },
        "machine": machine,
        "matmul": matmul.summary(),
        "presets": presets,
        "ratios": ratios,
        "cached_matches_plain": checks,
    }
    name = args.name or f"train-{args.device.split(':')[0]}-{args.dtype}"
    paths = common.output_paths(args.results_dir, name)
    result["files"] = {kind: common.display_path(path) for kind, path in paths.items()}
    table = markdown_table(result)
    common.write_json(paths["json"], result)
    paths["md"].write_text(table, encoding="utf-8")
    if not args.no_plot:
        plot(result, paths["png"])
    print(table)
    return result


def markdown_table(result: dict[str, Any]) -> str:
    config, machine = result["config"], result["machine"]
    where = common.describe_machine(machine)
    lines = [
        f"Training step (collate + forward + backward, no optimizer), {config['device']} {config['dtype']}, mini "
        "mixture, cached mini-batches of "
        + (
            f"{config['mini_batch_num_tokens']} tokens (loss chunks of {config['mini_batch_size']} rows)"
            if config.get("mini_batch_num_tokens")
            else f"{config['mini_batch_size']} rows"
        )
        + f", median of {config['repeats']} alternating repeats "
        f"(min-max). {where}; {machine['date_utc'][:10]}; load average {machine['load_average_start'][0]} at start, "
        f"{machine['load_average_end'][0]} at end. "
        f"Command: `{result['command']}`.",
        "",
    ]
    tensors = config.get("tensor_peak", False)  # one more column: the profiler's peak of live tensors
    columns = ["preset", "batch", "loss", "step s", "samples/s", "peak memory growth",
               *(["peak tensor growth"] * tensors), "padding", "loss value"]
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for preset, preset_result in result["presets"].items():
        for size, per_loss in preset_result["batch_sizes"].items():
            for name, entry in per_loss.items():
                if "skipped" in entry:
                    lines.append(f"| {preset} | {size} | {name} | {entry['skipped']} | | | | |" + " |" * tensors)
                    continue
                step = entry["step_seconds"]
                tensor_cell = f" {entry['peak_tensor_growth_mib']:.2f} MiB |" if tensors else ""
                lines.append(
                    f"| {preset} | {size} | {name} | {step['median']:.3g} ({step['min']:.3g}-{step['max']:.3g}) "
                    f"| {entry['samples_per_s']['median']:.3g} | {entry['peak_memory']['peak_growth_mib']:.0f} MiB "
                    f"|{tensor_cell} {entry['padding_fraction']:.1%} | {entry['loss_value']:.4f} |"
                )
    if result["ratios"]:
        parts = [f"{key} {value['median']:.3g} ({value['min']:.3g}-{value['max']:.3g})" if isinstance(value, dict)
                 else f"{key} {value}" for key, value in result["ratios"].items()]
        lines += ["", "Ratios: " + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(result["presets"])
    figure, axes = plt.subplots(2, len(presets), figsize=(6 * len(presets), 7), squeeze=False)
    colours = {
        "prefix-routed": "#2a7ab9", "cached-prefix-routed": "#7fb3dd", "mnrl": "#777777", "cached-mnrl": "#bbbbbb"
    }
    for column, preset in enumerate(presets):
        sizes = result["presets"][preset]["batch_sizes"]
        labels = list(sizes)
        losses = list(next(iter(sizes.values())))
        width = 0.8 / max(1, len(losses))
        for index, name in enumerate(losses):
            xs = [position + (index - (len(losses) - 1) / 2) * width for position in range(len(labels))]
            times = [sizes[size][name].get("step_seconds", {}).get("median", 0) for size in labels]
            memory = [sizes[size][name].get("peak_memory", {}).get("peak_growth_mib", 0) for size in labels]
            axes[0][column].bar(xs, times, width, label=name, color=colours.get(name))
            axes[1][column].bar(xs, memory, width, label=name, color=colours.get(name))
        log = len(labels) > 1  # batch sizes 16x apart: a log axis keeps the small ones readable
        scale = ", log scale" if log else ""
        for row, title in enumerate((f"step time (s, median{scale})", f"peak memory growth (MiB{scale})")):
            axis = axes[row][column]
            if log:
                axis.set_yscale("log")
            axis.set_xticks(range(len(labels)), [f"batch {size}" for size in labels])
            axis.set_title(f"{preset}: {title}", fontsize=10)
        axes[0][column].legend(fontsize=8)
    figure.suptitle(
        f"train step: {result['config']['device']} {result['config']['dtype']}, mini-batch "
        f"{result['config']['mini_batch_size']}, {result['machine']['date_utc'][:10]} (a skipped configuration has no bar)",
        fontsize=11,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    run(argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
