"""Encode benchmark: st-viomni's encode next to stock sentence-transformers and a hand-written transformers loop.

Run from the repository root::

    python -m benchmarks.encode                     # proxy-2b on CPU, float32, 48 items, batch 8, 3 repeats
    python -m benchmarks.encode --compare-dtype bfloat16   # adds st-viomni in bfloat16 (speed, cosine to fp32)
    python -m benchmarks.encode --device cuda        # full-2b in bfloat16 with the fastest attention available
    python -m benchmarks.encode --preset tiny --items 6 --repeats 1 --memory inprocess   # seconds, smoke size

Systems (same weights, same inputs, same batch size and dtype, timed in one process, alternating):

* ``st-viomni``: ``ViOmniQwen(path).encode(inputs, batch_size=B)``, st-viomni's own encode path with its
  defaults except the batch size (sentence-transformers' default is 32; both batched systems use ``B``).
* ``stock-st``: ``SentenceTransformer(modules=[Transformer(path), Pooling("mean"), Dense, Normalize()])``
  assembled from stock modules on the same checkpoint files (Qwen2-VL weights, processor with the viOmni chat
  template and pixel budget, the Dense weights), ``max_seq_length`` capped like st-viomni's, then
  ``.encode(inputs, batch_size=B)``.
* ``hf-loop``: what a user writes by hand with transformers: ``processor.apply_chat_template`` on one input,
  ``Qwen2VLModel`` forward (with ``mm_token_type_ids``), masked mean, the Dense weights, L2 normalisation;
  one input at a time.

See ``benchmarks/README.md`` for the metrics and how each one is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import common

SYSTEM_DESCRIPTIONS = {
    "st-viomni": "st-viomni: ViOmniQwen(path).encode(inputs, batch_size=B) (its own encode path, defaults otherwise)",
    "stock-st": (
        "stock sentence-transformers: SentenceTransformer(modules=[Transformer(path), Pooling('mean'), Dense, "
        "Normalize()]) on the same files, max_seq_length capped the same, encode(inputs, batch_size=B)"
    ),
    "hf-loop": (
        "plain transformers, one input at a time: processor.apply_chat_template -> Qwen2VLModel (with "
        "mm_token_type_ids) -> masked mean -> Dense weights -> L2 normalise"
    ),
}
BATCHED_SYSTEMS = ("st-viomni", "stock-st")
ALL_SYSTEMS = ("st-viomni", "stock-st", "hf-loop")

# Texts of the corpus: everyday Vietnamese and English sentences (long texts are runs of them).
SENTENCES_VI = (
    "Hà Nội là thủ đô của Việt Nam, nổi tiếng với phố cổ và hồ Hoàn Kiếm.",
    "Thành phố Hồ Chí Minh là trung tâm kinh tế lớn nhất cả nước.",
    "Phở là một món ăn truyền thống được nhiều du khách yêu thích.",
    "Học sinh đến trường lúc bảy giờ sáng và về nhà vào buổi chiều.",
    "Giá của chiếc áo này là hai trăm nghìn đồng, rẻ hơn hôm qua.",
    "Trên bàn có một quyển sách, hai cây bút và một chiếc cốc.",
    "Mùa mưa ở miền Nam thường bắt đầu từ tháng năm đến tháng mười một.",
    "Ăn quả nhớ kẻ trồng cây, uống nước nhớ nguồn.",
    "Hãy tóm tắt đoạn văn sau bằng ba câu ngắn gọn.",
    "Biển báo ghi rằng cấm đỗ xe từ sáu giờ sáng đến tám giờ tối.",
    "Con mèo đang nằm ngủ trên tấm thảm cạnh cửa sổ.",
    "Đồng bằng sông Cửu Long là vựa lúa lớn nhất của Việt Nam.",
)
SENTENCES_EN = (
    "The cat sat on the mat while the dog ran around the park.",
    "Students arrive at school at seven in the morning.",
    "The price of this shirt is two hundred thousand dong.",
    "Translate the following paragraph into Vietnamese and keep the names unchanged.",
    "The quick brown fox jumps over the lazy dog.",
    "A red circle and two blue squares are drawn on a white background.",
    "Please summarise the report in three short sentences.",
    "The museum opens at nine and closes at five on weekdays.",
    "Rainfall in the Mekong Delta peaks between August and October.",
    "The sign says that parking is forbidden during working hours.",
)
QUESTIONS = (
    "Có bao nhiêu hình tròn màu đỏ trong ảnh?",
    "What colour is the square on the left?",
    "Văn bản trong ảnh viết gì?",
    "Which of the two pictures has more shapes?",
    "Màu của hình tam giác bên phải là gì?",
    "What does the text in the image say?",
)
# One cycle of item kinds: 2 short texts, 2 long texts, 3 images, 3 text+image, 2 two-image items.
KIND_CYCLE = (
    "short_text", "text_image", "image", "long_text", "two_images", "image",
    "text_image", "short_text", "long_text", "text_image", "image", "two_images",
)  # fmt: skip
# Images: long side 64 .. 1344 px, aspect ratios from 1:3 to 3:1.
LONG_SIDES = (64, 1344, 224, 640, 96, 1024, 448, 160, 800, 336, 1344, 128)
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 3.0, 1 / 3, 3 / 2, 2 / 3)


@dataclass
class Item:
    kind: str
    task: str
    text: str  # the user text with the task prefix, as format_input renders it
    images: list[Any] = field(default_factory=list)  # PIL images and file paths

    def st_input(self) -> Any:
        """The input as a sentence-transformers user passes it: a string, or an image/text dict."""
        if not self.images:
            return self.text
        return {"image": self.images[0] if len(self.images) == 1 else list(self.images), "text": self.text}


def build_corpus(n_items: int, seed: int, image_dir: Path) -> list[Item]:
    """A fixed mixed corpus: short and long Vietnamese/English texts, images (PIL and file paths) from 64 to
    1344 px on the long side in varied aspect ratios, text+image items and two-image items."""
    from st_viomni.tasks import PREFIXES

    rng = random.Random(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    items: list[Item] = []
    image_index = 0

    def next_image() -> Any:
        nonlocal image_index
        long_side = LONG_SIDES[image_index % len(LONG_SIDES)]
        aspect = ASPECTS[(image_index * 5) % len(ASPECTS)]
        if aspect >= 1:
            width, height = long_side, round(long_side / aspect)
        else:
            width, height = round(long_side * aspect), long_side
        image = _draw_image(max(width, 8), max(height, 8), rng)
        as_path = image_index % 2 == 1
        image_index += 1
        if not as_path:
            return image
        path = image_dir / f"seed{seed}-{image_index:03d}-{image.width}x{image.height}.jpg"
        if not path.is_file():
            image.save(path, quality=90)
        return str(path)

    for index in range(n_items):
        kind = KIND_CYCLE[index % len(KIND_CYCLE)]
        sentences = SENTENCES_VI if rng.random() < 0.6 else SENTENCES_EN
        if kind == "short_text":
            task = "text_pair" if index % 2 else "instr"
            items.append(Item(kind, task, f"{PREFIXES[task]} {rng.choice(sentences)}"))
        elif kind == "long_text":
            task = "instr" if index % 2 else "text_pair"
            body = " ".join(rng.choice(sentences) for _ in range(rng.randint(12, 24)))
            items.append(Item(kind, task, f"{PREFIXES[task]} {body}"))
        elif kind == "image":
            items.append(Item(kind, "ocr", PREFIXES["ocr"], [next_image()]))
        elif kind == "text_image":
            question = rng.choice(QUESTIONS)
            items.append(Item(kind, "vqa_single", f"{PREFIXES['vqa_single']} {question}", [next_image()]))
        else:
            question = rng.choice(QUESTIONS)
            items.append(Item(kind, "vqa_multi", f"{PREFIXES['vqa_multi']} {question}", [next_image(), next_image()]))
    return items


def _draw_image(width: int, height: int, rng: random.Random):
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(180, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 9)):
        x0, y0 = rng.randint(0, width - 1), rng.randint(0, height - 1)
        x1 = min(width, x0 + rng.randint(4, max(5, width // 2)))
        y1 = min(height, y0 + rng.randint(4, max(5, height // 2)))
        colour = tuple(rng.randint(0, 200) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, max(x0, x1), max(y0, y1)), fill=colour)
    label = rng.choice(("Cấm đỗ xe", "Phở 40.000đ", "EXIT", "Hà Nội"))
    draw.text((width // 10, height // 2), label, fill=(0, 0, 0))
    return image


def describe_corpus(items: Sequence[Item]) -> dict[str, Any]:
    from PIL import Image

    kinds: dict[str, int] = {}
    for item in items:
        kinds[item.kind] = kinds.get(item.kind, 0) + 1
    images = [image for item in items for image in item.images]
    sizes = []
    for image in images:
        if isinstance(image, str):
            with Image.open(image) as opened:
                sizes.append(opened.size)
        else:
            sizes.append(image.size)
    long_sides = [max(size) for size in sizes] or [0]
    return {
        "items": len(items),
        "kinds": kinds,
        "images": len(images),
        "images_as_pil": sum(1 for image in images if not isinstance(image, str)),
        "images_as_path": sum(1 for image in images if isinstance(image, str)),
        "image_long_side_px": {"min": min(long_sides), "max": max(long_sides)},
        "languages": "Vietnamese and English",
    }


# ----------------------------------------------------------------------------------------------------------------
# Systems


class System:
    name: str
    hf_model: Any  # the Qwen2VLModel
    forward_module: Any  # the module whose call runs one forward (hooked to count tokens)

    def encode(self, items: Sequence[Item]):  # -> torch.Tensor [N, E] float32 on CPU
        raise NotImplementedError


class SentenceTransformerSystem(System):
    def __init__(self, name: str, model: Any, batch_size: int) -> None:
        self.name = name
        self.model = model
        self.batch_size = batch_size
        self.hf_model = model[0].model
        self.forward_module = model[0]

    def encode(self, items: Sequence[Item]):
        inputs = [item.st_input() for item in items]
        embeddings = self.model.encode(
            inputs, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False
        )
        return embeddings.float().cpu()


def load_st_viomni(model_dir: Path, *, device: str, dtype: str, attention: str, batch_size: int) -> System:
    from st_viomni import ViOmniQwen

    torch_dtype = common.resolve_dtype(dtype)
    model = ViOmniQwen(
        str(model_dir), device=device, model_kwargs={"dtype": torch_dtype, "attn_implementation": attention}
    )
    model.to(torch_dtype)  # the Dense weights too
    model.eval()
    return SentenceTransformerSystem("st-viomni", model, batch_size)


def load_stock_st(model_dir: Path, *, device: str, dtype: str, attention: str, batch_size: int) -> System:
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch_dtype = common.resolve_dtype(dtype)
    transformer = Transformer(
        str(model_dir),
        model_kwargs={"dtype": torch_dtype, "attn_implementation": attention},
        # Flattening (unpadding) text-only batches would bypass Qwen2-VL's M-RoPE positions (wrong embeddings).
        unpad_inputs=False,
    )
    # Qwen2-VL's composite config hides max_position_embeddings from sentence-transformers: cap it as a user must.
    transformer.max_seq_length = transformer.config.text_config.max_position_embeddings
    hidden = transformer.get_embedding_dimension()
    dense_state = load_file(str(model_dir / "2_Dense" / "model.safetensors"))
    dense = Dense(hidden, dense_state["linear.weight"].shape[0], bias=True, activation_function=torch.nn.Identity())
    dense.load_state_dict(dense_state)
    model = SentenceTransformer(
        modules=[transformer, Pooling(hidden, pooling_mode="mean"), dense, Normalize()], device=device
    )
    model.to(torch_dtype)
    model.eval()
    return SentenceTransformerSystem("stock-st", model, batch_size)


class HFLoopSystem(System):
    """The loop a user writes by hand with transformers, one input at a time."""

    def __init__(self, model_dir: Path, *, device: str, dtype: str, attention: str) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoProcessor, Qwen2VLModel

        self.name = "hf-loop"
        self.device = device
        torch_dtype = common.resolve_dtype(dtype)
        self.processor = AutoProcessor.from_pretrained(str(model_dir))
        self.hf_model = Qwen2VLModel.from_pretrained(
            str(model_dir), dtype=torch_dtype, attn_implementation=attention
        ).to(device).eval()
        self.forward_module = self.hf_model
        dense = load_file(str(model_dir / "2_Dense" / "model.safetensors"))
        self.dense_weight = dense["linear.weight"].to(device=device, dtype=torch_dtype)
        self.dense_bias = dense["linear.bias"].to(device=device, dtype=torch_dtype)

    def encode(self, items: Sequence[Item]):
        import torch
        from PIL import Image

        outputs = []
        with torch.inference_mode():
            for item in items:
                content = []
                for image in item.images:
                    if isinstance(image, str):
                        with Image.open(image) as opened:
                            image = opened.convert("RGB")
                    content.append({"type": "image", "image": image})
                content.append({"type": "text", "text": item.text})
                inputs = self.processor.apply_chat_template(
                    [{"role": "user", "content": content}], tokenize=True, return_dict=True, return_tensors="pt"
                ).to(self.device)
                hidden = self.hf_model(**inputs, use_cache=False).last_hidden_state
                mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
                embedding = torch.nn.functional.linear(pooled, self.dense_weight, self.dense_bias)
                outputs.append(torch.nn.functional.normalize(embedding, dim=-1).float().cpu())
        return torch.cat(outputs)


def load_system(name: str, model_dir: Path, args: argparse.Namespace) -> System:
    dtype = args.dtype
    if "@" in name:
        name, dtype = name.split("@", 1)
    kwargs = {"device": args.device, "dtype": dtype, "attention": args.attention}
    if name == "st-viomni":
        system = load_st_viomni(model_dir, batch_size=args.batch_size, **kwargs)
    elif name == "stock-st":
        system = load_stock_st(model_dir, batch_size=args.batch_size, **kwargs)
    elif name == "hf-loop":
        system = HFLoopSystem(model_dir, **kwargs)
    else:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(ALL_SYSTEMS)}")
    if dtype != args.dtype:
        system.name = f"{name}@{dtype}"
    return system


# ----------------------------------------------------------------------------------------------------------------
# The run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.encode",
        description="Encode throughput, padding, memory and FLOP/s: st-viomni vs stock sentence-transformers vs a "
        "hand-written transformers loop, same weights and inputs, alternating in one run.",
    )
    parser.add_argument("--preset", choices=("tiny", "proxy-2b", "full-2b"), default=None,
                        help="model preset (default: proxy-2b on CPU, full-2b on CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default=None,
                        help="dtype of every system (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--compare-dtype", default=None, metavar="DTYPE",
                        help="also time st-viomni in this dtype (e.g. bfloat16 on CPU, float32 on CUDA) and report "
                        "its speed ratio and minimum cosine to the main dtype's embeddings")
    parser.add_argument("--attention", default=None, help="attention implementation (default: flash_attention_2 on "
                        "CUDA when installed, else sdpa)")
    parser.add_argument("--items", type=int, default=48, help="corpus size (default 48)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of both batched systems (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the corpus per system (default 3)")
    parser.add_argument("--warmup-items", type=int, default=6, help="items each system encodes untimed first")
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma-separated subset of systems")
    parser.add_argument("--max-visual-tokens", type=int, default=None,
                        help="visual tokens per image at most (default: the preset's: tiny 64, proxy-2b 256, "
                        "full-2b 1280)")
    parser.add_argument("--embedding-dim", type=int, default=None, help="Dense output width (default 1024; tiny 32)")
    parser.add_argument("--memory", choices=("subprocess", "inprocess", "off"), default="subprocess",
                        help="peak memory: one fresh process per system (default, clean), in this process around "
                        "each system's first timed pass (fast, approximate), or not at all")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="matmul reference size (default 2048 CPU, 8192 CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="result file stem (default encode-<preset>-<device>-<dtype>)")
    parser.add_argument("--results-dir", type=Path, default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument("--cache-dir", type=Path, default=common.DEFAULT_CACHE_DIR)
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: memory of one system
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("full-2b" if cuda else "proxy-2b")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.attention = args.attention or common.best_attention(args.device)
    args.embedding_dim = args.embedding_dim or (32 if args.preset == "tiny" else 1024)
    args.matmul_size = args.matmul_size or (8192 if cuda else 2048)
    args.systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    for name in args.systems:
        if name not in ALL_SYSTEMS:
            parser.error(f"unknown system {name!r}; known: {', '.join(ALL_SYSTEMS)}")
    if args.compare_dtype == args.dtype:
        args.compare_dtype = None
    return args


def _probe_argv(args: argparse.Namespace, system: str) -> list[str]:
    argv = [
        "--preset", args.preset, "--device", args.device, "--dtype", args.dtype, "--attention", args.attention,
        "--items", str(args.items), "--batch-size", str(args.batch_size), "--warmup-items", str(args.warmup_items),
        "--embedding-dim", str(args.embedding_dim), "--seed", str(args.seed), "--cache-dir", str(args.cache_dir),
        "--probe", system,
    ]  # fmt: skip
    if args.max_visual_tokens is not None:
        argv += ["--max-visual-tokens", str(args.max_visual_tokens)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def _probe(args: argparse.Namespace, model_dir: Path, items: list[Item]) -> None:
    """Memory of one system in this fresh process: load, warm up, then peak growth over one pass."""
    system = load_system(args.probe, model_dir, args)
    system.encode(items[: args.warmup_items])
    with common.PeakMemory(args.device) as memory:
        system.encode(items)
    print("PROBE " + json.dumps(memory.as_dict()), flush=True)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the encode benchmark; return the result (also written to JSON, PNG and Markdown)."""
    import torch

    args = parse_args(argv)
    model_dir = common.prepare_viomni(
        args.preset,
        seed=args.seed,
        embedding_dim=args.embedding_dim,
        max_visual_tokens=args.max_visual_tokens,
        cache_dir=args.cache_dir,
    )
    items = build_corpus(args.items, args.seed, args.cache_dir / "corpus")
    if args.probe:
        _probe(args, model_dir, items)
        return {}

    machine = common.machine_info(args.device)
    common.log(f"matmul reference ({args.matmul_size}^2)")
    matmul = common.MatmulReference(
        args.matmul_size, ["float32", args.dtype] + ([args.compare_dtype] if args.compare_dtype else []), args.device
    )
    matmul.measure()

    names = list(args.systems) + ([f"st-viomni@{args.compare_dtype}"] if args.compare_dtype else [])
    systems: dict[str, System] = {}
    for name in names:
        common.log(f"loading {name}")
        systems[name] = load_system(name, model_dir, args)
    config = next(iter(systems.values())).hf_model.config
    image_token_id = config.image_token_id
    counters = {name: common.TokenCounter(system.forward_module, image_token_id) for name, system in systems.items()}

    for name, system in systems.items():
        common.log(f"warm-up {name}")
        system.encode(items[: args.warmup_items])

    seconds: dict[str, list[float]] = {name: [] for name in systems}
    faults: dict[str, list[int]] = {name: [] for name in systems}
    embeddings: dict[str, Any] = {}
    counts: dict[str, dict[str, Any]] = {}
    memory: dict[str, dict[str, Any]] = {}
    order = list(systems)
    for repeat in range(args.repeats):
        # Alternate the systems, rotating the order each repeat so that none always runs first.
        shift = repeat % len(order)
        for name in order[shift:] + order[:shift]:
            gc.collect()
            counters[name].reset()
            faults_before = common.minor_page_faults()
            if args.memory == "inprocess" and repeat == 0:
                with common.PeakMemory(args.device) as peak:
                    result, elapsed = common.timed(lambda: systems[name].encode(items), args.device)
                memory[name] = {**peak.as_dict(), "mode": "inprocess"}
            else:
                result, elapsed = common.timed(lambda: systems[name].encode(items), args.device)
            seconds[name].append(elapsed)
            if faults_before is not None:
                faults[name].append(common.minor_page_faults() - faults_before)
            embeddings[name] = result
            summary = counters[name].summary(config, args.embedding_dim)
            if name in counts and counts[name]["tokens"] != summary["tokens"]:
                raise RuntimeError(f"{name} computed different tokens in repeat {repeat}")
            counts[name] = summary
            common.log(
                f"repeat {repeat + 1}/{args.repeats} {name}: {elapsed:.2f} s, {len(items) / elapsed:.3g} items/s"
            )
        matmul.measure()  # the reference follows the machine's load through the run
    for counter in counters.values():
        counter.handle.remove()

    if args.memory == "subprocess":
        del systems
        gc.collect()
        for name in names:
            common.log(f"memory probe {name} (fresh process)")
            memory[name] = {**common.run_probe("benchmarks.encode", _probe_argv(args, name)), "mode": "subprocess"}

    reference_name = "st-viomni" if "st-viomni" in embeddings else names[0]
    reference = embeddings[reference_name]
    tolerance = 1e-4 if args.dtype == "float32" else 3e-2
    results: dict[str, Any] = {}
    for name in names:
        count = counts[name]
        times = seconds[name]
        diff = (embeddings[name] - reference).abs().max().item()
        cosine = torch.nn.functional.cosine_similarity(embeddings[name], reference, dim=-1).min().item()
        useful = count["useful_flops"]["total"]
        rates = [useful / t for t in times]
        run_dtype = name.split("@", 1)[1] if "@" in name else args.dtype
        results[name] = {
            "description": SYSTEM_DESCRIPTIONS[name.split("@")[0]],
            "dtype": run_dtype,
            "batch_size": 1 if name.startswith("hf-loop") else args.batch_size,
            "seconds": common.summarize(times),
            "items_per_s": common.summarize([len(items) / t for t in times]),
            "text_tokens_per_s": common.summarize([count["tokens"]["text"] / t for t in times]),
            "visual_tokens_per_s": common.summarize([count["tokens"]["visual"] / t for t in times]),
            **count,
            "achieved_flops_per_s": common.summarize(rates),
            "fraction_of_fp32_matmul": round(statistics.median(rates) / matmul.median("float32"), 4),
            "fraction_of_same_dtype_matmul": round(statistics.median(rates) / matmul.median(run_dtype), 4),
            "peak_memory": memory.get(name),
            "minor_page_faults_per_pass": int(statistics.median(faults[name])) if faults[name] else None,
            f"vs_{reference_name}": {"max_abs_diff": float(f"{diff:.3g}"), "min_cosine": round(cosine, 6)},
        }

    def paired_ratio(a: str, b: str) -> dict[str, Any] | None:
        if a not in seconds or b not in seconds:
            return None
        # Same repeat, adjacent in time: the ratio of items/s is the inverse ratio of seconds.
        return common.summarize([tb / ta for ta, tb in zip(seconds[a], seconds[b])])

    batched_agree = [
        results[name][f"vs_{reference_name}"]["max_abs_diff"] for name in args.systems if name != reference_name
    ]
    ratios = {
        "st_viomni_vs_stock_st_items_per_s": paired_ratio("st-viomni", "stock-st"),
        "st_viomni_vs_hf_loop_items_per_s": paired_ratio("st-viomni", "hf-loop"),
        "stock_st_vs_hf_loop_items_per_s": paired_ratio("stock-st", "hf-loop"),
    }
    if args.compare_dtype:
        other = f"st-viomni@{args.compare_dtype}"
        ratios[f"{args.compare_dtype}_vs_{args.dtype}_items_per_s"] = paired_ratio(other, "st-viomni")
        ratios[f"{args.compare_dtype}_min_cosine_to_{args.dtype}"] = results[other]["vs_st-viomni"]["min_cosine"]
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "encode",
        "command": "python -m benchmarks.encode" + ("" if not argv else " " + shlex.join(argv)),
        "config": {
            "preset": args.preset,
            "device": args.device,
            "dtype": args.dtype,
            "compare_dtype": args.compare_dtype,
            "attention": args.attention,
            "items": args.items,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "warmup_items": args.warmup_items,
            "max_visual_tokens": args.max_visual_tokens or _preset_visual_tokens(args.preset),
            "embedding_dim": args.embedding_dim,
            "memory": args.memory,
            "threads": args.threads,
            "seed": args.seed,
            "parameters": common.count_parameters(model_dir),
        },
        "machine": machine,
        "corpus": describe_corpus(items),
        "matmul": matmul.summary(),
        "systems": results,
        "ratios": ratios,
        "agreement": {
            "reference": reference_name,
            "tolerance": tolerance,
            "max_abs_diff": max(batched_agree, default=0.0),
            "ok": all(diff <= tolerance for diff in batched_agree),
        },
    }
    name = args.name or f"encode-{args.preset}-{args.device.split(':')[0]}-{args.dtype}"
    paths = common.output_paths(args.results_dir, name)
    result["files"] = {kind: common.display_path(path) for kind, path in paths.items()}
    table = markdown_table(result)
    common.write_json(paths["json"], result)
    paths["md"].write_text(table, encoding="utf-8")
    if not args.no_plot:
        plot(result, paths["png"])
    print(table)
    if not result["agreement"]["ok"]:
        common.log(f"WARNING: embeddings disagree beyond {tolerance}: {result['agreement']}")
    return result


