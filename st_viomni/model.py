"""Assemble a viOmniQwen model from stock sentence-transformers modules.

Qwen2-VL -> mean pooling over every non-padding token (text and image tokens) -> Dense to ``embedding_dim``
(no activation) -> L2 normalisation, with the five task prompts registered. Everything that makes the
model "viOmni" is data saved with it (prompts, chat template, pixel budgets, Dense weights), so a saved
model loads with plain ``SentenceTransformer(path)``, without st-viomni and without ``trust_remote_code``.
It then encodes text, and images given as RGB PIL images (what :func:`~st_viomni.formatting.load_image` and
:func:`~st_viomni.formatting.format_input` return), identically; images that plain sentence-transformers
decodes itself can differ (transparent image files, EXIF-rotated PIL images, 16-bit images, BMP and TIFF
files: see :class:`ViOmniQwen`).

:class:`ViOmniQwen` is that same ``SentenceTransformer`` plus input checks at preprocessing time (errors that
name the offending input, images normalised to RGB once), cost-planned encode batches
(:mod:`st_viomni.batching`), Qwen2-VL's patch embedding run as a matrix product
(:mod:`st_viomni.patch_embedding`), bfloat16 linear layers, and float32 ones except on Intel CPUs, run through
oneDNN on CPU, on a bounded set of shapes, in inference (:mod:`st_viomni.onednn_linear`), and bfloat16 vision
attention on CPUs without AMX as chunked matrix products, in inference (:mod:`st_viomni.vision_attention`). It
writes exactly the files a plain ``SentenceTransformer`` writes.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from sentence_transformers.util.misc import _to_list

from .batching import DEFAULT_MAX_PADDING, Unsupported, encode_planned
from .formatting import CHAT_TEMPLATE
from .inputs import caller_indices, check_inputs, describe_input, input_names
from .model_card import ViOmniModelCardData
from .onednn_linear import use_onednn_linear
from .patch_embedding import use_matmul_patch_embedding
from .tasks import PREFIXES
from .vision_attention import use_chunked_vision_attention


class ViOmniQwen(SentenceTransformer):
    """A viOmniQwen embedding model: a stock ``SentenceTransformer`` that checks its inputs.

    Load a saved model with ``ViOmniQwen(path)``. :meth:`encode` (with the caller's indices) and
    :meth:`preprocess` (used by training, with batch indices):

    * rejects ``None``, a dict with neither text nor image or with unknown keys, and a string naming a missing
      image file (stock sentence-transformers would embed that string as text) with an error naming the
      input's index;
    * decodes each image once with :func:`~st_viomni.formatting.load_image`, as training does, to
      EXIF-oriented 8-bit RGB (transparency composited on white), naming the input of a corrupt or missing
      image, of one over Pillow's pixel limit and of one Qwen2-VL cannot take (aspect ratio above 200);
    * turns transformers' "Mismatch in image token count" (an input whose image tokens alone do not fit in
      ``max_seq_length``, or in a ``max_length`` the caller set) into an error naming the input and that limit.
      Over-long *text* is truncated as usual: the chat template puts a turn's images before its text, so
      right-truncation only ever cuts text.

    Plain ``SentenceTransformer(path)`` loads the same model without these checks and encodes text, and images
    given as RGB PIL images (e.g. from ``load_image``), identically. Images it decodes itself differ in some
    cases (checked with sentence-transformers 6.3 and transformers 5.23 decoding files with torchvision):

    * an image file with transparency given as a path (RGBA or LA PNG, WebP with alpha, palette PNG or GIF
      with a transparent colour): it drops the alpha channel, keeping whatever colour lies under transparent
      pixels, where ``load_image`` composites on white (as it does itself for such an image given as PIL);
    * a PIL image with an EXIF orientation: it ignores the orientation (given as a path, both apply it);
    * a 16-bit image (16-bit PNG, ``I;16`` or a 16-bit mode ``"I"`` PIL image): it reduces it to 8 bits
      differently;
    * a BMP or TIFF path: it cannot decode it and raises.

    RGB, grayscale, 1-bit, palette and CMYK images (paths or PIL images), PIL images with transparency and
    EXIF-rotated JPEG and PNG files given as paths encode identically.

    Its model card (written by ``save`` and ``push_to_hub``) is viOmni's: see :mod:`st_viomni.model_card`.
    """

    def __init__(self, *args, model_card_data: ViOmniModelCardData | None = None, **kwargs) -> None:
        super().__init__(*args, model_card_data=model_card_data or ViOmniModelCardData(), **kwargs)
        use_matmul_patch_embedding(self)
        use_onednn_linear(self)
        use_chunked_vision_attention(self)

    def _update_default_model_id(self, model_card: str) -> str:
        # The card's usage snippet loads the model with plain SentenceTransformer(...), not with this class.
        if not self.model_card_data.model_id:
            return model_card
        placeholder = f'SentenceTransformer("{self._model_card_model_id_placeholder}")'
        return model_card.replace(placeholder, f'SentenceTransformer("{self.model_card_data.model_id}")')

    def encode(
        self,
        inputs: Any,
        *args,
        max_padding: float | None = DEFAULT_MAX_PADDING,
        max_batch_tokens: int | None = None,
        **kwargs,
    ):
        """``SentenceTransformer.encode``, same arguments and results, batched by real cost.

        Several inputs are grouped by their real sequence length (template and text tokens plus visual tokens
        computed from each image's size, before any image is decoded): batches of at most ``batch_size``
        inputs with at most ``max_padding`` of their language-model tokens padding and at most
        ``max_batch_tokens`` padded tokens (None: on CPU, as many as keep a batch's MLP activations within 16
        MiB, with image patches bounded alike; on an accelerator, no bound); each batch is encoded by stock
        sentence-transformers while the next one's images are decoded, and the embeddings come back in input
        order. Qwen2-VL's patch embedding runs as a matrix product (:mod:`st_viomni.patch_embedding`), on CPU
        the bfloat16 linear layers, and the float32 ones except on Intel CPUs, through oneDNN on a bounded set of
        shapes (:mod:`st_viomni.onednn_linear`), and in bfloat16 on CPUs without AMX the vision attention as
        chunked matrix products (:mod:`st_viomni.vision_attention`). See :mod:`st_viomni.batching`.
        ``max_padding=None`` batches as stock sentence-transformers does. Options the planner does not handle
        (``output_value`` other than sentence embeddings, multi-process ``pool`` or device lists, extra keyword
        arguments other than ``encode_query``/``encode_document``'s ``task``) and inputs it cannot cost (audio,
        video, URLs, conversations mixed with other inputs) take the stock path: every input is checked first
        (image headers only), and the images are decoded batch by batch in :meth:`preprocess`.

        A batch is whatever stock ``encode`` treats as one (a list or tuple, a ``datasets`` column, a numpy
        array of strings or objects; a list of chat messages is one input); errors name the caller's index.
        """
        single = self.is_singular_input(inputs)
        listed = [inputs] if single else _to_list(inputs)
        if not single and len(listed) > 1 and max_padding is not None:
            options = inspect.signature(SentenceTransformer.encode).bind(self, listed, *args, **kwargs)
            options.apply_defaults()
            try:
                return encode_planned(
                    self,
                    super().encode,
                    listed,
                    {name: value for name, value in options.arguments.items() if name not in ("self", "inputs")},
                    max_padding=max_padding,
                    max_batch_tokens=max_batch_tokens,
                )
            except Unsupported:
                pass
        # Stock encode sorts inputs by length before batching: check them here, cheaply, so that errors name the
        # caller's index, and let preprocess decode each batch's images (not the whole call's at once).
        check_inputs(listed, decode=False)
        with caller_indices(listed, range(len(listed))):
            return super().encode(inputs if single else listed, *args, **kwargs)

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs) -> dict[str, Any]:
        inputs = list(inputs)
        names = input_names(inputs)  # the caller's indices during encode, else positions in this batch
        inputs = check_inputs(inputs)
        try:
            return super().preprocess(inputs, prompt=prompt, **kwargs)
        except ValueError as error:
            if not re.search(r"Mismatch in `?(image|video)`? token count", str(error)):
                raise
            raise ValueError(self._explain_overflow(inputs, names, prompt, kwargs)) from error

    def _explain_overflow(self, inputs: list[Any], names: list[str], prompt: str | None, kwargs: dict) -> str:
        # Error path only: re-render each input untruncated to find those whose image tokens truncation cuts
        # (an input whose text alone runs past the limit is truncated in its text, which is fine).
        limit_name, limit = self._truncation_limit(kwargs)
        per_call = kwargs.get("processing_kwargs") or {}
        untruncated = {**per_call, "text": {**(per_call.get("text") or {}), "truncation": False}}
        too_long = []
        for name, value in zip(names, inputs):
            features = super().preprocess([value], prompt=prompt, **{**kwargs, "processing_kwargs": untruncated})
            length = int(features["attention_mask"].sum())
            types = features.get("mm_token_type_ids")
            image_positions = [] if types is None else (types[0] != 0).nonzero()
            if limit is not None and len(image_positions) and int(image_positions.max()) >= limit:
                visual = len(image_positions)
                too_long.append(f"{name} ({describe_input(value)}: {length} tokens, {visual} of them image tokens)")
        return (
            f"{'; '.join(too_long) or 'an input'} {'do' if len(too_long) > 1 else 'does'} not fit in "
            f"{limit_name}={limit} without cutting image tokens; use fewer or smaller images (max_pixels) or raise "
            f"{limit_name}"
        )

    def _truncation_limit(self, kwargs: dict) -> tuple[str, int | None]:
        """The text ``max_length`` a ``preprocess`` call with these keyword arguments truncates to, and where it
        is set, in the order of sentence-transformers' ``Transformer.preprocess``."""
        transformer = self[0]
        per_call = (kwargs.get("processing_kwargs") or {}).get("text") or {}
        configured = (getattr(transformer, "processing_kwargs", None) or {}).get("text") or {}
        task_length = {"query": "query_length", "document": "document_length"}.get(kwargs.get("task"))
        for name, value in (
            ("processing_kwargs['text']['max_length']", per_call.get("max_length")),
            ("the Transformer module's processing_kwargs['text']['max_length']", configured.get("max_length")),
            ("max_length", kwargs.get("max_length")),
            (task_length, getattr(transformer, task_length, None) if task_length else None),
        ):
            if value is not None:
                return name, value
        return "max_seq_length", self.max_seq_length


def build_model(
    base_model_name_or_path: str | os.PathLike,
    *,
    embedding_dim: int = 1024,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_seq_length: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> ViOmniQwen:
    """Build a viOmniQwen embedding model on a Qwen2-VL base checkpoint.

    Args:
        base_model_name_or_path: Hub id or local path of a Qwen2-VL checkpoint, either bare ``Qwen2VLModel``
            weights or a ``Qwen2VLForConditionalGeneration`` checkpoint such as ``Qwen/Qwen2-VL-2B-Instruct``
            (its LM head is not loaded).
        embedding_dim: Output dimension of the Dense projection (the seed's model uses 1024).
        min_pixels: Smallest image area after resizing, in pixels; with ``max_pixels`` it bounds the number
            of visual tokens per image (one token per 28x28 pixels for Qwen2-VL). None keeps the base
            checkpoint's budget. Saved with the model.
        max_pixels: Largest image area after resizing, in pixels. None keeps the base checkpoint's budget.
        max_seq_length: Longest input in tokens, text and image tokens together. None uses the language
            model's ``max_position_embeddings`` (Qwen2-VL's composite config hides it from
            sentence-transformers, which would otherwise leave it unbounded).
        model_kwargs: Passed to ``from_pretrained`` of the Qwen2-VL model (e.g. ``{"dtype": torch.bfloat16,
            "attn_implementation": "flash_attention_2"}``).

    Returns:
        A :class:`ViOmniQwen` (a ``SentenceTransformer``) whose ``prompts`` are the task prefixes, so
        ``model.encode(inputs, prompt_name="ocr")`` renders exactly what ``format_input("ocr", ...)`` renders.

    Example:
        ::

            from st_viomni import build_model, format_input

            model = build_model("Qwen/Qwen2-VL-2B-Instruct", max_pixels=768 * 28 * 28)
            text = model.encode("The cat sat on the mat.", prompt_name="text_pair")
            image = model.encode(format_input("vqa_single", "What colour is the cat?", ["cat.jpg"]))
            model.save("viomni-2b")
    """
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    transformer = Transformer(
        os.fspath(base_model_name_or_path),
        model_kwargs=model_kwargs,
        # Flattening text-only batches would bypass Qwen2-VL's M-RoPE position computation.
        unpad_inputs=False,
    )
    if transformer.config.model_type != "qwen2_vl":
        raise ValueError(
            f"{base_model_name_or_path!r} is a {transformer.config.model_type!r} checkpoint; "
            "build_model expects Qwen2-VL (model_type 'qwen2_vl')"
        )
    processor = transformer.processor
    processor.chat_template = CHAT_TEMPLATE
    if min_pixels is not None or max_pixels is not None:
        set_pixel_budget(transformer, min_pixels=min_pixels, max_pixels=max_pixels)
    transformer.max_seq_length = max_seq_length or transformer.config.text_config.max_position_embeddings

    hidden_size = transformer.get_embedding_dimension()
    pooling = Pooling(hidden_size, pooling_mode="mean")
    dense = Dense(hidden_size, embedding_dim, bias=True, activation_function=torch.nn.Identity())
    dtype = next(transformer.model.parameters()).dtype
    dense.to(dtype)
    return ViOmniQwen(modules=[transformer, pooling, dense, Normalize()], prompts=dict(PREFIXES))


def set_pixel_budget(transformer: Transformer, *, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set the image (and video) resize budget of a Qwen2-VL ``Transformer`` module in place."""
    for processor in (transformer.processor.image_processor, getattr(transformer.processor, "video_processor", None)):
        if processor is None:
            continue
        size = dict(processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        if size["shortest_edge"] > size["longest_edge"]:
            raise ValueError(f"min_pixels ({size['shortest_edge']}) exceeds max_pixels ({size['longest_edge']})")
        processor.size = size
