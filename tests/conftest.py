"""Shared fixtures: tiny models, real SGLang servers in subprocesses, the trainer-side HF models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parity.tiny_models import build_tiny_model, load_hf_model
from parity.trainer import prepare_model
from truepolicy.sglang_process import running_server

# Small prefill chunks so that prompts longer than 16 tokens go through chunked prefill.
# --sleep-on-idle: an idle SGLang scheduler otherwise polls its sockets in a busy loop, one core at
# 100% per server; on the 2-core CI machine two servers left nothing for the test's other processes.
SERVER_ARGS = [
    "--skip-tokenizer-init", "--max-total-tokens", "4096", "--chunked-prefill-size", "16",
    "--sleep-on-idle",
]  # fmt: skip


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
def trainer_qwen3(tiny_qwen3):
    """The trainer's view: HF transformers prepared with the numerics contract."""
    return prepare_model(load_hf_model(tiny_qwen3))


@pytest.fixture(scope="session")
def qwen3_server(tiny_qwen3, tmp_path_factory):
    """The real SGLang server with the plugin on, serving the tiny Qwen3 on CPU."""
    log = tmp_path_factory.mktemp("logs") / "qwen3-on-policy.log"
    with running_server(tiny_qwen3, log, extra_args=SERVER_ARGS) as server:
        yield server


@pytest.fixture(scope="session")
def sglang_in_process(tiny_qwen3):
    """Import SGLang's layers into the test process (no engine) the way its CPU runtime would.

    Sets SGLang's CPU-engine switch, puts the sgl_kernel stand-in on ``sys.path`` if the real one
    is missing (this process only), and installs global server args for the tiny Qwen3.
    """
    import os
    import sys

    from server_patches.launcher import CPU_RUNTIME_DIR, real_sgl_kernel_importable

    if torch.cuda.is_available():
        pytest.skip("in-process SGLang layer tests use the CPU runtime")
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    if not real_sgl_kernel_importable():
        sys.path.insert(0, str(CPU_RUNTIME_DIR))
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    set_global_server_args_for_scheduler(
        ServerArgs(model_path=str(tiny_qwen3), device="cpu", skip_tokenizer_init=True)
    )
