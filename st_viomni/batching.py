"""Cost-aware batching for :meth:`ViOmniQwen.encode <st_viomni.model.ViOmniQwen.encode>`.

Stock sentence-transformers sorts inputs by a rough size (characters of text, pixels of a PIL image, the
*string length* of an image path) and cuts fixed batches of ``batch_size``: on mixed text and image inputs the
language model then computes many padding tokens (47.7% of its tokens on the encode benchmark's corpus).
This module plans batches by what the language model really computes, before any image is decoded:

1. :func:`estimate_costs`: the exact sequence length of every input: its chat-template rendering (task
   prompt, template tokens, text) tokenized, plus the visual tokens of each image, computed from the image's
   size (read from the file header for paths, no pixel decoding; EXIF orientation applied) and the processor's
   pixel budget with Qwen2-VL's ``smart_resize`` (one token per ``(patch * merge)**2`` pixels, i.e. 28x28,
   clamped to ``min_pixels``/``max_pixels``), capped at ``max_seq_length``.
2. :func:`plan_batches`: sort by that length (longest first) and cut into batches of at most ``batch_size``
   inputs whose padding, ``(n * longest - sum) / (n * longest)``, stays within ``max_padding`` (5% by
   default) and whose padded token count ``n * longest`` stays within ``max_batch_tokens``. On CPU, batches
   are also kept small enough that their MLP activations stay within :data:`CPU_ACTIVATION_BYTES` (in tokens
   and in image patches, :func:`cpu_batch_bounds`), where the allocator reuses memory instead of
   page-faulting it in afresh.
3. :func:`encode_planned`: encode each planned batch with stock ``SentenceTransformer.encode`` (so every
   embedding is the one stock sentence-transformers computes for that input) while a background thread
   decodes the next batch's images, then put the embeddings back in input order.

Estimates only steer the grouping: a wrong estimate costs padding, never correctness. Inputs the estimator
does not know (audio, video, URLs, text pairs, ...) make ``encode`` fall back to the stock path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .formatting import image_size
from .inputs import caller_indices, check_inputs, is_conversation, is_image_path, is_image_url

DEFAULT_MAX_PADDING = 0.05
"""Largest fraction of padding tokens allowed in one planned batch."""

CPU_ACTIVATION_BYTES = 16 * 2**20
"""On CPU, a planned batch keeps its largest activations (the MLP hidden layers of the language model and of
the vision tower) within this many bytes, so that glibc's malloc reuses their memory instead of page-faulting
it in afresh in every layer. glibc serves a block above its ``mmap`` threshold (which adapts up to 32 MiB, no
further) with fresh pages, and returns the free memory at the top of its heap to the system once it exceeds
the trim threshold (twice the ``mmap`` threshold, so at most 64 MiB). An MLP allocates four blocks of its
hidden width (``gate``, ``act(gate)``, ``up`` and their product; three alive at once) and has freed them all
by its end, so blocks of 16 MiB keep both limits; with 32 MiB the blocks freed after each MLP were trimmed and
faulted in again (about 500,000 faults per bf16 pass over the encode benchmark's corpus, 6% of its time;
unbounded batches of 8 large images: 860,000 faults and 13% longer; ``benchmarks/NOTES.md``)."""

PREFETCH = True
"""Decode the next batch's images in a background thread while the current batch is encoded (False: decode
each batch in the calling thread, just before encoding it)."""

# Stands in for every image when rendering the chat template (the template only needs to know an image is
# there; its pixels are never read).
_PLACEHOLDER = Image.new("RGB", (1, 1))


class Unsupported(Exception):
    """An input (or model) the planner cannot cost: ``encode`` uses the stock path instead."""


@dataclass(frozen=True)
class ItemCost:
    """What the language model computes for one input."""

    tokens: int
    """Sequence length: chat-template and text tokens plus visual tokens, capped at ``max_seq_length``."""
    visual_tokens: int
    """``<|image_pad|>`` tokens (after the 2x2 merge) over all of the input's images."""
    image_patches: int
    """14x14 patches the vision tower computes over all of the input's images."""


# ----------------------------------------------------------------------------------------------------------------
# Visual tokens (image sizes: st_viomni.formatting.image_size, header only, the same checks as load_image)


