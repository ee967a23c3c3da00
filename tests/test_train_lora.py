"""A recipe with a `lora:` section, run end to end on the tiny model (needs peft, in the dev extra): what
trains, what is saved, what loads, what a `hub:` section and `st-viomni push` send to the Hub (against
conftest.py's FakeHub) and when they refuse, how a run resumes, and the errors for LoRA settings that cannot
work.

One run (a few seconds on 2 cores) is shared by the tests that take `lora_run`.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import TrainerCallback

from st_viomni import format_input
from st_viomni.cli import main
from st_viomni.recipe import RecipeError, parse_recipe
from st_viomni.train import run_recipe

REPO_ID = "erax/viOmniQwen-lora-tiny"
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _raw_recipe(output_dir: str, **sections) -> dict:
    raw = {
        "model": {"base": "tiny", "embedding_dim": 32, "seed": 0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS},
        "data": {
            "train": [{"mini": 8, "split": "train"}],
            "eval": [{"mini": 8, "split": "test"}],
            "proportions": {task: 1 for task in ("text_pair", "instr", "ocr", "vqa_single", "vqa_multi")},
        },
        "loss": {"cached": True, "mini_batch_size": 4},
        "training": {
            "output_dir": output_dir,  # relative, as in the shipped recipes
            "num_train_epochs": 2,
            "per_device_train_batch_size": 8,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            "seed": 0,
        },
    }
    raw.update(sections)
    return raw


class _Snapshot(TrainerCallback):
    """Keeps the weights as training starts (adapters already added) and the trained in-memory model."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        self.trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora")
    snapshot = _Snapshot()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(workdir)
        run = run_recipe(parse_recipe(_raw_recipe("run")), callbacks=[snapshot])
    return run, snapshot, workdir / "run"


def test_only_the_adapters_and_the_dense_head_train(lora_run):
    run, snapshot, _ = lora_run
    assert [entry for entry in run.log_history if "loss" in entry], "no training step was logged"
    after = snapshot.model.state_dict()
    changed = {name for name, tensor in snapshot.before.items() if not torch.equal(tensor, after[name])}
    adapter = {name for name in snapshot.before if ".lora_" in name}
    dense = {name for name in snapshot.before if name.startswith("2.")}  # modules: 0 Qwen2-VL, 1 Pooling, 2 Dense
    # Trainable: the adapters and the Dense head (as recipes/viomni-2b-lora.yaml says), nothing of Qwen2-VL.
    assert snapshot.trainable == adapter | dense
    assert any(".lora_B." in name for name in changed) and dense <= changed
    # Every base Qwen2-VL weight (embeddings, vision tower, the adapted layers' own weights) is untouched.
    assert changed <= adapter | dense, sorted(changed - adapter - dense)[:5]
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter}
    assert adapted == set(TARGETS)


def test_final_holds_adapters_in_safetensors_and_loads_with_plain_sentence_transformers(lora_run, tmp_path,
                                                                                        monkeypatch):
    run, snapshot, output_dir = lora_run
    final = output_dir / "final"
    assert run.model_dir == os.path.join("run", "final")
    weights = load_file(final / "adapter_model.safetensors")
    assert weights and all(".lora_A." in name or ".lora_B." in name for name in weights)
    assert not (final / "model.safetensors").exists()  # the base is not copied into every adapter model
    assert not list(final.rglob("*.bin")) and (final / "2_Dense" / "model.safetensors").is_file()
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    assert sorted(adapter_config["target_modules"]) == sorted(TARGETS)
    # The tiny base lives in a scratch directory during the run; the adapters point at a copy that outlives it.
    assert adapter_config["base_model_name_or_path"] == str(output_dir / "tiny-base-seed0")

    image = Image.new("RGB", (90, 70), (200, 30, 30))
    calls = [
        (["Con mèo ngồi trên tấm thảm.", "The cat sat on the mat."], "text_pair"),
        ([image], "ocr"),
        ([format_input("vqa_single", "Màu gì?", [image])], None),
    ]
    trained = snapshot.model
    expected = [trained.encode(inputs, prompt_name=prompt) for inputs, prompt in calls]
    monkeypatch.chdir(tmp_path)  # another working directory than the run's
    loaded = SentenceTransformer(str(final))
    assert type(loaded) is SentenceTransformer
    for (inputs, prompt), want in zip(calls, expected):
        np.testing.assert_allclose(loaded.encode(inputs, prompt_name=prompt), want, rtol=0, atol=1e-5)

    # The equality above is not vacuous: without its adapters the model embeds differently.
    loaded.transformers_model.disable_adapters()
    without = loaded.encode(calls[0][0], prompt_name="text_pair")
    assert np.abs(without - expected[0]).max() > 1e-3


def test_hub_section_pushes_adapters_that_name_the_base_by_its_hub_id(tmp_path, monkeypatch, fake_hub,
                                                                       tiny_base_on_the_hub):
    monkeypatch.chdir(tmp_path)
    raw = _raw_recipe("run", hub={"repo_id": REPO_ID, "private": True})
    raw["model"]["base"] = tiny_base_on_the_hub
    raw["training"]["max_steps"] = 1
    run = run_recipe(parse_recipe(raw))
    assert fake_hub.repos == [{"repo_id": REPO_ID, "private": True}]
    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == REPO_ID
    files = upload["files"]
    final = tmp_path / "run" / "final"
    saved = {str(path.relative_to(final)) for path in final.rglob("*") if path.is_file()}
    assert set(files) == saved  # the same files as final/
    for required in ("adapter_model.safetensors", "adapter_config.json", "2_Dense/config.json", *fake_hub.MODEL_FILES):
        assert required in files, required
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    # Whoever loads the repository finds the base by this name.
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == tiny_base_on_the_hub
    assert b"<vqa_multi>" in files["chat_template.jinja"]
    card = files["README.md"].decode()
    assert f'SentenceTransformer("{REPO_ID}")' in card
    assert "pip install -U sentence-transformers torchvision peft\n" in card  # adapters load with peft
    # The evaluation table: every metric of the run, before and after training.
    assert "| metric | before training | after training |" in card
    for metric in run.after:
        assert f"| {metric} | {run.before[metric]:.4f} | {run.after[metric]:.4f} |" in card


