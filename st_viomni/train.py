"""Run a training recipe: mix the data, build the model, train with PrefixRoutedLoss, evaluate, save, push.

The same code runs on one CPU, one GPU, and under ``torchrun`` / ``accelerate launch`` on many GPUs and nodes
(DDP, DeepSpeed, FSDP through accelerate configs): every process runs :func:`run_recipe`; the trainer
shards batches, and with ``loss.gather_across_devices`` every process scores its samples against the whole
global batch. Re-running the same command after a crash resumes from the last checkpoint in
``training.output_dir``.

Outputs in ``training.output_dir``: ``checkpoint-*`` (safetensors, for resuming), ``final/`` (the trained
model, with its model card) and ``metrics.json`` (evaluation before and after training, per-task losses).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from transformers import set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .data import ValidationReport, build_training_dataset, default_proportions, mix_tasks
from .data.sources import load_samples_by_task
from .deferred_pixels import DeferredPixelCollator
from .evaluation import build_evaluator, summarize
from .losses import CachedPrefixRoutedLoss, PrefixRoutedLoss, TaskLossLogger
from .model import ViOmniQwen, build_model
from .recipe import TINY_BASE, Recipe, RecipeError
from .tasks import TASK_NAMES

logger = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 32  # rows the evaluators encode at a time when training.per_device_eval_batch_size is unset


@dataclass
class TrainingRun:
    """What a run produced: where the model is, and the evaluation before and after training."""

    model_dir: str
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    log_history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: str | None = None
    skipped_rows: dict[str, int] | str = field(default_factory=dict)
    """Rows dropped by validation, per reason (those process 0 read, with a stream on several processes); a
    string saying why when they are unknown (a stream validated in DataLoader worker processes)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_recipe(recipe: Recipe, *, callbacks: list | None = None) -> TrainingRun:
    """Train as the recipe says and return the run's results (see the module docstring)."""
    output_dir = recipe.output_dir
    set_seed(recipe.model.seed)
    # The data before the model: a missing file or a bad source fails in seconds, not after a 2B model load.
    mixture, proportions, train_dataset, reports = _training_data(recipe)
    evaluator = None
    if recipe.data.eval:
        eval_samples = load_samples_by_task(recipe.data.eval, on_error="raise", seed=recipe.data.seed)
        evaluator = build_evaluator(
            (sample for part in eval_samples.values() for sample in part),
            batch_size=recipe.training.get("per_device_eval_batch_size", EVAL_BATCH_SIZE),
        )

    # Before the training arguments, which initialise torch.distributed: from then on transformers writes
    # checkpoints on rank 0 only, and every process builds the tiny base into a directory of its own.
    model = _build_model(recipe)
    if recipe.lora is not None:
        _add_lora(model, recipe)
    arguments = training_arguments(recipe)

    loss = _loss(model, recipe)
    # The cached loss computes each mini-batch's pixels itself, so that a step's memory does not grow with the
    # images of the whole batch.
    collator = None
    if recipe.loss.cached:
        collator = DeferredPixelCollator(
            model.preprocess, router_mapping=arguments.router_mapping, prompts=arguments.prompts
        )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=arguments,
        train_dataset=train_dataset,
        loss=loss,
        evaluator=evaluator,
        callbacks=callbacks,
        data_collator=collator,
    )
    TaskLossLogger.attach(trainer)
    run = TrainingRun(model_dir=os.path.join(output_dir, "final"))
    # The model is rebuilt from the base before resuming, so "before" is always the untrained model.
    if evaluator is not None:
        run.before = summarize(trainer.evaluate())
    run.resumed_from = last_complete_checkpoint(output_dir)
    if run.resumed_from:
        logger.warning(f"resuming from {run.resumed_from}")
    trainer.train(resume_from_checkpoint=run.resumed_from)
    if trainer.state.global_step < trainer.state.max_steps:
        logger.warning(
            f"training stopped after {trainer.state.global_step} of {trainer.state.max_steps} planned steps: the "
            "training data ran out (a stream that yields no batch: fewer valid samples than one batch, or none) or "
            "a callback stopped it; the model card estimates a stream's samples from the steps taken"
        )
    if evaluator is not None:
        run.after = summarize(trainer.evaluate())
    run.log_history = list(trainer.state.log_history)
    run.skipped_rows = _skipped_rows(recipe, reports)

    _fill_model_card(model, mixture, proportions, loss, run, _samples_seen(trainer, arguments))
    if trainer.is_world_process_zero():
        model.save(run.model_dir)
        with open(os.path.join(output_dir, "metrics.json"), "w", encoding="utf-8") as file:
            json.dump(run.to_dict(), file, indent=2, default=float)
        if recipe.hub is not None:
            model.push_to_hub(recipe.hub.repo_id, private=recipe.hub.private, exist_ok=True, replace_model_card=True)
    return run


