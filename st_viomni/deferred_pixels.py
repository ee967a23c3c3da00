"""Collate a batch's tokens now and its pixels one mini-batch at a time.

sentence-transformers' data collator runs ``model.preprocess`` on the whole batch, so the Qwen2-VL
``pixel_values`` of every image of the batch (about 24 bytes per pixel after resizing: float32, and each
14x14 patch repeated over Qwen2-VL's two temporal frames) live for the whole step, whatever the cached loss's
mini-batch size (sentence-transformers issue #3991). With a batch of thousands of images that, not the
activations, is what runs out of memory.

:class:`DeferredPixelCollator` renders and tokenizes the whole batch as usual (token ids, attention mask,
image grids: everything the mini-batching needs, ``mini_batch_num_tokens`` included) but computes each
image's grid from its size alone, and hands the images on instead of ``pixel_values``: RGB images resized
once, here, as the image processor would (:func:`resized`: uint8, 3 bytes per pixel at the model's
resolution, usually less than the decoded photo; an image already at that size is handed on itself, not
copied), other images as they are.
:class:`~st_viomni.losses.CachedPrefixRoutedLoss` then turns the images of one mini-batch into
``pixel_values`` right before embedding it (:func:`with_pixels`), so the float32 pixels of a step are those of
one mini-batch; :class:`~st_viomni.losses.PrefixRoutedLoss` turns the whole batch's at once. Pixels are
computed by the same image processor with the same arguments, bitwise those of the stock collator's features
(``with_pixels`` checks the grids agree).

The price: rescaling, normalising and patchifying run twice per image and step (GradCache's two passes)
instead of once; the resize, most of the image processor's time on photos, runs once.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from sentence_transformers.base.losses.gradcache import _create_minibatch
from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
from torchvision.transforms.v2.functional import pil_to_tensor
from transformers.image_utils import make_flat_list_of_images

from .batching import PixelBudget

IMAGES = "images"
"""Feature key of the decoded images of a collated column, flat, in the order of ``image_grid_thw``."""
IMAGE_KWARGS = "image_kwargs"
"""Feature key of the keyword arguments the processor would have passed to its image processor."""


@dataclass
class DeferredPixelCollator(SentenceTransformerDataCollator):
    """sentence-transformers' data collator, minus the pixels (see the module docstring).

    Takes the same arguments as ``SentenceTransformerDataCollator``; ``preprocess_fn`` must be the ``preprocess``
    of a model whose first module holds a Qwen2-VL processor (what :func:`st_viomni.build_model` returns).
    Every input column gets ``<column>_images`` (a list) and ``<column>_image_kwargs`` instead of
    ``<column>_pixel_values``; only st-viomni's losses know what to do with them. A ``ValueError`` raised while
    preprocessing a column (a bad input, an image Qwen2-VL's image processor cannot resize) names the column.

    Example:
        ::

            from sentence_transformers import SentenceTransformerTrainer

            from st_viomni import DeferredPixelCollator
            from st_viomni.losses import CachedPrefixRoutedLoss

            loss = CachedPrefixRoutedLoss(model, mini_batch_size=8)
            collator = DeferredPixelCollator(model.preprocess)
            trainer = SentenceTransformerTrainer(
                model=model, train_dataset=train_dataset, loss=loss, data_collator=collator
            )
    """

    def __post_init__(self) -> None:
        model = getattr(self.preprocess_fn, "__self__", None)
        processor = getattr(model[0], "processor", None) if model is not None else None
        if getattr(processor, "image_processor", None) is None:
            raise ValueError("DeferredPixelCollator needs preprocess_fn=model.preprocess of a Qwen2-VL model")
        preprocess = self.preprocess_fn
        self._column: str | None = None

        def preprocess_without_pixels(inputs, prompt=None, **kwargs) -> dict[str, Any]:
            images: list[Any] = []
            image_kwargs: dict[str, Any] = {}
            try:
                with _grids_from_sizes(processor, images, image_kwargs):
                    features = preprocess(inputs, prompt=prompt, **kwargs)
            except ValueError as error:
                # The message names the row ("input <row>", or the row and image of an image that cannot be
                # resized); in a data loader worker, nothing else says which column it was.
                if self._column is None:
                    raise
                raise ValueError(f"column {self._column!r}: {error}") from error
            if "image_grid_thw" in features:
                features.pop("pixel_values")
                features[IMAGES] = images
                features[IMAGE_KWARGS] = image_kwargs
            return features

        self.preprocess_fn = preprocess_without_pixels

    def _get_task_for_column(self, column_name: str, column_position: int, router_mapping: dict[str, str]):
        # sentence-transformers' collator resolves each column's task right before preprocessing the column.
        self._column = column_name
        return super()._get_task_for_column(column_name, column_position, router_mapping)


def image_grid(image: Any, image_processor: Any) -> list[int]:
    """Qwen2-VL's ``[t, h, w]`` patch grid of a decoded image, from its size alone (no pixel is read): one
    temporal step, and the patch grid of :class:`~st_viomni.batching.PixelBudget` (the processor's resize)."""
    rows, columns = PixelBudget.of(image_processor).grid(*image.size)
    return [1, rows, columns]


def resized(image: Image.Image, image_processor: Any) -> Image.Image | torch.Tensor:
    """An RGB image as Qwen2-VL's image processor resizes it: uint8, channels first, sides multiples of the
    patch size times the merge size (28 for Qwen2-VL-2B); the image itself where it already has that size.

    What the processor computes next (rescale, normalise, patchify) from this tensor, called with
    ``do_resize=False``, is bitwise what it computes from the image; the resize is the costly step (16 of the
    19 ms of a 2000x1500 photo), and the tensor is smaller than the decoded photo it replaces. An image already
    at the model's size (rendered or synthetic data) is not copied: a copy would double what an in-memory
    dataset's batch holds (``benchmarks/NOTES.md``, training memory, item 10); :func:`with_pixels` makes its
    tensor per mini-batch."""
    _, rows, columns = image_grid(image, image_processor)
    if (columns * image_processor.patch_size, rows * image_processor.patch_size) == image.size:
        return image
    pixels = pil_to_tensor(image)[None]
    factor = image_processor.patch_size * image_processor.merge_size
    size, resample = image_processor.size, image_processor.resample
    return image_processor.resize(pixels, size=size, resample=resample, factor=factor)[0]


def _resizable(image: Any) -> bool:
    # The processor composites transparency onto white before resizing; such images keep that path.
    return isinstance(image, Image.Image) and image.mode == "RGB" and "transparency" not in image.info


def has_deferred_pixels(feature: dict[str, Any]) -> bool:
    """Whether a collated column carries its images (resized uint8 tensors or decoded images) instead of
    ``pixel_values``."""
    return IMAGES in feature


def unwrapped(model: Any) -> Any:
    """The SentenceTransformer inside a model the trainer has wrapped (DDP, ``torch.compile``), or the model."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def image_processor_of(model: Any) -> Any:
    """The image processor of a viOmni model, also when the trainer has wrapped it."""
    return unwrapped(model)[0].processor.image_processor


def with_pixels(
    feature: dict[str, Any], image_processor: Any, begin: int = 0, end: int | None = None
) -> dict[str, Any]:
    """Rows ``begin:end`` of a column collated by :class:`DeferredPixelCollator`, with their ``pixel_values``.

    Slices the token tensors and the image grids as sentence-transformers' GradCache mini-batching does, and
    runs the image processor on the mini-batch's images only. Raises a ``RuntimeError`` if the grids it gets
    differ from the collated ones (the size-only grid and the image processor disagree), rather than embed
    misaligned tokens; the message gives both grids and the images' sizes, which is what such a disagreement
    is debugged from.
    """
    images, image_kwargs = feature[IMAGES], feature[IMAGE_KWARGS]
    tokens = {key: value for key, value in feature.items() if key not in (IMAGES, IMAGE_KWARGS, "image_grid_thw")}
    batch_size = feature["input_ids"].shape[0]
    end = batch_size if end is None else min(end, batch_size)
    mini_batch = _create_minibatch(tokens, begin, end)
    images_per_row = feature["num_images_per_sample"]
    first, last = int(images_per_row[:begin].sum()), int(images_per_row[:end].sum())
    if first == last:  # a text-only mini-batch
        return mini_batch
    grids = feature["image_grid_thw"][first:last]
    batch_images = images[first:last]
    if image_kwargs.get("do_resize") is False:  # resized by the collator; those already at size are still PIL
        batch_images = [pil_to_tensor(image) if isinstance(image, Image.Image) else image for image in batch_images]
    processed = image_processor(batch_images, **{**image_kwargs, "return_tensors": "pt"})
    if not torch.equal(processed["image_grid_thw"].to(grids.device), grids):
        # (width, height): a PIL image's size, or a resized (channels, height, width) tensor's last two sides.
        sizes = [image.size if isinstance(image, Image.Image) else tuple(image.shape[:0:-1]) for image in batch_images]
        raise RuntimeError(
            f"the image processor gave grids {processed['image_grid_thw'].tolist()} for images of (width, height) "
            f"{sizes}, DeferredPixelCollator computed {grids.tolist()} from their sizes (image_grid)"
        )
    mini_batch["image_grid_thw"] = grids
    mini_batch["pixel_values"] = processed["pixel_values"].to(grids.device)
    return mini_batch


@contextmanager
def _grids_from_sizes(processor: Any, images: list[Any], image_kwargs: dict[str, Any]):
    # The processor's only contact with pixels is `_process_images`: the text expansion needs the grids alone.
    image_processor = processor.image_processor

    def process_images(batch_images, **kwargs):
        if images:  # transformers' processors make one call per preprocess; a second could mix resized images in
            raise RuntimeError("DeferredPixelCollator: the processor processed one column's images in two calls")
        flat = make_flat_list_of_images(batch_images)
        grids = torch.tensor(_size_only_grids(batch_images, flat, image_processor), dtype=torch.long)
        image_kwargs.update(kwargs)
        if kwargs.keys() <= {"return_tensors"} and all(map(_resizable, flat)):
            # Resize once, here (in the data loader's workers when it has them), not in both GradCache passes.
            images.extend(resized(image, image_processor) for image in flat)
            image_kwargs["do_resize"] = False
        else:
            images.extend(flat)
        processed = {"pixel_values": torch.empty(0), "image_grid_thw": grids}
        replacements = [processor.replace_image_token(processed, image_idx=index, **kwargs) for index in range(len(flat))]
        return processed, replacements

    processor._process_images = process_images
    try:
        yield
    finally:
        del processor._process_images


def _size_only_grids(batch_images: Any, flat: list[Any], image_processor: Any) -> list[list[int]]:
    """:func:`image_grid` of each of a column's images (``flat``; ``batch_images`` as the processor got them, one
    list per row), raising a ``ValueError`` that names the image (and its row) for one Qwen2-VL cannot resize
    (``smart_resize`` refuses an aspect ratio above 200)."""
    grids = []
    for index, image in enumerate(flat):
        try:
            grids.append(image_grid(image, image_processor))
        except ValueError as error:
            width, height = image.size
            where = f"image {index} of the column, {width}x{height} pixels"
            places = []
            if all(isinstance(row_images, (list, tuple)) for row_images in batch_images):
                places = [(row, k) for row, row_images in enumerate(batch_images) for k in range(len(row_images))]
            if len(places) == len(flat):
                row, k = places[index]
                where = f"row {row} of the batch, image {k} of the row ({where})"
            raise ValueError(f"{where}: Qwen2-VL's image processor cannot resize it: {error}") from error
    return grids
