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
      shuffle_buffer: 10000     # streaming: samples each source's shuffle holds, encoded images included, in
                                # every DataLoader worker of every process
      on_error: skip            # skip bad rows (summarised in the log) or raise on the first
      train:                    # sources; every key but the loader keys is an adapter keyword argument
        - {task: text_pair, hub: sentence-transformers/stsb, split: train, score_range: [0, 5]}
        - {task: ocr, json: data/ocr.jsonl, image_root: data/images, images_column: image_paths}
        - {mini: 200}           # the built-in mini mixture: 200 samples of every task
      eval:                     # evaluated before and after training (st_viomni.evaluation), encoding
        - {mini: 40}            # training.per_device_eval_batch_size inputs at a time (32 when unset)
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

Every section is checked when the recipe is loaded, before any model is built: an unknown key, a value of the
wrong type or out of range (including adapter options and the scalar training arguments), an unknown task, or a
proportion for a task that no source has is a :class:`RecipeError` naming the key (``loss.temprature``,
``data.train[0].max_history_turns``, ``training.learning_rate``). What only running can tell, whether the data
files exist and hold valid rows, and the trainer's own rules across training arguments, is checked when
:func:`~st_viomni.train.run_recipe` starts: the data before the model is built, the training arguments just after.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .tasks import TASK_NAMES, get_task

TINY_BASE = "tiny"
"""``model.base`` of the offline tiny Qwen2-VL (:func:`st_viomni.testing.make_tiny_base_model`), built per run."""

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
    shuffle_buffer: int = 10_000
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
    if data.shuffle_buffer < 1:
        raise RecipeError(f"data.shuffle_buffer: expected a positive number of samples, got {data.shuffle_buffer}")
    if data.on_error not in ("skip", "raise"):
        raise RecipeError(f"data.on_error: expected 'skip' or 'raise', got {data.on_error!r}")
    _check_proportions(data)
    loss = _build(LossRecipe, raw.get("loss") or {}, "loss")
    _check_loss_values(loss)
    if loss.mini_batch_size < 1:
        raise RecipeError(f"loss.mini_batch_size: expected a positive number of rows, got {loss.mini_batch_size}")
    if loss.mini_batch_num_tokens is not None and loss.mini_batch_num_tokens < 1:
        raise RecipeError(
            f"loss.mini_batch_num_tokens: expected a positive number of tokens, got {loss.mini_batch_num_tokens}"
        )
    training = _training_arguments(raw["training"])
    if loss.gather_across_devices and training.get("dataloader_drop_last") is False:
        raise RecipeError(
            "training.dataloader_drop_last: must be true with loss.gather_across_devices "
            "(cross-device negatives need equal per-process batches)"
        )
    if data.streaming and not training.get("max_steps", -1) > 0:
        raise RecipeError("training.max_steps: required with data.streaming (a stream has no length)")
    lora = _lora(raw["lora"]) if raw.get("lora") is not None else None
    hub = _build(HubRecipe, raw["hub"], "hub") if raw.get("hub") is not None else None
    if lora is not None and hub is not None and (model.base == TINY_BASE or is_local_model_path(model.base)):
        # Checked here, not after training: the run would end with a repository nobody else can load.
        raise RecipeError(
            f"hub: a LoRA model loads its base by the name in its adapter_config.json, and model.base "
            f"{model.base!r} is {'the offline tiny model' if model.base == TINY_BASE else 'a local path'}: "
            f"{hub.repo_id} would not load on any other machine; set model.base to the base's Hub id "
            "(e.g. Qwen/Qwen2-VL-2B), or drop lora or hub"
        )
    return Recipe(model=model, data=data, training=training, loss=loss, lora=lora, hub=hub)


def is_local_model_path(name: str) -> bool:
    """Whether a model name is a path on this machine (an existing directory, absolute or ``.``/``~``-relative)
    rather than a Hub id, which every machine can load."""
    return os.path.isdir(name) or os.path.isabs(name) or name.startswith((".", "~"))


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


def _check_proportions(data: DataRecipe) -> None:
    """``"seed"``, or a finite non-negative weight for exactly the tasks the sources have, not all zero."""
    if not isinstance(data.proportions, dict):
        if data.proportions != "seed":
            raise RecipeError(
                f"data.proportions: expected 'seed' or a mapping task -> weight, got {data.proportions!r}"
            )
        return
    with_sources = _source_tasks(data.train)
    for name, weight in data.proportions.items():
        where = f"data.proportions.{name}"
        _task(name, where)
        _non_negative(weight, where)
        if name not in with_sources:
            # mix_tasks would never see this weight: the task would silently be left out of training.
            raise RecipeError(
                f"{where}: weight given but no data.train source has task {name} "
                f"(the sources have {', '.join(with_sources)})"
            )
    missing = [task for task in with_sources if task not in data.proportions]
    if missing:
        raise RecipeError(f"data.proportions: no weight for task(s) {missing} that have sources")
    if not any(data.proportions.values()):
        raise RecipeError("data.proportions: every weight is 0; give at least one task a positive weight")


def _source_tasks(sources: list[SourceRecipe]) -> list[str]:
    """The tasks that ``sources`` give samples of (a ``mini`` source without a task gives all five)."""
    return [task for task in TASK_NAMES if any(source.task in (task, None) for source in sources)]