def _training_data(recipe: Recipe) -> tuple[Dataset | IterableDataset, dict[str, float], Any, list[ValidationReport]]:
    """The mixture of the recipe's training sources, its proportions, the trainer dataset and the validation reports.

    Two reports, so that no row is counted twice: one for the source rows the adapters read and drop, one for
    the samples that :func:`build_training_dataset`'s safety net drops.
    """
    rows, samples_report = ValidationReport(), ValidationReport()
    # Every process, and each of its DataLoader workers, reads its own shards of a stream (reshard_stream).
    workers = int(recipe.training.get("dataloader_num_workers", 0))
    num_shards = int(os.environ.get("WORLD_SIZE", "1")) * max(1, workers)
    samples = load_samples_by_task(
        recipe.data.train, streaming=recipe.data.streaming, on_error=recipe.data.on_error, report=rows,
        seed=recipe.data.seed, num_shards=num_shards, shuffle_buffer=recipe.data.shuffle_buffer,
    )
    proportions = _proportions(recipe, samples)
    # mix_tasks reads each stream up to its first sample to check it has one; given the report, it leaves the rows
    # it read uncounted (training reads them again), and names their problems if it has none.
    mixture = mix_tasks(samples, proportions, seed=recipe.data.seed, report=rows)
    train_dataset = build_training_dataset(mixture, on_error=recipe.data.on_error, report=samples_report)
    return mixture, proportions, train_dataset, [rows, samples_report]


def _skipped_rows(recipe: Recipe, reports: list[ValidationReport]) -> dict[str, int] | str:
    """The rows (and samples) validation dropped, per reason; or why they are unknown."""
    workers = recipe.training.get("dataloader_num_workers", 0)
    if recipe.data.streaming and workers > 0:
        # A stream is validated as it is read, in the DataLoader workers, each with its own copy of the reports.
        return (
            f"unknown: the stream was validated in {workers} DataLoader worker processes, whose counts are not "
            "collected (each worker logs the bad rows it skips)"
        )
    counts: dict[str, int] = {}
    for report in reports:
        for reason, count in report.counts.items():
            counts[reason] = counts.get(reason, 0) + count
    return counts


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that was written to the end, or None.

    The trainer writes ``trainer_state.json`` after the weights, optimizer and RNG states, so a checkpoint
    interrupted while being written (a killed job) lacks it, or holds a truncated one, and is passed over.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit():
            steps.append(int(step))
    for step in sorted(steps, reverse=True):
        path = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        try:
            with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as file:
                json.load(file)
        except (OSError, ValueError):
            logger.warning(f"skipping incomplete checkpoint {path}")
            continue
        return path
    return None


def training_arguments(recipe: Recipe) -> SentenceTransformerTrainingArguments:
    """The recipe's ``training`` section with the settings the loss and the data need enforced."""
    values = {"report_to": "none", **recipe.training}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        # Several processes and no accelerator: without use_cpu, transformers and accelerate run each process as
        # a single-process job (DistributedType.NO: no DDP, no gradient sync, every process on all the data).
        values.setdefault("use_cpu", True)
    # parse_recipe refused a dataloader_drop_last: false with gather_across_devices, and streaming without max_steps.
    if recipe.loss.gather_across_devices:
        values["dataloader_drop_last"] = True
    if recipe.data.streaming:
        # accelerate would otherwise cut every batch tensor to the batch size, including Qwen2-VL's pixel rows.
        accelerator_config = dict(values.get("accelerator_config") or {})
        accelerator_config["dispatch_batches"] = False
        values["accelerator_config"] = accelerator_config
    return SentenceTransformerTrainingArguments(**values)


