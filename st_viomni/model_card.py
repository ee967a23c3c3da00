"""The viOmni model card: sentence-transformers' model card machinery with viOmni's own template.

``model.save()`` and ``model.push_to_hub()`` render ``model_card_template.md`` (top level of the repository,
shipped inside the package) through :class:`ViOmniModelCardData`. Of sentence-transformers' fields it shows
the base model, dimensionality, similarity, maximum length, modalities, languages and training
hyperparameters, and its YAML metadata carries the evaluator results (``model-index``); its own sections are
the task prefix table, a usage snippet (with ``peft`` in the install line for a LoRA model), the training data
mix, the loss settings and the before/after evaluation table of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

from .tasks import TASKS

TEMPLATE_PATH = Path(str(resources.files("st_viomni") / "model_card_template.md"))


@dataclass
class ViOmniModelCardData(SentenceTransformerModelCardData):
    """Model card data of a viOmni model.

    Args (in addition to sentence-transformers' ones):
        training_mix: Per task, the number of training samples, their share and whether the count is an
            estimate (a stream's), e.g. ``{"ocr": {"samples": 2_500_000, "share": 0.22, "estimated": False}}``.
        loss_settings: The training loss and its settings (class name, temperature, weights, margins, cached,
            mini-batch size, gathering across devices).
        evaluation: Rows ``{"metric", "before", "after"}`` of the evaluation before and after training.
    """

    language: str | list[str] | None = field(default_factory=lambda: ["vi", "en", "zh"])
    license: str | None = None
    training_mix: dict[str, dict[str, float]] = field(default_factory=dict)
    loss_settings: dict[str, Any] = field(default_factory=dict)
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[dict[str, str]] = field(
        default_factory=lambda: [
            {"name": task.name, "prefix": task.prefix, "description": task.description} for task in TASKS.values()
        ],
        init=False,
    )
    template_path: Path = field(default=TEMPLATE_PATH, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for tag in ("multimodal", "qwen2-vl", "viomni"):
            if tag not in self.tags:
                self.tags.append(tag)

    def get_model_specific_metadata(self) -> dict[str, Any]:
        metadata = super().get_model_specific_metadata()
        if self.model is not None:
            # A LoRA model's repository holds adapters only; loading them needs peft.
            metadata["lora"] = bool(getattr(self.model.transformers_model, "_hf_peft_config_loaded", False))
        return metadata
