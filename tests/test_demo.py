import math

import pytest

import json

from st_viomni import demo
from st_viomni.demo import DEMO_RECIPE, format_metrics_table
from st_viomni.plots import loss_curves, plot_run
from st_viomni.recipe import parse_recipe


def test_the_demo_is_a_valid_recipe_on_the_tiny_model_and_mini_mixture():
    recipe = parse_recipe({**DEMO_RECIPE, "training": {**DEMO_RECIPE["training"], "output_dir": "o"}})
    assert recipe.model.base == "tiny"
    assert [source.mini for source in recipe.data.train] == [1000]
    assert [source.split for source in recipe.data.eval] == ["test"]


def test_run_demo_trains_evaluates_and_writes_model_plot_and_metrics(tmp_path, monkeypatch, capsys):
    # The demo's own code path on a smaller run (the full demo runs in CI: .ci/run).
    small = {**DEMO_RECIPE,
             "data": {**DEMO_RECIPE["data"], "train": [{"mini": 16, "split": "train"}],
                      "eval": [{"mini": 6, "split": "test"}]},
             "training": {**DEMO_RECIPE["training"], "num_train_epochs": 1, "per_device_train_batch_size": 16,
                          "logging_steps": 1}}
    monkeypatch.setattr(demo, "DEMO_RECIPE", small)
    run = demo.run_demo(tmp_path / "demo")
    out = capsys.readouterr().out
    assert "\nmetric " in out and out.split("\nmetric ", 1)[1].split()[:3] == ["before", "after", "change"]
    assert set(run.after) == set(run.before) and "text_pair_spearman" in run.after
    for name in run.after:
        assert f"{run.before[name]:.3f}" in out and f"{run.after[name]:.3f}" in out
    assert (tmp_path / "demo" / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["after"] == run.after
    assert (tmp_path / "demo" / "final" / "modules.json").is_file()
    assert [entry for entry in run.log_history if "loss" in entry], "no training step was logged"


def test_metrics_table_shows_before_after_and_change():
    table = format_metrics_table({"accuracy@1/ocr": 0.05, "text_pair_spearman": 0.2},
                                 {"accuracy@1/ocr": 0.25, "text_pair_spearman": 0.9})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "before", "after", "change"]
    assert lines[2].split() == ["accuracy@1/ocr", "0.050", "0.250", "+0.200"]
    assert lines[3].split() == ["text_pair_spearman", "0.200", "0.900", "+0.700"]


def test_plot_draws_the_batch_loss_and_each_logged_task():
    history = [{"step": 1, "loss": 2.0, "mean_loss_ocr": 1.0}, {"step": 2, "loss": 1.0, "mean_loss_instr": 0.5},
               {"eval_loss": 3.0, "step": 2}]  # an evaluation log has no training loss
    curves = loss_curves(history)
    assert list(curves) == ["loss (batch mean)", "mean_loss_instr", "mean_loss_ocr"]
    assert curves["loss (batch mean)"] == ([1, 2], [2.0, 1.0])
    steps, ocr = curves["mean_loss_ocr"]
    assert steps == [1, 2] and ocr[0] == 1.0 and math.isnan(ocr[1])


@pytest.mark.parametrize("before, after", [({"accuracy@1/ocr": 0.1}, {"accuracy@1/ocr": 0.4}), ({}, {})])
def test_plot_is_written_with_or_without_metrics(tmp_path, before, after):
    history = [{"step": step, "loss": 2.0 / step, "mean_loss_ocr": 1.0 / step} for step in (1, 2, 3)]
    path = plot_run(history, before, after, tmp_path / "training.png")
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("training.png")
