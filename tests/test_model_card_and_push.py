"""The model card written by save()/push_to_hub(), and `st-viomni push` against a stand-in for the Hub API
(the `fake_hub` fixture of conftest.py)."""

import os
import re
import subprocess
import sys

import pytest

from st_viomni.cli import main


def _usage_snippet(card: str) -> str:
    usage = card.split("## Usage", 1)[1]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def test_card_shows_tasks_training_and_evaluation(tiny_model, tmp_path):
    tiny_model.model_card_data.training_mix = {"ocr": {"samples": 2_500_000, "share": 0.223, "estimated": False}}
    tiny_model.model_card_data.loss_settings = {"loss": "PrefixRoutedLoss", "temperature": 0.05}
    tiny_model.model_card_data.evaluation = [{"metric": "ocr accuracy@1", "before": 0.125, "after": 0.75}]
    tiny_model.save(str(tmp_path))
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    for name, prefix in [("text_pair", "<text_pair>"), ("ocr", "<ocr>"), ("vqa_multi", "<vqa_multi>")]:
        assert f"| `{name}` | `{prefix}` |" in card
    assert "| `ocr` | 2,500,000 | 22.3% |" in card
    assert "The samples of each task in the training set (each seen once per epoch)" in card
    assert "pip install -U sentence-transformers torchvision\n" in card  # a full model needs no peft
    assert "| temperature | `0.05` |" in card
    assert "| ocr accuracy@1 | 0.1250 | 0.7500 |" in card
    assert "viOmniQwen: Unified Multimodal Embeddings via Prefix-Guided Dynamic Loss Optimization" in card
    assert "**Output dimensionality:** 32" in card


def test_card_usage_snippet_runs_against_the_saved_model(tiny_model, tmp_path):
    tiny_model.save(str(tmp_path / "model"))
    snippet = _usage_snippet((tmp_path / "model" / "README.md").read_text(encoding="utf-8"))
    assert 'SentenceTransformer("sentence_transformers_model_id")' in snippet
    for form in ('prompt_name="text_pair"', 'prompt_name="ocr"', '{"image": scene, "text"', '"image": [scene,'):
        assert form in snippet
    script = snippet.replace("sentence_transformers_model_id", str(tmp_path / "model"))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(2, 32) (32,) (32,)" in result.stdout


def test_push_uploads_the_complete_model(tiny_model, tmp_path, fake_hub, capsys):
    tiny_model.save(str(tmp_path / "model"))
    assert main(["push", str(tmp_path / "model"), "--repo-id", "erax/viOmniQwen-tiny", "--private"]) == 0
    assert fake_hub.repos == [{"repo_id": "erax/viOmniQwen-tiny", "private": True}]
    (upload,) = fake_hub.uploads
    files = upload["files"]
    for required in ("model.safetensors", "config.json", *fake_hub.MODEL_FILES):
        assert required in files, required
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    card = files["README.md"].decode()
    assert 'SentenceTransformer("erax/viOmniQwen-tiny")' in card
    assert b"<|vision_start|>" in files["chat_template.jinja"] and b"<vqa_multi>" in files["chat_template.jinja"]
    assert "pushed" in capsys.readouterr().out


def test_push_renders_a_card_for_a_model_saved_without_one(tiny_model, tmp_path, fake_hub):
    tiny_model.save(str(tmp_path / "model"), create_model_card=False)
    assert not (tmp_path / "model" / "README.md").exists()
    assert main(["push", str(tmp_path / "model"), "--repo-id", "erax/viOmniQwen-tiny"]) == 0
    (upload,) = fake_hub.uploads
    card = upload["files"]["README.md"].decode()
    assert 'SentenceTransformer("erax/viOmniQwen-tiny")' in card and "| `ocr` | `<ocr>` |" in card


@pytest.mark.parametrize(
    "argv, message",
    [
        (["push", "{tmp}/nothing-here", "--repo-id", "erax/x"], "not a saved sentence-transformers model"),
        (["push", "{model}", "--repo-id", "no-slash"], "--repo-id must look like ORG/NAME"),
    ],
)
def test_push_bad_arguments_give_a_one_line_error(tiny_model, tmp_path, fake_hub, capsys, argv, message):
    tiny_model.save(str(tmp_path / "model"))
    argv = [arg.format(tmp=tmp_path, model=tmp_path / "model") for arg in argv]
    capsys.readouterr()  # drop the progress bars of save()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("st-viomni: error: ") and message in error and error.count("\n") == 1
    assert fake_hub.uploads == []