def _check_loss_values(loss: LossRecipe) -> None:
    # The loss checks these too, but only when it is built, after the model.
    _non_negative(loss.temperature, "loss.temperature", positive=True)
    for name in ("mse_weight", "cosine_weight", "triplet_weight"):
        _non_negative(getattr(loss, name), f"loss.{name}")
    for name, margin in (loss.margins or {}).items():
        where = f"loss.margins.{name}"
        _task(name, where)
        if get_task(name).loss != "triplet":
            triplet = [task for task in TASK_NAMES if get_task(task).loss == "triplet"]
            raise RecipeError(f"{where}: task {name} has no triplet term; margins apply to {', '.join(triplet)}")
        _non_negative(margin, where)


def _non_negative(value: Any, where: str, *, positive: bool = False) -> None:
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise RecipeError(f"{where}: expected a finite {kind} number, got {value!r}{_string_hint(value)}")


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
    if loaders == ["mini"]:
        if adapter_kwargs:
            # The mini mixture's samples are canonical already: no adapter reads them, so the options would be
            # ignored.
            raise RecipeError(
                f"{where}.{next(iter(adapter_kwargs))}: adapter options do not apply to a mini source "
                "(its keys are mini, task, split)"
            )
        _mini(raw, where)
    elif adapter_kwargs:
        _check_adapter_options(raw["task"], adapter_kwargs, where)
    loader_fields = {key: raw[key] for key in LOADER_KEYS if key in raw}
    return _build(SourceRecipe, {**loader_fields, "adapter_kwargs": adapter_kwargs}, where)


def _mini(raw: dict, where: str) -> None:
    from .data.mini import SPLITS

    count = raw["mini"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise RecipeError(f"{where}.mini: expected a positive number of samples per task, got {count!r}")
    if raw.get("split", "train") not in SPLITS:
        raise RecipeError(f"{where}.split: the mini mixture has the splits {', '.join(SPLITS)}, got {raw['split']!r}")


def _check_adapter_options(task: str, options: dict[str, Any], where: str) -> None:
    """Each option is a keyword argument of the task's adapter, of the type its signature gives."""
    from .data import adapters

    adapter = getattr(adapters, f"{task}_samples")
    hints = typing.get_type_hints(adapter)
    accepted = set(inspect.signature(adapter).parameters) - {"dataset", "report", "on_error"}
    for key, value in options.items():
        if key not in accepted:
            raise RecipeError(
                f"{where}.{key}: unknown key; loader keys are {', '.join(LOADER_KEYS)} and the "
                f"{task} adapter accepts {', '.join(sorted(accepted))}"
            )
        if not _matches(value, hints[key]):
            raise RecipeError(f"{where}.{key}: expected {_type_name(hints[key])}, got {value!r}{_string_hint(value)}")
    # The adapters' own rules on these values, which they would apply only once the data is loaded.
    with_rules = inspect.signature(adapters.check_options).parameters
    try:
        adapters.check_options(**{key: value for key, value in options.items() if key in with_rules})
    except ValueError as error:
        raise RecipeError(f"{where}.{error}") from None


def _training_arguments(raw: Any) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformerTrainingArguments

    raw = _mapping(raw, "training")
    known = {f.name for f in dataclasses.fields(SentenceTransformerTrainingArguments) if f.init}
    _reject_unknown(raw, known, "training", hint="a SentenceTransformerTrainingArguments field")
    if not raw.get("output_dir"):
        raise RecipeError("training.output_dir: required (checkpoints and the final model go there)")
    # SentenceTransformerTrainingArguments cannot be built here: building it initialises torch.distributed, which
    # must wait until the model is built (see run_recipe). Its numbers, flags and names are checked here, so that a
    # string learning rate fails now, not inside the optimizer after the model load.
    hints = typing.get_type_hints(SentenceTransformerTrainingArguments)
    for key, value in raw.items():
        if _is_scalar(hints[key]) and not _matches(value, hints[key]):
            raise RecipeError(f"training.{key}: expected {_type_name(hints[key])}, got {value!r}{_string_hint(value)}")
    return dict(raw)


def _is_scalar(hint: Any) -> bool:
    """Whether ``hint`` is made of bool, int, float, str and None only (not enums, mappings, classes)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return all(option in (bool, int, float, str, type(None)) for option in options)


def _string_hint(value: Any) -> str:
    """How to write a number that YAML read as a string (``1e-5``, ``'16'``), or nothing."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    mantissa, exponent_mark, exponent = value.strip().lower().partition("e")
    if not exponent_mark:
        return " (a string: write the number without quotes)"
    mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
    exponent = exponent if exponent[:1] in ("+", "-") else f"+{exponent}"
    return (
        f" (a string: YAML reads a number with an exponent as a number only with a dot and a signed exponent; "
        f"write {mantissa}e{exponent})"
    )


def _build(cls, raw: Any, where: str):
    raw = _mapping(raw, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, set(fields), where)
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if not _matches(value, hints[key]):
            raise RecipeError(f"{where}.{key}: expected {_type_name(hints[key])}, got {value!r}{_string_hint(value)}")
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
    if origin is collections.abc.Sequence:  # an adapter's list of column names
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(element, item) for element in value)
    if origin is tuple:  # a fixed-length tuple, written as a YAML list
        items = typing.get_args(hint)
        return (
            isinstance(value, list)
            and len(value) == len(items)
            and all(_matches(element, item) for element, item in zip(value, items))
        )
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
    if origin is collections.abc.Sequence:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_type_name(item)}"
    if origin is tuple:
        return f"a list [{', '.join(map(_type_name, typing.get_args(hint)))}]"
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