def _build_model(recipe: Recipe) -> ViOmniQwen:
    spec = recipe.model
    model_kwargs = {}
    if spec.dtype:
        model_kwargs["dtype"] = getattr(torch, spec.dtype)
    if spec.attn_implementation:
        model_kwargs["attn_implementation"] = spec.attn_implementation
    options = dict(
        embedding_dim=spec.embedding_dim,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        max_seq_length=spec.max_seq_length,
        model_kwargs=model_kwargs or None,
    )
    torch.manual_seed(spec.seed)  # the Dense projection's initialisation
    if spec.base != TINY_BASE:
        return build_model(spec.base, **options)
    from .testing import make_tiny_base_model

    # Every process builds its own (identical) copy: no file is shared between processes.
    with tempfile.TemporaryDirectory(prefix="tiny-qwen2-vl-") as scratch:
        base = make_tiny_base_model(scratch, seed=spec.seed)
        torch.manual_seed(spec.seed)
        return build_model(base, **options)


def _add_lora(model: ViOmniQwen, recipe: Recipe) -> None:
    """Put LoRA adapters on the Qwen2-VL module's layers named in ``lora.target_modules``.

    peft freezes every weight of the Qwen2-VL module but the adapters' own; the Dense head is another module
    and stays trainable, so it is trained fully. The saved model holds the adapters
    (``adapter_model.safetensors``, ``adapter_config.json``) and loads the base named in the adapter config:
    the hub id, the absolute path of a local base, or, for the tiny base (built in a scratch directory that
    is gone after the run), a copy of it kept in ``training.output_dir``.
    """
    try:
        from peft import LoraConfig, TaskType
    except ImportError:
        raise RecipeError('lora: needs the peft package (the "lora" extra, e.g. pip install -e ".[lora]")') from None
    _check_peft_version()
    spec = recipe.lora
    transformers_model = model.transformers_model
    layers = {name: module for name, module in transformers_model.named_modules() if not list(module.children())}
    unmatched = [
        target for target in spec.target_modules
        if not any(name == target or name.endswith(f".{target}") for name in layers)
    ]
    if unmatched:
        linear = sorted({_short_name(name) for name, module in layers.items() if isinstance(module, torch.nn.Linear)})
        raise RecipeError(
            f"lora.target_modules: no layer of the {transformers_model.config.model_type} model is named "
            f"{' or '.join(map(repr, unmatched))}; its linear layers are named {', '.join(linear)}"
        )
    try:
        model.add_adapter(
            LoraConfig(
                r=spec.r,
                lora_alpha=spec.alpha,
                lora_dropout=spec.dropout,
                target_modules=list(spec.target_modules),
                task_type=TaskType.FEATURE_EXTRACTION,
            )
        )
    except ValueError as error:  # e.g. a layer of a type peft cannot adapt (a norm)
        raise RecipeError(f"lora.target_modules: {' '.join(str(error).split())}") from None
    transformers_model.peft_config["default"].base_model_name_or_path = _lora_base(recipe)


def _check_peft_version() -> None:
    """transformers refuses peft releases older than its ``MIN_PEFT_VERSION`` (5.24 needs 0.22) with a bare
    ValueError from deep inside ``add_adapter``; say which package is the problem before any adapter is added."""
    from importlib.metadata import version

    import transformers
    from packaging.version import Version
    from transformers.integrations import peft as transformers_peft

    needed, installed = getattr(transformers_peft, "MIN_PEFT_VERSION", None), version("peft")
    if needed and Version(installed) < Version(needed):
        raise RecipeError(
            f"lora: transformers {transformers.__version__} needs peft >= {needed}, and peft {installed} is "
            "installed: upgrade peft, or install a transformers release that accepts it"
        )


