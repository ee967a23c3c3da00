"""A training recipe: one YAML file that describes a whole ``st-viomni train`` run.

::

    model:                      # what to build (st_viomni.build_model)
      base: Qwen/Qwen2-VL-2B    # hub id, local path, or "tiny" (the offline tiny Qwen2-VL)
      embedding_dim: 1024
      min_pixels: 3136
      max_pixels: 602112
      max_seq_length: 4096
      dtype: bfloat16           # optional: float32, bfloat16, float16
      attn_implementation: sdpa # optional: eager, sdpa, flash_attention_2
      seed: 0                   # Dense initialisation (and the tiny base's weights)
    lora:                       # optional: LoRA adapters on Qwen2-VL, Dense head trained fully (needs peft)
      r: 64
      alpha: 128
      dropout: 0.05
      target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]  # each must match a layer
    data:
      proportions: seed         # "seed" (the seed's 11M mix), or {task: weight}
      seed: 0
      streaming: false          # true: never hold the mixture in memory (IterableDataset)
      on_error: skip            # skip bad rows (summarised in the log) or raise on the first
      train:                    # sources; every key but the loader keys is an adapter keyword argument
        - {task: text_pair, hub: sentence-transformers/stsb, split: train, score_range: [0, 5]}
        - {task: ocr, json: data/ocr.jsonl, image_root: data/images, images_column: image_paths}
        - {mini: 200}           # the built-in mini mixture: 200 samples of every task
      eval:
        - {mini: 40}
    loss:                       # st_viomni.losses.PrefixRoutedLoss / CachedPrefixRoutedLoss
      cached: true
      mini_batch_size: 8
      mini_batch_num_tokens: 4096   # optional (cached): cut mini-batches by tokens instead of rows, text and visual
      temperature: 0.05
      mse_weight: 1.0
      cosine_weight: 1.0
      triplet_weight: 1.0
      margins: {vqa_multi: 0.3}
      gather_across_devices: true
    training:                   # SentenceTransformerTrainingArguments, as they are
      output_dir: outputs/viomni-2b
      per_device_train_batch_size: 64
      learning_rate: 2.0e-5
      bf16: true
      gradient_checkpointing: true
    hub:                        # optional: push the final model
      repo_id: erax/viOmniQwen
      private: true

Every section is checked when the recipe is loaded: an unknown key, a wrong type or an unknown task is a
:class:`RecipeError` naming the key (``loss.temprature``), before any model is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .tasks import TASK_NAMES, get_task

LOADER_KEYS = ("task", "hub", "config", "json", "parquet", "mini", "split")


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the offending key."""


@dataclass
class ModelRecipe:
    base: str
    embedding_dim: int = 1024
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_seq_length: int | None = None
    dtype: str | None = None
    attn_implementation: str | None = None
    seed: int = 0


@dataclass
class SourceRecipe:
    """One data source: exactly one of ``hub``, ``json``, ``parquet``, ``mini``; ``task`` unless ``mini``."""

    task: str | None = None
    hub: str | None = None
    config: str | None = None
    json: str | list[str] | None = None
    parquet: str | list[str] | None = None
    mini: int | None = None
    split: str = "train"
    adapter_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataRecipe:
    train: list[SourceRecipe]
    eval: list[SourceRecipe] = field(default_factory=list)
    proportions: str | dict[str, float] = "seed"
    seed: int = 0
    streaming: bool = False
    on_error: str = "skip"


@dataclass
class LossRecipe:
    cached: bool = False
    mini_batch_size: int = 32
    mini_batch_num_tokens: int | None = None
    temperature: float = 0.05
    mse_weight: float = 1.0
    cosine_weight: float = 1.0
    triplet_weight: float = 1.0
    margins: dict[str, float] | None = None
    gather_across_devices: bool = False


@dataclass
class LoraRecipe:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class HubRecipe:
    repo_id: str
    private: bool = True


@dataclass
class Recipe:
    model: ModelRecipe
    data: DataRecipe
    training: dict[str, Any]
    loss: LossRecipe = field(default_factory=LossRecipe)
    lora: LoraRecipe | None = None
    hub: HubRecipe | None = None

    @property
    def output_dir(self) -> str:
        return self.training["output_dir"]


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file. Raises :class:`RecipeError` (or ``FileNotFoundError``) naming the problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe not found: {path!r}")
    with open(path, encoding="utf-8") as file:
        try:
            raw = yaml.safe_load(file)
        except yaml.YAMLError as error:
            raise RecipeError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    return parse_recipe(raw, source=path)


