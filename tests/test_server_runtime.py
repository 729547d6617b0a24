"""The real SGLang 0.5.15 server on CPU, started by `truepolicy server`, with the plugin loaded."""

from __future__ import annotations

import os
import textwrap

import psutil
import pytest
import requests

from tests.conftest import SERVER_ARGS
from tests.helpers import hf_greedy
from truepolicy.sglang_process import ServerStartError, run_offline_engine, start_server

pytestmark = pytest.mark.server

PROMPTS = [[5, 17, 301, 42], [900, 3, 3, 77, 512, 64, 8, 11, 600, 123, 45, 99]]


def test_greedy_tokens_equal_trainer_greedy(qwen3_server, trainer_qwen3):
    for prompt in PROMPTS:
        out = qwen3_server.generate(
            {
                "input_ids": prompt,
                "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True},
            }
        )
        assert out["output_ids"] == hf_greedy(trainer_qwen3, prompt, 16)


def test_plugin_runs_in_the_scheduler_process(qwen3_server):
    info = requests.get(f"{qwen3_server.url}/get_server_info", timeout=30).json()
    (state,) = info["internal_states"]
    report = state["truepolicy"]
    launcher = psutil.Process(qwen3_server.process.pid)
    descendants = {p.pid for p in launcher.children(recursive=True)}
    assert report["pid"] in descendants, (report, descendants)
    assert report["pid"] != launcher.pid
    assert "scheduler" in report["process"]


def test_plugin_is_inert_without_truepolicy_server(tiny_qwen3, tmp_path):
    with_plugin_off = start_server(tiny_qwen3, tmp_path / "off.log", on_policy=False, extra_args=SERVER_ARGS)
    try:
        info = requests.get(f"{with_plugin_off.url}/get_server_info", timeout=30).json()
        assert "truepolicy" not in info["internal_states"][0]
    finally:
        with_plugin_off.stop()


BREAK_TARGET = textwrap.dedent(
    """
    import importlib, os
    if os.environ.get("TRUEPOLICY_ON_POLICY") == "1" and os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
        owner = getattr(importlib.import_module("{module}"), "{cls}")

        def {method}(self, changed_signature):  # an "SGLang" whose target differs from 0.5.15's
            raise AssertionError("never called")

        setattr(owner, "{method}", {method})
    """
)


@pytest.mark.parametrize(
    "patch,module,cls,method",
    [
        ("introspection", "sglang.srt.managers.scheduler", "Scheduler", "get_internal_state"),
        ("rmsnorm", "sglang.srt.layers.layernorm", "RMSNorm", "forward_native"),
    ],
)
def test_server_refuses_to_start_when_a_target_is_unexpected(
    tiny_qwen3, tmp_path, patch, module, cls, method
):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BREAK_TARGET.format(module=module, cls=cls, method=method))
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    log = tmp_path / "refused.log"
    with pytest.raises(ServerStartError, match="exited with status"):
        start_server(
            tiny_qwen3, log, extra_args=SERVER_ARGS, env={"PYTHONPATH": pythonpath}, ready_timeout=180
        )
    text = log.read_text()
    assert "truepolicy: refusing to start" in text
    assert f"patch '{patch}' cannot apply" in text
    assert "signature changed" in text


def test_offline_engine_in_a_subprocess(tiny_qwen3, trainer_qwen3):
    prompt = PROMPTS[1]
    (out,) = run_offline_engine(
        tiny_qwen3,
        [
            {
                "input_ids": prompt,
                "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True},
            }
        ],
        engine_kwargs={"max_total_tokens": 4096},
    )
    assert out["output_ids"] == hf_greedy(trainer_qwen3, prompt, 8)
