"""Shared fixtures: the offline tiny Qwen2-VL and viOmni models built on it (no hub, no download), a
stand-in for the Hub API that records uploads instead of sending them, and a Hub cache that serves the tiny
base under a Hub id offline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_EMBEDDING_DIM = 32


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Path of a tiny random-weight Qwen2-VL base checkpoint (bare Qwen2VLModel weights)."""
    from st_viomni.testing import make_tiny_base_model

    return make_tiny_base_model(tmp_path_factory.mktemp("tiny-qwen2-vl"), seed=0)


@pytest.fixture
def tiny_model(tiny_base):
    """A fresh viOmni model on the tiny base (Dense to 32 dims), safe to train or mutate."""
    import torch

    from st_viomni import build_model

    torch.manual_seed(0)
    return build_model(tiny_base, embedding_dim=TINY_EMBEDDING_DIM)


@pytest.fixture(scope="session")
def run_on_two_processes():
    """``run(script, *args, timeout=...)``: the script under torchrun in two processes (gloo on CPU, one thread
    each, offline), returning the completed process."""

    def run(script, *args, timeout: float) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
        return subprocess.run([*command, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)

    return run


class FakeHub:
    """Records what push_to_hub (`st-viomni push`, a recipe's `hub:` section) sends to the Hub API instead of
    sending it: the repositories created, with their visibility, and every uploaded file's bytes."""

    MODEL_FILES = (
        "modules.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "1_Pooling/config.json",
        "2_Dense/model.safetensors",
        "README.md",
    )
    """Files every pushed viOmni model carries besides its Qwen2-VL weights (a full model or LoRA adapters)."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def install(self, monkeypatch) -> FakeHub:
        import huggingface_hub

        api = huggingface_hub.HfApi
        monkeypatch.setattr(api, "create_repo", lambda hf_api, *a, **k: self.create_repo(hf_api, *a, **k))
        monkeypatch.setattr(api, "upload_folder", lambda hf_api, *a, **k: self.upload_folder(hf_api, *a, **k))
        return self

    def create_repo(self, api, repo_id, private=None, exist_ok=False, **kwargs):
        import huggingface_hub

        self.repos.append({"repo_id": repo_id, "private": private})
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, repo_id, folder_path, **kwargs):
        import huggingface_hub

        files = {}
        for root, _, names in os.walk(folder_path):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as file:
                    files[os.path.relpath(path, folder_path)] = file.read()
        self.uploads.append({"repo_id": repo_id, "files": files})
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="", commit_description="",
            oid="0" * 40,
        )


@pytest.fixture
def fake_hub(monkeypatch):
    """A FakeHub in place of the Hub API for one test."""
    return FakeHub().install(monkeypatch)


TINY_BASE_HUB_ID = "erax/tiny-qwen2-vl-base"


@pytest.fixture(scope="module")
def tiny_base_on_the_hub(tiny_base, tmp_path_factory):
    """``TINY_BASE_HUB_ID``, loadable offline: the tiny base placed in a fresh Hub cache the way a download
    leaves it (a snapshot and the ``main`` ref), for a whole module."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hub-cache")
    commit = "0" * 40
    repo = cache / f"models--{TINY_BASE_HUB_ID.replace('/', '--')}"
    shutil.copytree(tiny_base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        yield TINY_BASE_HUB_ID