def parse_recipe(raw: Any, *, source: str = "recipe") -> Recipe:
    """Check a recipe given as a dict (the parsed YAML)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected a mapping with sections model, data, training, got {type(raw).__name__}")
    _reject_unknown(raw, {"model", "data", "training", "loss", "lora", "hub"}, "")
    for section in ("model", "data", "training"):
        if section not in raw:
            raise RecipeError(f"{source}: missing section {section!r}")
    model = _build(ModelRecipe, raw["model"], "model")
    data_raw = _mapping(raw["data"], "data")
    data = _build(
        DataRecipe,
        {**data_raw, "train": [], "eval": []},
        "data",
    )
    data.train = [_source(item, f"data.train[{i}]") for i, item in enumerate(_list(data_raw.get("train"), "data.train"))]
    data.eval = [_source(item, f"data.eval[{i}]") for i, item in enumerate(_list(data_raw.get("eval", []), "data.eval"))]
    if not data.train:
        raise RecipeError("data.train: needs at least one source")
    if data.on_error not in ("skip", "raise"):
        raise RecipeError(f"data.on_error: expected 'skip' or 'raise', got {data.on_error!r}")
    if isinstance(data.proportions, dict):
        for name in data.proportions:
            _task(name, f"data.proportions.{name}")
    elif data.proportions != "seed":
        raise RecipeError(f"data.proportions: expected 'seed' or a mapping task -> weight, got {data.proportions!r}")
    loss = _build(LossRecipe, raw.get("loss") or {}, "loss")
    for name in loss.margins or {}:
        _task(name, f"loss.margins.{name}")
    if loss.mini_batch_size < 1:
        raise RecipeError(f"loss.mini_batch_size: expected a positive number of rows, got {loss.mini_batch_size}")
    if loss.mini_batch_num_tokens is not None and loss.mini_batch_num_tokens < 1:
        raise RecipeError(
            f"loss.mini_batch_num_tokens: expected a positive number of tokens, got {loss.mini_batch_num_tokens}"
        )
    training = _training_arguments(raw["training"])
    lora = _lora(raw["lora"]) if raw.get("lora") is not None else None
    hub = _build(HubRecipe, raw["hub"], "hub") if raw.get("hub") is not None else None
    return Recipe(model=model, data=data, training=training, loss=loss, lora=lora, hub=hub)


def _lora(raw: Any) -> LoraRecipe:
    lora = _build(LoraRecipe, raw, "lora")
    if lora.r < 1:
        raise RecipeError(f"lora.r: expected a positive rank, got {lora.r!r}")
    if lora.alpha <= 0:
        raise RecipeError(f"lora.alpha: expected a positive scaling, got {lora.alpha!r}")
    if not 0 <= lora.dropout < 1:
        raise RecipeError(f"lora.dropout: expected a probability in [0, 1), got {lora.dropout!r}")
    if not lora.target_modules or not all(isinstance(name, str) and name for name in lora.target_modules):
        raise RecipeError(
            f"lora.target_modules: expected a non-empty list of layer names (e.g. [q_proj, v_proj]), "
            f"got {lora.target_modules!r}"
        )
    return lora


def _source(raw: Any, where: str) -> SourceRecipe:
    raw = _mapping(raw, where)
    loaders = [key for key in ("hub", "json", "parquet", "mini") if raw.get(key) is not None]
    if len(loaders) != 1:
        raise RecipeError(f"{where}: needs exactly one of hub, json, parquet, mini; got {loaders or 'none'}")
    if raw.get("task") is None and loaders != ["mini"]:
        raise RecipeError(f"{where}: missing key 'task' (one of {', '.join(TASK_NAMES)})")
    if raw.get("task") is not None:
        _task(raw["task"], f"{where}.task")
    adapter_kwargs = {key: value for key, value in raw.items() if key not in LOADER_KEYS}
    if adapter_kwargs:
        if raw.get("task") is None:
            raise RecipeError(f"{where}: adapter options {sorted(adapter_kwargs)} need a 'task'")
        from .data import adapters

        adapter = getattr(adapters, f"{raw['task']}_samples")
        accepted = set(inspect.signature(adapter).parameters) - {"dataset", "report", "on_error"}
        for key in adapter_kwargs:
            if key not in accepted:
                raise RecipeError(
                    f"{where}.{key}: unknown key; loader keys are {', '.join(LOADER_KEYS)} and the "
                    f"{raw['task']} adapter accepts {', '.join(sorted(accepted))}"
                )
    loader_fields = {key: raw[key] for key in LOADER_KEYS if key in raw}
    return _build(SourceRecipe, {**loader_fields, "adapter_kwargs": adapter_kwargs}, where)


def _training_arguments(raw: Any) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformerTrainingArguments

    raw = _mapping(raw, "training")
    known = {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments) if f.init}
    _reject_unknown(raw, known, "training", hint="a SentenceTransformerTrainingArguments field")
    if not raw.get("output_dir"):
        raise RecipeError("training.output_dir: required (checkpoints and the final model go there)")
    return dict(raw)


def _build(cls, raw: Any, where: str):
    raw = _mapping(raw, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, set(fields), where)
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if not _matches(value, hints[key]):
            raise RecipeError(f"{where}.{key}: expected {_type_name(hints[key])}, got {value!r}")
    try:
        return cls(**raw)
    except TypeError as error:  # a missing required key
        missing = str(error).split(":")[-1].strip() or str(error)
        raise RecipeError(f"{where}: missing required key {missing}") from None


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _reject_unknown(raw: dict, known: set[str], where: str, hint: str | None = None) -> None:
    for key in raw:
        if key not in known:
            prefix = f"{where}.{key}" if where else str(key)
            close = sorted(known, key=lambda name: _distance(str(key), name))[:3]
            expected = hint or f"one of {', '.join(sorted(known))}"
            raise RecipeError(f"{prefix}: unknown key (expected {expected}; closest: {', '.join(close)})")


def _distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _mapping(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(raw).__name__}")
    return raw


def _list(raw: Any, where: str) -> list:
    if not isinstance(raw, list):
        raise RecipeError(f"{where}: expected a list of sources, got {type(raw).__name__}")
    return raw


def _task(name: Any, where: str) -> None:
    try:
        get_task(name)
    except ValueError as error:
        raise RecipeError(f"{where}: {error}") from None
