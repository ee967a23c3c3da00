"""Every command has --help; bad arguments give a one-line error and exit status 2, never a traceback."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from st_viomni.cli import main

COMMANDS = ["build", "encode", "demo", "train", "evaluate", "push"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: st-viomni " + command in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "st_viomni.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and all(command in result.stdout for command in COMMANDS)


def test_build_saves_a_model_that_loads_with_the_asked_dimension(tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    assert main(["build", str(tmp_path / "model"), "--base", "tiny", "--embedding-dim", "16"]) == 0
    assert capsys.readouterr().out.strip().startswith("saved a 16-d viOmni model on tiny to ")
    model = SentenceTransformer(str(tmp_path / "model"))
    assert model.encode(["x"], prompt_name="text_pair").shape == (1, 16)
    assert model.prompts["ocr"] == "<ocr>"  # the task prefixes travel with the saved model


def test_encode_prints_or_saves_an_embedding(tiny_model, tmp_path, capsys):
    tiny_model.save(str(tmp_path / "model"))
    image = tmp_path / "red.png"
    Image.new("RGB", (80, 60), "red").save(image)
    output = tmp_path / "embedding.npy"
    assert main(["encode", str(tmp_path / "model"), "--task", "vqa_single", "--text", "Màu gì?",
                 "--image", str(image), "--output", str(output)]) == 0
    saved = np.load(output)
    expected = tiny_model.encode([{"image": str(image), "text": "Màu gì?"}], prompt_name="vqa_single")
    np.testing.assert_allclose(saved, expected, atol=1e-6)
    assert main(["encode", str(tmp_path / "model"), "--task", "text_pair", "--text", "xin chào"]) == 0
    assert "[[" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["encode", "{tmp}/no-model", "--task", "ocr", "--text", "x"], "model directory not found"),
        (["encode", "{tmp}/no-model", "--task", "ocr", "--image", "{tmp}/missing.png"], "image file not found"),
        (["encode", "{tmp}/no-model", "--task", "ocr", "--image", "{tmp}/corrupt.png"], "cannot decode image file"),
        (["encode", "{tmp}/no-model", "--task", "ocr"], "needs text or at least one image"),
        (["train", "{tmp}/missing.yaml"], "recipe not found"),
        (["train", "{tmp}/typo.yaml"], "loss.temprature: unknown key"),
        # YAML reads 1e-5 as a string: refused at load, not a traceback from the optimizer after the model load.
        (["train", "{tmp}/lr.yaml"], "training.learning_rate: expected float, got '1e-5'"),
        (["evaluate", "{tmp}/no-model", "--mini", "2"], "model directory not found"),
        # ORG/NAME is a Hub id or a mistyped relative directory (here: offline, and not a directory of the cwd)
        (["evaluate", "out/final", "--mini", "2"], "model not found: 'out/final' is no local directory, and "
                                                   "loading it from the Hub failed: "),
        (["evaluate", "{tmp}/model", "--mini", "1"],
         "no evaluator can be built from these samples (text_pair 1, instr 1, ocr 1, vqa_single 1, vqa_multi 1): "
         "text_pair: nothing to rank"),
    ],
)
def test_bad_arguments_give_a_one_line_error(tiny_base, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    if "{tmp}/model" in argv:
        from st_viomni import build_model

        build_model(tiny_base, embedding_dim=32).save(str(tmp_path / "model"))
        capsys.readouterr()
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "typo.yaml").write_text(
        "model: {base: tiny}\ndata: {train: [{mini: 2}]}\nloss: {temprature: 0.1}\ntraining: {output_dir: o}\n"
    )
    (tmp_path / "lr.yaml").write_text(
        "model: {base: tiny}\ndata: {train: [{mini: 2}]}\ntraining: {output_dir: o, learning_rate: 1e-5}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(tmp=tmp_path) for arg in argv])
    assert exit_info.value.code == 2
    # One error line, after the progress bar of a model that loads.
    stderr = capsys.readouterr().err
    error = stderr.rstrip("\n").split("\n")[-1]
    assert "Traceback" not in stderr and stderr.endswith(error + "\n")
    assert error.startswith("st-viomni: error: ") and message in error, error


def test_a_malformed_data_file_gives_a_one_line_error(tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1.0}\nnot json\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{base: tiny}}\ndata: {{train: [{{task: text_pair, json: {tmp_path / 'pairs.jsonl'}}}]}}\n"
        f"training: {{output_dir: {tmp_path / 'out'}}}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(recipe)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err  # after datasets' progress bars
    # datasets' DatasetGenerationError ("An error occurred while generating the dataset") with what its cause says
    assert "Traceback" not in error and error.splitlines()[-1].startswith("st-viomni: error: ")
    assert "JSON parse error" in error.splitlines()[-1], error


def test_evaluate_prints_every_headline_metric(tiny_model, tmp_path, capsys):
    tiny_model.save(str(tmp_path / "model"))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "model"), "--mini", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "value"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["accuracy@1/text_pair", "accuracy@1/instr", "accuracy@1/ocr", "accuracy@1/vqa_single",
                     "accuracy@1/vqa_multi", "image_to_text_accuracy@1", "text_to_image_accuracy@1",
                     "text_pair_spearman"]
    assert all(-1 <= float(line.split()[1]) <= 1 for line in lines[1:])


def test_a_sample_count_below_one_names_the_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "model", "--mini", "-2"])
    assert exit_info.value.code == 2
    assert "argument --mini: expected a positive integer, got '-2'" in capsys.readouterr().err


def test_unknown_task_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "model", "--task", "caption", "--text", "x"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'caption'" in capsys.readouterr().err


def test_encode_prints_the_path_it_wrote(tiny_model, tmp_path, capsys):
    tiny_model.save(str(tmp_path / "model"))
    capsys.readouterr()
    assert main(["encode", str(tmp_path / "model"), "--task", "text_pair", "--text", "x",
                 "--output", str(tmp_path / "e")]) == 0
    assert capsys.readouterr().out.strip().endswith(f"to {tmp_path / 'e.npy'}")  # np.save appended .npy
    assert np.load(tmp_path / "e.npy").shape == (1, 32)


class _Loaded(Exception):
    pass


def test_evaluate_with_a_recipe_draws_the_recipes_eval_set(tmp_path, monkeypatch):
    from st_viomni.data import sources

    seeds = []

    def load_samples_by_task(recipe_sources, **kwargs):
        seeds.append(kwargs.get("seed", 0))
        raise _Loaded  # what matters is the seed; no model is needed

    monkeypatch.setattr(sources, "load_samples_by_task", load_samples_by_task)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: {base: tiny}\ndata: {seed: 42, train: [{mini: 2}], eval: [{mini: 3, split: test}]}\n"
        "training: {output_dir: o}\n"
    )
    with pytest.raises(_Loaded):
        main(["evaluate", str(tmp_path / "model"), "--recipe", str(recipe)])
    assert seeds == [42]  # what run_recipe evaluates on: the mini draws depend on the seed