def _preset_visual_tokens(preset: str) -> int:
    from st_viomni.testing import PRESETS

    return PRESETS[preset]["max_pixels"] // common.PIXELS_PER_VISUAL_TOKEN


# ----------------------------------------------------------------------------------------------------------------
# Output


def markdown_table(result: dict[str, Any]) -> str:
    config, machine = result["config"], result["machine"]
    where = common.describe_machine(machine)
    lines = [
        f"Encode, `{config['preset']}` ({config['parameters'] / 1e6:.3g} M parameters), "
        f"{config['device']} {config['dtype']}, "
        f"{result['corpus']['items']} mixed items ({result['corpus']['images']} images, at most "
        f"{config['max_visual_tokens']} visual tokens each), batch size {config['batch_size']}, median of "
        f"{config['repeats']} alternating repeats (min-max). {where}; {machine['date_utc'][:10]}; load average "
        f"{machine['load_average_start'][0]} at start, {machine['load_average_end'][0]} at end. "
        f"Command: `{result['command']}`.",
        "",
        "| system | items/s | visual tok/s | text tok/s | padding | peak memory growth | page faults/pass "
        "| useful FLOP/s (of fp32 matmul) | max abs diff vs st-viomni |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, system in result["systems"].items():
        memory = system["peak_memory"]
        memory_text = f"{memory['peak_growth_mib']:.0f} MiB" if memory else "not measured"
        items = system["items_per_s"]
        flops = system["achieved_flops_per_s"]["median"]
        agreement = next(value for key, value in system.items() if key.startswith("vs_"))
        lines.append(
            f"| {name} | {items['median']:.3g} ({items['min']:.3g}-{items['max']:.3g}) "
            f"| {system['visual_tokens_per_s']['median']:.4g} | {system['text_tokens_per_s']['median']:.4g} "
            f"| {system['padding_fraction']:.1%} | {memory_text} "
            f"| {_count(system.get('minor_page_faults_per_pass'))} "
            f"| {common.fmt_si(flops, 'FLOP/s')} ({system['fraction_of_fp32_matmul']:.1%}) "
            f"| {agreement['max_abs_diff']:.2g} |"
        )
    lines += ["", common.describe_matmul(result["matmul"])]
    ratios = {key: value for key, value in result["ratios"].items() if value is not None}
    if ratios:
        parts = []
        for key, value in ratios.items():
            parts.append(f"{key} {value['median']:.3g} ({value['min']:.3g}-{value['max']:.3g})"
                         if isinstance(value, dict)
                         else f"{key} {value}")
        lines.append("Paired ratios (same repeat): " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def _count(value: int | None) -> str:
    return "not measured" if value is None else f"{value:,}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["systems"])
    systems = [result["systems"][name] for name in names]
    colours = ["#2a7ab9", "#9a9a9a", "#d98b2b", "#5aa25a"][: len(names)]
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.8))

    def bars(axis, values, title, low=None, high=None, fmt="{:.3g}"):
        positions = range(len(names))
        errors = None
        if low is not None:
            errors = [[v - lo for v, lo in zip(values, low)], [hi - v for v, hi in zip(values, high)]]
        axis.bar(positions, values, color=colours, yerr=errors, capsize=4)
        axis.set_xticks(list(positions), names, rotation=20, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        for x, value in zip(positions, values):
            axis.annotate(fmt.format(value), (x, value), ha="center", va="bottom", fontsize=8)

    items = [s["items_per_s"] for s in systems]
    bars(axes[0], [i["median"] for i in items], "items/s (median, min-max)",
         [i["min"] for i in items], [i["max"] for i in items])
    bars(axes[1], [100 * s["padding_fraction"] for s in systems], "padding, % of computed tokens", fmt="{:.1f}%")
    memory = [(s["peak_memory"] or {}).get("peak_growth_mib", 0) for s in systems]
    measured = any(s["peak_memory"] for s in systems)
    bars(axes[2], memory, "peak memory growth (MiB)" if measured else "peak memory: not measured", fmt="{:.0f}")
    fractions = [100 * s["fraction_of_fp32_matmul"] for s in systems]
    bars(axes[3], fractions, "useful FLOP/s, % of fp32 matmul", fmt="{:.1f}%")
    config = result["config"]
    figure.suptitle(
        f"encode: {config['preset']} {config['device']} {config['dtype']}, {config['items']} items, batch "
        f"{config['batch_size']}, {result['machine']['date_utc'][:10]}",
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
