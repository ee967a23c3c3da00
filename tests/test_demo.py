from st_viomni.demo import DEMO_RECIPE, format_metrics_table
from st_viomni.plots import plot_run
from st_viomni.recipe import parse_recipe


def test_the_demo_is_a_valid_recipe_on_the_tiny_model_and_mini_mixture():
    recipe = parse_recipe({**DEMO_RECIPE, "training": {**DEMO_RECIPE["training"], "output_dir": "o"}})
    assert recipe.model.base == "tiny"
    assert [source.mini for source in recipe.data.train] == [1000]
    assert [source.split for source in recipe.data.eval] == ["test"]


def test_metrics_table_shows_before_after_and_change():
    table = format_metrics_table({"recall@1/ocr": 0.05, "text_pair_spearman": 0.2},
                                 {"recall@1/ocr": 0.25, "text_pair_spearman": 0.9})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "before", "after", "change"]
    assert lines[2].split() == ["recall@1/ocr", "0.050", "0.250", "+0.200"]
    assert lines[3].split() == ["text_pair_spearman", "0.200", "0.900", "+0.700"]


def test_plot_is_written(tmp_path):
    history = [{"step": step, "loss": 2.0 / step, "loss_ocr": 1.0 / step, "loss_instr": 0.5 / step} for step in (1, 2, 3)]
    path = plot_run(history, {"recall@1/ocr": 0.1}, {"recall@1/ocr": 0.4}, tmp_path / "training.png")
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("training.png")
