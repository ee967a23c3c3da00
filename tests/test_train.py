"""End to end: `st-viomni train` on the tiny model, under torchrun (2 CPU processes, gloo), and resuming."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sentence_transformers import SentenceTransformer

from st_viomni.recipe import parse_recipe
from st_viomni.train import _skipped_rows, _training_data, last_complete_checkpoint, run_recipe

RECIPES = Path(__file__).parent.parent / "recipes"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _write_recipe(path: Path, output_dir: Path, **training) -> Path:
    recipe = yaml.safe_load((RECIPES / "tiny-cpu.yaml").read_text())
    recipe["training"]["output_dir"] = str(output_dir)
    recipe["training"].update(training)
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_tiny_cpu_recipe_trains_under_torchrun_with_two_processes(tmp_path):
    recipe = _write_recipe(tmp_path / "recipe.yaml", tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "st_viomni.cli", "train", str(recipe)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    print("\n".join(f"{name:26s} {before[name]:.3f} -> {after[name]:.3f}" for name in before))
    assert set(before) == set(after) and len(before) == 8
    assert sum(after.values()) > sum(before.values()) + 0.5  # improves clearly overall...
    improved = [name for name in before if after[name] > before[name]]
    assert len(improved) >= 7, (before, after)  # ...and on (almost) every metric
    logged = [entry for entry in metrics["log_history"] if "loss" in entry]
    # One data-parallel job (DDP over gloo), not two single-process runs: an epoch of at most 5 tasks x 300
    # samples takes global batches of 2 processes x 16 (a process alone would take twice the steps).
    recipe_values = yaml.safe_load(recipe.read_text())
    global_batch = 2 * recipe_values["training"]["per_device_train_batch_size"]
    samples = 5 * recipe_values["data"]["train"][0]["mini"]
    last_step = max(entry["step"] for entry in metrics["log_history"])
    assert last_step <= recipe_values["training"]["num_train_epochs"] * samples // global_batch
    for task in ("text_pair", "instr", "ocr", "vqa_single", "vqa_multi"):
        # The share of the loss, and the mean over the task's samples of both processes (all-reduced).
        assert f"loss_{task}" in logged[-1] and logged[-1][f"mean_loss_{task}"] > 0

    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").is_file() and (final / "README.md").is_file()
    model = SentenceTransformer(str(final))
    assert type(model) is SentenceTransformer and model.encode(["xin chào"], prompt_name="text_pair").shape == (1, 64)


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    small = {"num_train_epochs": 2, "save_steps": 4, "save_total_limit": 10, "logging_steps": 1}
    data = {"train": [{"mini": 16, "split": "train"}], "eval": []}

    def recipe_for(name):
        path = _write_recipe(tmp_path / f"{name}.yaml", tmp_path / name, **small)
        recipe = yaml.safe_load(path.read_text())
        recipe["data"].update(data)
        recipe["loss"]["gather_across_devices"] = False
        recipe["training"]["per_device_train_batch_size"] = 8
        path.write_text(yaml.safe_dump(recipe))
        return [sys.executable, "-m", "st_viomni.cli", "train", str(path)]

    reference = subprocess.run(recipe_for("reference"), capture_output=True, text=True, env=ENV, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    command = recipe_for("killed")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while last_complete_checkpoint(str(tmp_path / "killed")) is None and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "final").exists()  # it really was cut short
    checkpoint = last_complete_checkpoint(str(tmp_path / "killed"))
    assert (Path(checkpoint) / "model.safetensors").is_file()
    assert (Path(checkpoint) / "2_Dense" / "model.safetensors").is_file()
    assert not list(Path(checkpoint).rglob("pytorch_model*.bin"))  # weights are safetensors, never pickles

    resumed = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    killed_metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    reference_metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert killed_metrics["resumed_from"] is not None and reference_metrics["resumed_from"] is None

    def losses(metrics):
        return {entry["step"]: entry["loss"] for entry in metrics["log_history"] if "loss" in entry}

    reference_losses, resumed_losses = losses(reference_metrics), losses(killed_metrics)
    last_step = max(reference_losses)
    assert max(resumed_losses) == last_step
    assert abs(resumed_losses[last_step] - reference_losses[last_step]) <= 1e-3 * max(1.0, reference_losses[last_step])


def test_an_interrupted_checkpoint_write_is_skipped(tmp_path):
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text('{"global_step": %d}' % step)
    (tmp_path / "checkpoint-16").mkdir()
    (tmp_path / "checkpoint-16" / "trainer_state.json").write_text('{"global_st')  # truncated by the kill
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-8")
    assert last_complete_checkpoint(str(tmp_path / "nothing")) is None


class _Built(Exception):
    pass


@pytest.mark.parametrize("training, batch_size", [({}, 32), ({"per_device_eval_batch_size": 3}, 3)])
def test_the_evaluators_encode_per_device_eval_batch_size_rows_at_a_time(tmp_path, monkeypatch, training, batch_size):
    from st_viomni import train

    built = []

    def build_evaluator(samples, batch_size):
        built.append(batch_size)
        raise _Built  # what matters is the batch size; no model is needed

    monkeypatch.setattr(train, "build_evaluator", build_evaluator)
    recipe = parse_recipe({"model": {"base": "tiny"},
                           "data": {"train": [{"mini": 2}], "eval": [{"mini": 2, "split": "test"}]},
                           "training": {"output_dir": str(tmp_path / "run"), **training}})
    with pytest.raises(_Built):
        run_recipe(recipe)
    assert built == [batch_size]


@pytest.mark.parametrize("streaming", [False, True])
def test_validation_counts_every_source_row_once(tmp_path, streaming):
    rows = tmp_path / "pairs.jsonl"
    with rows.open("w") as file:
        for i in range(200):  # every other score is outside [0, 5]
            row = {"sentence1": f"a {i}", "sentence2": f"b {i}", "score": 7.0 if i % 2 else 3.0}
            file.write(json.dumps(row) + "\n")
    recipe = parse_recipe({
        "model": {"base": "tiny"},
        "data": {"train": [{"task": "text_pair", "json": str(rows), "score_range": [0, 5]}], "streaming": streaming},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
    })
    _, _, train_dataset, reports = _training_data(recipe)
    assert sum(1 for _ in train_dataset) == 100
    # The adapters saw 200 rows; build_training_dataset's safety net saw their 100 samples, in its own report.
    assert reports[0].summary().startswith("100 of 200 rows kept, 100 skipped: score_out_of_range 100")
    assert (reports[1].rows_seen, reports[1].rows_skipped) == (100, 0)
    assert _skipped_rows(recipe, reports) == {"score_out_of_range": 100}


def test_a_stream_that_runs_dry_is_reported_and_not_counted_as_trained(tmp_path, caplog):
    # 4 samples, batches of 8 without a short last one: the stream yields no batch, and the trainer stops at step 0.
    recipe = parse_recipe({
        "model": {"base": "tiny", "embedding_dim": 8},
        "data": {"train": [{"mini": 4, "task": "text_pair"}], "streaming": True},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 5, "per_device_train_batch_size": 8,
                     "dataloader_drop_last": True, "dataloader_num_workers": 1, "save_strategy": "no"},
    })
    with caplog.at_level(logging.WARNING, logger="st_viomni.train"):
        run = run_recipe(recipe)
    assert "training stopped after 0 of 5 planned steps: the training data ran out" in caplog.text
    card = (Path(run.model_dir) / "README.md").read_text(encoding="utf-8")
    assert "| `text_pair` | ≈ 0 | 100.0% |" in card  # not max_steps x batch = 40
    assert "The training data was a stream, which has no length" in card
    # The stream was validated in the DataLoader worker: the main process has no counts to report.
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_rows"]
    assert skipped.startswith("unknown: the stream was validated in 1 DataLoader worker processes")
