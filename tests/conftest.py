"""Shared fixtures: tiny models, real SGLang servers in subprocesses, the trainer-side HF models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parity.tiny_models import build_tiny_model, load_hf_model
from truepolicy.sglang_process import running_server

SERVER_ARGS = ["--skip-tokenizer-init", "--max-total-tokens", "4096"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_qwen3(model_cache) -> Path:
    return build_tiny_model("qwen3", cache_dir=model_cache)


@pytest.fixture(scope="session")
def hf_qwen3(tiny_qwen3):
    return load_hf_model(tiny_qwen3)


@pytest.fixture(scope="session")
def qwen3_server(tiny_qwen3, tmp_path_factory):
    """The real SGLang server with the plugin on, serving the tiny Qwen3 on CPU."""
    log = tmp_path_factory.mktemp("logs") / "qwen3-on-policy.log"
    with running_server(tiny_qwen3, log, extra_args=SERVER_ARGS) as server:
        yield server
