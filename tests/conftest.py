"""Shared fixtures: the offline tiny Qwen2-VL and viOmni models built on it (no hub, no download)."""

from __future__ import annotations

import os

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