def _short_name(name: str) -> str:
    """The shortest suffix a target can use: ``q_proj``, or ``mlp.0`` for a layer of a Sequential."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _lora_base(recipe: Recipe) -> str:
    """Where a saved adapter finds its base model, from any working directory and after this run."""
    base = recipe.model.base
    if base != TINY_BASE:
        return os.path.abspath(base) if os.path.isdir(base) else base
    from .testing import make_tiny_base_model

    # The same seed rebuilds the same weights (make_tiny_base_model is deterministic), so this copy is the
    # base the adapters were trained on. Rank 0 writes it, before any checkpoint, and renames it into place
    # whole, so a process resuming from a checkpoint never reads a half-written copy.
    path = os.path.abspath(os.path.join(recipe.output_dir, f"tiny-base-seed{recipe.model.seed}"))
    if int(os.environ.get("RANK", "0")) == 0 and not os.path.isfile(os.path.join(path, "config.json")):
        os.makedirs(recipe.output_dir, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".tiny-base-", dir=recipe.output_dir)
        make_tiny_base_model(scratch, seed=recipe.model.seed)
        try:
            os.rename(scratch, path)
        except OSError:  # written meanwhile by another run in the same directory
            shutil.rmtree(scratch, ignore_errors=True)
    return path


def _loss(model: ViOmniQwen, recipe: Recipe) -> PrefixRoutedLoss | CachedPrefixRoutedLoss:
    spec = recipe.loss
    options = dict(
        temperature=spec.temperature,
        mse_weight=spec.mse_weight,
        cosine_weight=spec.cosine_weight,
        triplet_weight=spec.triplet_weight,
        margins=spec.margins,
        gather_across_devices=spec.gather_across_devices,
    )
    if spec.cached:
        return CachedPrefixRoutedLoss(
            model, mini_batch_size=spec.mini_batch_size, mini_batch_num_tokens=spec.mini_batch_num_tokens, **options
        )
    return PrefixRoutedLoss(model, **options)


def _proportions(recipe: Recipe, samples: dict[str, Dataset | IterableDataset]) -> dict[str, float]:
    if recipe.data.proportions == "seed":
        return default_proportions(list(samples))
    # parse_recipe checked that the weights name exactly the tasks of the sources.
    return {task: float(recipe.data.proportions[task]) for task in samples}


def _samples_seen(trainer: SentenceTransformerTrainer, arguments: SentenceTransformerTrainingArguments) -> int:
    """The training samples of the optimizer steps taken, over all processes (at most: a last batch may be short)."""
    world = max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    batch = arguments.per_device_train_batch_size * world * arguments.gradient_accumulation_steps
    return trainer.state.global_step * batch


def _fill_model_card(model, mixture, proportions, loss, run, samples_seen: int) -> None:
    total = sum(proportions.values())
    streamed = not isinstance(mixture, Dataset)
    if streamed:
        # A stream has no length: each task's expected share of the samples the trainer took (not of max_steps,
        # which a stream that ran dry never reached), marked as an estimate.
        counts = {task: math.floor(samples_seen * weight / total) for task, weight in proportions.items()}
        shares = {task: weight / total for task, weight in proportions.items()}
    else:
        # The samples of the training set: its realised mix, which a source with too few samples makes differ
        # from the proportions asked for.
        counts = {task: 0 for task in proportions}
        for task in mixture["task"]:
            counts[task] += 1
        shares = {task: count / max(sum(counts.values()), 1) for task, count in counts.items()}
    model.model_card_data.training_mix = {
        task: {"samples": counts[task], "share": shares[task], "estimated": streamed}
        for task in TASK_NAMES
        if task in proportions
    }
    model.model_card_data.loss_settings = {
        "loss": type(loss).__name__,
        **loss.get_config_dict(),
    }
    model.model_card_data.evaluation = [
        {"metric": metric, "before": run.before.get(metric), "after": run.after.get(metric)}
        for metric in dict.fromkeys([*run.before, *run.after])
    ]