@pytest.mark.parametrize("base, what", [("tiny", "the offline tiny model"), (".", "a local path")])
def test_a_hub_section_with_lora_on_a_local_base_is_refused_before_training(base, what):
    raw = _raw_recipe("run", hub={"repo_id": REPO_ID})
    raw["model"]["base"] = base
    with pytest.raises(RecipeError, match=rf"^hub: a LoRA model loads its base .* is {what}: {REPO_ID} would not "
                                          r"load on any other machine; set model.base to the base's Hub id"):
        parse_recipe(raw)


def test_push_refuses_adapters_on_a_local_base_and_sends_them_once_it_is_a_hub_id(lora_run, tmp_path, fake_hub,
                                                                                 tiny_base_on_the_hub, capsys):
    _, _, output_dir = lora_run
    model_dir = tmp_path / "final"
    shutil.copytree(output_dir / "final", model_dir)
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(model_dir), "--repo-id", REPO_ID])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "adapter_config.json: base_model_name_or_path" in error and str(output_dir / "tiny-base-seed0") in error
    assert fake_hub.repos == [] and fake_hub.uploads == []

    # The fix the message asks for: name the base by its Hub id (the same weights, served by the Hub cache).
    config_path = model_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = tiny_base_on_the_hub
    config_path.write_text(json.dumps(config))
    assert main(["push", str(model_dir), "--repo-id", REPO_ID]) == 0
    (upload,) = fake_hub.uploads
    # push saves the loaded model again: the same adapters (peft marks a loaded adapter inference_mode).
    pushed_config = json.loads(upload["files"]["adapter_config.json"])
    assert {key: value for key, value in pushed_config.items() if config[key] != value} == {"inference_mode": True}
    (tmp_path / "pushed.safetensors").write_bytes(upload["files"]["adapter_model.safetensors"])
    pushed, saved = load_file(tmp_path / "pushed.safetensors"), load_file(model_dir / "adapter_model.safetensors")
    assert pushed.keys() == saved.keys() and all(torch.equal(pushed[name], saved[name]) for name in saved)


def test_a_lora_run_resumes_from_its_checkpoint_exactly(tmp_path, monkeypatch):
    # A checkpoint holds adapters only: resuming rebuilds the model on the base the adapter config names (the
    # tiny base's copy in the output directory) and must continue as if never stopped.
    monkeypatch.chdir(tmp_path)
    raw = _raw_recipe("run")
    raw["data"]["eval"] = []
    raw["training"].update(max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=None)
    first = run_recipe(parse_recipe(raw))
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    for stale in ("checkpoint-4", "final"):  # as if killed after step 2
        shutil.rmtree(tmp_path / "run" / stale)
    resumed = run_recipe(parse_recipe(raw))
    assert resumed.resumed_from == os.path.join("run", "checkpoint-2")

    def losses(run):
        return {entry["step"]: entry["loss"] for entry in run.log_history if "loss" in entry}

    assert set(losses(resumed)) == {1, 2, 3, 4}
    assert losses(resumed)[4] == pytest.approx(losses(first)[4], rel=1e-5)
    assert losses(resumed)[3] == pytest.approx(losses(first)[3], rel=1e-5)


@pytest.mark.parametrize(
    "targets, message",
    [
        # A typo, next to a valid name: peft would silently adapt only q_proj.
        (["q_proj", "qkv_proj"], r"lora\.target_modules: no layer of the qwen2_vl model is named 'qkv_proj'; "
                                 r"its linear layers are named .*mlp\.0.*q_proj, qkv, up_proj, v_proj$"),
        (["self_attn"], r"lora\.target_modules: no layer .* named 'self_attn'"),  # a block, not a layer
        (["norm"], r"lora\.target_modules: .*not supported"),  # a layer peft cannot adapt (peft's own words)
    ],
)
def test_target_modules_that_cannot_be_adapted_name_the_key(tmp_path, monkeypatch, targets, message):
    monkeypatch.chdir(tmp_path)
    raw = _raw_recipe("run", lora={"target_modules": targets})
    with pytest.raises(RecipeError, match=message):
        run_recipe(parse_recipe(raw))
    assert not (tmp_path / "run" / "final").exists()


def test_a_peft_release_too_old_for_transformers_is_named_before_training(tmp_path, monkeypatch):
    from transformers.integrations import peft as transformers_peft

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "99.0")
    with pytest.raises(RecipeError, match=r"^lora: transformers \S+ needs peft >= 99\.0, and peft \S+ is installed"):
        run_recipe(parse_recipe(_raw_recipe("run")))
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"r": 0}, r"lora\.r: expected a positive rank"),
        ({"alpha": -8}, r"lora\.alpha: expected a positive"),
        ({"dropout": 1.0}, r"lora\.dropout: expected a probability"),
        ({"target_modules": []}, r"lora\.target_modules: expected a non-empty list"),
        ({"target_modules": ["q_proj", 3]}, r"lora\.target_modules: expected a non-empty list"),
        ({"target_modules": "q_proj"}, r"lora\.target_modules: expected a list"),
        ({"rank": 8}, r"lora\.rank: unknown key .*closest: r"),
    ],
)
def test_bad_lora_sections_name_the_key(lora, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_raw_recipe("run", lora=lora))
