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
        (["evaluate", "{tmp}/no-model", "--mini", "2"], "model directory not found"),
    ],
)
def test_bad_arguments_give_a_one_line_error(tmp_path, capsys, argv, message):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "typo.yaml").write_text(
        "model: {base: tiny}\ndata: {train: [{mini: 2}]}\nloss: {temprature: 0.1}\ntraining: {output_dir: o}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main([arg.format(tmp=tmp_path) for arg in argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("st-viomni: error: ") and message in error and error.count("\n") == 1, error


def test_unknown_task_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "model", "--task", "caption", "--text", "x"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'caption'" in capsys.readouterr().err