@dataclass(frozen=True)
class PixelBudget:
    """The image processor's resize rule: Qwen2-VL's ``smart_resize`` to multiples of ``patch * merge``
    pixels, area clamped to ``[min_pixels, max_pixels]``."""

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def of(cls, image_processor: Any) -> PixelBudget:
        """The budget of a Qwen2-VL image processor (raises :class:`Unsupported` for anything else)."""
        size = getattr(image_processor, "size", None)
        get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
        values = (
            getattr(image_processor, "patch_size", None),
            getattr(image_processor, "merge_size", None),
            get("shortest_edge"),
            get("longest_edge"),
        )
        if None in values or not getattr(image_processor, "do_resize", True):
            raise Unsupported(f"no Qwen2-VL pixel budget on {type(image_processor).__name__}")
        return cls(*(int(value) for value in values))

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """Patch grid ``(rows, columns)`` of an image of this size after resizing."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        resized_height, resized_width = smart_resize(
            height,
            width,
            factor=self.patch_size * self.merge_size,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )
        return resized_height // self.patch_size, resized_width // self.patch_size

    def visual_tokens(self, width: int, height: int) -> int:
        """Visual tokens the language model receives for an image of this size (one per merged patch group)."""
        rows, columns = self.grid(width, height)
        return rows * columns // self.merge_size**2


# ----------------------------------------------------------------------------------------------------------------
# Costs


def estimate_costs(model: Any, inputs: Sequence[Any], prompt: str | None = None) -> list[ItemCost]:
    """The exact language-model sequence length of every input, from text and image sizes (no pixel decoding).

    Renders every input through the model's own input formatter and chat template with each image replaced by
    a 1x1 stand-in, tokenizes the renderings in one call, and replaces each ``<|image_pad|>`` by the image's
    visual tokens (see :class:`PixelBudget`).

    Args:
        model: A :class:`~st_viomni.model.ViOmniQwen` (or a ``SentenceTransformer`` on Qwen2-VL).
        inputs: The caller's inputs (strings, image paths, PIL images, ``{"text", "image"}`` dicts, chat
            conversations).
        prompt: The resolved prompt (``prompt_name`` looked up), as ``encode`` renders it.

    Raises:
        ValueError, FileNotFoundError: An input that :func:`~st_viomni.inputs.check_inputs` rejects, naming its
            index.
        Unsupported: Inputs or a model this estimator does not handle.
    """
    transformer = model[0]
    processor = getattr(transformer, "processor", None)
    formatter = getattr(transformer, "input_formatter", None)
    modality_config = getattr(transformer, "modality_config", None) or {}
    if processor is None or formatter is None or "message" not in modality_config:
        raise Unsupported("the model does not render its inputs through a chat template")
    budget = PixelBudget.of(getattr(processor, "image_processor", None))
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is None:
        raise Unsupported("the processor has no image token")

    stand_ins, sizes = [], []
    for index, value in enumerate(inputs):
        stand_in, item_sizes = _stand_in(value, index)
        stand_ins.append(stand_in)
        sizes.append(item_sizes)
    conversations = sum(1 for value in inputs if is_conversation(value))
    if 0 < conversations < len(inputs):
        # sentence-transformers renders a conversation differently in a batch with other kinds of input.
        raise Unsupported("conversations mixed with other inputs")

    modality, processor_inputs, _ = formatter.parse_inputs(stand_ins)
    if modality != "message":
        modality, processor_inputs = formatter.batch_to_message(modality, processor_inputs)
    messages = processor_inputs["message"]
    if prompt:
        messages = formatter.prepend_prompt_to_messages(messages, prompt)
    texts = processor.apply_chat_template(messages, tokenize=False)
    ids = processor.tokenizer(list(texts))["input_ids"]
    limit = transformer.max_seq_length

    costs = []
    for row, item_sizes in zip(ids, sizes):
        placeholders = sum(1 for token in row if token == image_token_id)
        if placeholders != len(item_sizes):
            raise Unsupported("the chat template does not render one image placeholder per image")
        visual = [budget.visual_tokens(width, height) for width, height in item_sizes]
        tokens = len(row) - placeholders + sum(visual)
        patches = sum(count * budget.merge_size**2 for count in visual)
        costs.append(ItemCost(min(tokens, limit) if limit else tokens, sum(visual), patches))
    return costs


def _task_renders_the_same(transformer: Any) -> bool:
    """Whether ``task="query"``/``"document"`` (``encode_query``, ``encode_document``) leaves this model's
    preprocessing unchanged: no per-task length, no query expansion, a chat template that ignores the task."""
    declares_task = getattr(transformer, "_chat_template_declares_task", None)
    return (
        getattr(transformer, "query_length", 0) is None
        and getattr(transformer, "document_length", 0) is None
        and getattr(transformer, "query_expansion", 0) is None
        and declares_task is not None
        and not declares_task()
    )


def _stand_in(value: Any, index: int) -> tuple[Any, list[tuple[int, int]]]:
    """``value`` with every image replaced by a 1x1 stand-in, and the images' sizes. An input the estimator
    cannot read is handed to ``check_inputs``, which raises the error naming the input (or, should it accept
    the input, the estimator gives up: :class:`Unsupported`)."""
    try:
        return _stand_in_or_raise(value)
    except Unsupported:
        raise
    except Exception:
        check_inputs([value], offset=index, decode=False)  # raises the error naming the caller's index
        raise Unsupported(f"input {index}: not costed") from None


def _stand_in_or_raise(value: Any) -> tuple[Any, list[tuple[int, int]]]:
    if isinstance(value, str):
        if is_image_url(value):
            raise Unsupported("image URL or data URI")
        if is_image_path(value):
            if not os.path.isfile(value):
                raise FileNotFoundError(value)
            return _PLACEHOLDER, [image_size(value)]
        return value, []
    if isinstance(value, Image.Image):
        return _PLACEHOLDER, [image_size(value)]
    if isinstance(value, dict) and "role" not in value:
        if set(value) - {"text", "image"}:
            raise ValueError(f"dict keys {sorted(value)}")  # check_inputs names unknown keys; audio, video: stock
        text, images = value.get("text"), value.get("image")
        if text is not None and not isinstance(text, str):
            raise ValueError("text is not a string")
        if text is None and images is None:
            raise ValueError("neither text nor image")
        stand_in: dict[str, Any] = {}
        sizes: list[tuple[int, int]] = []
        for key in value:  # the caller's key order, as the formatter sees it
            if key == "text" and text is not None:
                stand_in["text"] = text
            elif key == "image" and images is not None:
                many = isinstance(images, (list, tuple))
                sizes = [image_size(image) for image in (images if many else [images])]
                stand_in["image"] = [_PLACEHOLDER] * len(sizes) if many else _PLACEHOLDER
        return stand_in, sizes
    if is_conversation(value):
        conversation, sizes = [], []
        for message in value:
            content = message.get("content")
            if content is None:
                raise ValueError("message without content")
            if isinstance(content, list):
                items = []
                for item in content:
                    if isinstance(item, dict) and item.get("type") == "image" and "image" in item:
                        sizes.append(image_size(item["image"]))
                        item = {**item, "image": _PLACEHOLDER}
                    elif isinstance(item, dict) and item.get("type") not in (None, "text"):
                        raise Unsupported(f"content of type {item.get('type')!r}")
                    items.append(item)
                message = {**message, "content": items}
            conversation.append(message)
        return conversation, sizes
    raise Unsupported(f"input of type {type(value).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Plan


def plan_batches(
    lengths: Sequence[int],
    max_items: int,
    max_padding: float | None = DEFAULT_MAX_PADDING,
    max_tokens: int | None = None,
    patches: Sequence[int] | None = None,
    max_patches: int | None = None,
) -> list[list[int]]:
    """Group inputs into batches by sequence length.

    Inputs are taken longest first (ties in input order); a batch grows until one more input would exceed
    ``max_items`` inputs, a padding fraction ``(n * longest - sum) / (n * longest)`` above ``max_padding``,
    ``n * longest > max_tokens`` padded tokens, or more than ``max_patches`` image patches. (Each input is no
    longer than those already in the batch, so growing only ever adds padding: the first refusal closes the
    batch.) A single input always forms a batch, whatever its size.

    Args:
        lengths: Sequence length of every input.
        max_items: Most inputs per batch (``encode``'s ``batch_size``).
        max_padding: Largest padding fraction of a batch, in ``[0, 1)``; None for no bound.
        max_tokens: Largest padded size ``n * longest`` of a batch in tokens; None for no bound.
        patches: Image patches of every input (what the vision tower computes); needed with ``max_patches``.
        max_patches: Most image patches per batch; None for no bound.

    Returns:
        Batches of indices into ``lengths``, longest batch first; every index appears exactly once.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be positive, got {max_items}")
    if max_padding is not None and not 0 <= max_padding < 1:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding}")
    if max_patches is not None and (patches is None or len(patches) != len(lengths)):
        raise ValueError("max_patches needs the patches of every input")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = total = total_patches = 0
    for index in order:
        length = lengths[index]
        item_patches = patches[index] if patches is not None else 0
        if batch:
            rows = len(batch) + 1
            padded = rows * longest
            if (
                rows > max_items
                or (max_padding is not None and padded - (total + length) > max_padding * padded)
                or (max_tokens is not None and padded > max_tokens)
                or (max_patches is not None and total_patches + item_patches > max_patches)
            ):
                batches.append(batch)
                batch = []
        if not batch:
            longest, total, total_patches = length, 0, 0
        batch.append(index)
        total += length
        total_patches += item_patches
    if batch:
        batches.append(batch)
    return batches


def cpu_batch_bounds(model: Any) -> tuple[int | None, int | None]:
    """``(max_tokens, max_patches)`` per batch that keep a CPU forward's MLP activations within
    :data:`CPU_ACTIVATION_BYTES`: padded tokens times the language model's ``intermediate_size``, and image
    patches times the vision tower's MLP width, each in its tower's dtype. None where the config does not say."""
    qwen2_vl = model[0].model
    config = getattr(qwen2_vl, "config", None)
    text_config = getattr(config, "text_config", None)
    vision_config = getattr(config, "vision_config", None)
    intermediate = getattr(text_config, "intermediate_size", None)
    embed_dim, mlp_ratio = getattr(vision_config, "embed_dim", None), getattr(vision_config, "mlp_ratio", None)
    max_tokens = max_patches = None
    if intermediate:
        max_tokens = CPU_ACTIVATION_BYTES // (intermediate * _itemsize(qwen2_vl, "language_model"))
    if embed_dim and mlp_ratio:
        max_patches = CPU_ACTIVATION_BYTES // (int(embed_dim * mlp_ratio) * _itemsize(qwen2_vl, "visual"))
    return max_tokens, max_patches


def _itemsize(qwen2_vl: Any, tower: str) -> int:
    # A tower may be kept in another dtype than the rest (e.g. the vision tower in float32 under a bf16 model).
    module = getattr(qwen2_vl, tower, qwen2_vl)
    return next(module.parameters()).element_size()


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Padding tokens over computed tokens when every batch is padded to its longest input."""
    computed = sum(len(batch) * max(lengths[index] for index in batch) for batch in batches if batch)
    useful = sum(lengths[index] for batch in batches for index in batch)
    return (computed - useful) / computed if computed else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Encode


def encode_planned(
    model: Any,
    encode_batch: Callable[..., Any],
    inputs: list[Any],
    options: dict[str, Any],
    *,
    max_padding: float = DEFAULT_MAX_PADDING,
    max_batch_tokens: int | None = None,
) -> Any:
    """Encode ``inputs`` in planned batches; the result is what stock ``encode`` returns for the same options.

    Args:
        model: The :class:`~st_viomni.model.ViOmniQwen`.
        encode_batch: Stock ``SentenceTransformer.encode`` bound to ``model``; each planned batch is one call.
        inputs: The caller's inputs (a list of several inputs, unchecked).
        options: Every other argument of ``encode`` by name (``prompt_name``, ``batch_size``, ...), defaults
            filled in, extra keyword arguments under ``"kwargs"``.
        max_padding: Padding bound of a batch (see :func:`plan_batches`).
        max_batch_tokens: Token bound of a batch (see :func:`plan_batches`); None: on CPU, the bound of
            :func:`cpu_batch_bounds` (which also bounds image patches), on an accelerator no bound.

    Raises:
        Unsupported: Options or inputs the planner does not handle (before anything is computed); the caller
            then runs the stock path.
    """
    import numpy as np
    import torch
    from sentence_transformers.sentence_transformer.model import ALLOWED_PRECISIONS
    from sentence_transformers.util.quantization import quantize_embeddings
    from tqdm.auto import tqdm

    precision = options["precision"]
    if precision is not None and precision not in ALLOWED_PRECISIONS:  # stock's check, before anything is encoded
        raise ValueError(f"Precision {precision!r} is not supported, must be one of {ALLOWED_PRECISIONS}")
    extra = dict(options.get("kwargs") or {})
    if extra.keys() - {"task"} or (extra.get("task") is not None and not _task_renders_the_same(model[0])):
        raise Unsupported("keyword arguments that change preprocessing")
    if (
        options["output_value"] != "sentence_embedding"
        or options["pool"] is not None
        or isinstance(options["device"], list)
        or (getattr(model, "_distributed_inference", None) is not None and options["device"] is None)
        or options["batch_size"] <= 0
    ):
        raise Unsupported("options outside the planned path")
    prompt = model._resolve_prompt(options["prompt"], options["prompt_name"])
    costs = estimate_costs(model, inputs, prompt)
    max_patches = None
    if torch.device(options["device"] or model.device).type == "cpu":
        cpu_tokens, max_patches = cpu_batch_bounds(model)
        max_batch_tokens = max_batch_tokens or cpu_tokens
    batches = plan_batches(
        [cost.tokens for cost in costs],
        options["batch_size"],
        max_padding=max_padding,
        max_tokens=max_batch_tokens,
        patches=[cost.image_patches for cost in costs],
        max_patches=max_patches,
    )

    show_progress_bar = options["show_progress_bar"]
    if show_progress_bar is None:
        level = logging.getLogger("sentence_transformers.sentence_transformer.model").getEffectiveLevel()
        show_progress_bar = level in (logging.INFO, logging.DEBUG)
    convert_to_tensor = options["convert_to_tensor"]
    convert_to_numpy = options["convert_to_numpy"] and not convert_to_tensor
    batch_options = {
        "prompt": prompt,
        "show_progress_bar": False,
        "convert_to_numpy": False,
        "convert_to_tensor": True,
        "device": options["device"],
        "normalize_embeddings": options["normalize_embeddings"],
        "truncate_dim": options["truncate_dim"],
        **extra,
    }

    def prepare(batch: list[int]) -> list[Any]:
        # Decode (and check) each input, naming the caller's index on error; runs one batch ahead.
        return [check_inputs([inputs[index]], offset=index)[0] for index in batch]

    output = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="viomni-decode") as pool:
        pending = pool.submit(prepare, batches[0]) if PREFETCH else None
        for position, batch in enumerate(tqdm(batches, desc="Batches", disable=not show_progress_bar)):
            if pending is None:
                prepared = prepare(batch)
            else:
                prepared = pending.result()
                if position + 1 < len(batches):
                    pending = pool.submit(prepare, batches[position + 1])
            with caller_indices(prepared, batch):  # errors raised in preprocess name the caller's index
                embeddings = encode_batch(prepared, batch_size=len(batch), **batch_options)
            if convert_to_numpy:
                embeddings = embeddings.cpu()
            if output is None:
                output = embeddings.new_empty((len(inputs), *embeddings.shape[1:]))
            output[torch.as_tensor(batch, device=output.device)] = embeddings

    # What stock encode does after its inference loop.
    result: Any = output
    if precision and precision != "float32":
        result = quantize_embeddings(result, precision=precision)
    if convert_to_tensor:
        return torch.as_tensor(result)
    if convert_to_numpy:
        if isinstance(result, torch.Tensor):
            result = (result.float() if result.dtype == torch.bfloat16 else result).numpy()
        return result
    return list(torch.from_numpy(result) if isinstance(result, np.ndarray) else result)
