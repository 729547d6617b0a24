"""``truepolicy demo`` end to end, as a subprocess: a shortened GRPO run (2 steps) against the real
SGLang server and sidecar on the CPU, its printed parity values, its report, and its shutdown."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch

from truepolicy import demo
from truepolicy.demo import DemoError, Processes

pytestmark = pytest.mark.server

DEMO_TIMEOUT_S = 900
# One table row: step, version, reward, train_rollout_logprob_abs_diff, max|ratio-1|, push_s, gen_s, train_s
ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+([\d.]+)\s+(\S+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
URL = re.compile(r"^\s+(http://127\.0\.0\.1:\d+) \(log ")


def demo_argv(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "truepolicy.cli", "demo", "--output", str(out), *args]


def demo_env(model_cache: Path) -> dict[str, str]:
    return {**os.environ, "TRUEPOLICY_MODEL_CACHE": str(model_cache), "PYTHONUNBUFFERED": "1"}


def assert_stopped(urls: list[str]) -> None:
    assert len(urls) == 2, urls  # the server and the sidecar
    for url in urls:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/health", timeout=10)


def test_two_step_demo_is_bitwise_on_policy_and_writes_its_report(tiny_qwen3, model_cache, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        demo_argv(out, "--steps", "2"),
        env=demo_env(model_cache),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    lines = proc.stdout.splitlines()
    rows = [m.groups() for m in map(ROW.match, lines) if m]
    assert [r[:2] for r in rows] == [("0", "default"), ("1", "step-1")], proc.stdout
    for _, _, reward, diff, ratio_dev, push_s, _, _ in rows:
        assert diff == "0.0" and ratio_dev == "0.0", proc.stdout  # bitwise on-policy, ratio exactly 1
        assert 0.0 <= float(reward) <= 1.0 and float(push_s) > 0.0
    assert "Every step was bitwise on-policy" in proc.stdout

    for name in ("report.png", "report.md", "metrics.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["push_version"] for s in metrics["steps"]] == ["step-1", "step-2"]
    assert all(s["train_rollout_logprob_abs_diff"] == 0.0 == s["max_ratio_dev"] for s in metrics["steps"])
    gap = metrics["gap"]
    assert gap["on"]["tokens"] > 0 and gap["on"]["differing"] == 0
    assert gap["off"]["tokens"] > 0 and gap["off"]["differing"] > 0  # negative control: plugin off
    assert "train_rollout_logprob_abs_diff" in (out / "report.md").read_text()

    assert_stopped([m.group(1) for m in map(URL.match, lines) if m])


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C's default disposition. A shell without job control starts
    background jobs (e.g. a CI run launched with ``&``) with SIGINT ignored, which a child inherits
    and Python then keeps: the demo would never see the interrupt this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_every_process(tiny_qwen3, model_cache, tmp_path):
    proc = subprocess.Popen(
        demo_argv(tmp_path / "report", "--steps", "50"),
        env=demo_env(model_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )
    urls, seen = [], []
    try:
        for line in proc.stdout:  # interrupt once both processes are up
            seen.append(line)
            if m := URL.match(line):
                urls.append(m.group(1))
            if len(urls) == 2:
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(seen) + rest
    assert proc.returncode == 130, output
    assert "interrupted; every process it started was stopped" in output
    assert_stopped(urls)


@pytest.mark.skipif(torch.cpu._is_amx_tile_supported(), reason="this CPU has AMX")
def test_fp8_refuses_on_a_cpu_without_amx(tmp_path):
    proc = subprocess.run(
        demo_argv(tmp_path / "report", "--fp8"), capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 1
    assert "--fp8 cannot run on this CPU" in proc.stderr and "AMX: no" in proc.stderr, proc.stderr
    assert not (tmp_path / "report").exists()  # refused before starting anything


def test_server_gpu_needs_cuda_and_places_the_server_and_sidecar(tmp_path):
    """``--server-gpu`` is refused on the CPU (nothing started); on CUDA it becomes the server's and the
    sidecar's CUDA_VISIBLE_DEVICES, and the trainer's model takes the GPU contract."""
    proc = subprocess.run(
        demo_argv(tmp_path / "report", "--server-gpu", "1"), capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "--server-gpu takes a GPU index" in proc.stderr, proc.stderr
    assert not (tmp_path / "report").exists()
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    cfg = demo.config_from_args(parser.parse_args(["--device", "cuda", "--server-gpu", "1"]))
    assert demo.server_options(cfg)["env"] == {"CUDA_VISIBLE_DEVICES": "1"}
    assert demo.server_gpu_env(cfg) == {"CUDA_VISIBLE_DEVICES": "1"}
    one_gpu = demo.config_from_args(parser.parse_args(["--device", "cuda"]))
    assert demo.server_options(one_gpu)["env"] == {}
    with pytest.raises(demo.DemoError, match="--server-gpu"):
        demo.config_from_args(parser.parse_args(["--device", "cuda", "--server-gpu", "-1"]))


def test_a_dead_process_is_named_with_its_log(tmp_path):
    log = tmp_path / "p.log"
    log.write_text("something went wrong\n")
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    child.wait()
    procs = Processes()
    procs.add("truepolicy sidecar", SimpleNamespace(process=child, log_path=log))

    def fails():
        raise requests.ConnectionError("connection refused")

    with pytest.raises(DemoError, match=r"truepolicy sidecar \(pid \d+\) exited with status 3") as err:
        procs.call("pushing", fails)
    assert "something went wrong" in str(err.value)


def test_fp8_checkpoint_is_what_the_sidecar_pushes_into(tiny_qwen3, tmp_path):
    """``--fp8`` serves the checkpoint quantized as the sidecar quantizes pushes: the manifest of the
    trainer's bf16 model with the demo's quantization matches it name for name, shape and dtype."""
    from parity.tiny_models import load_hf_model
    from truepolicy import fp8_serving
    from weight_sync.client import WeightSyncClient, named_tensors
    from weight_sync.sidecar.plan import validate
    from weight_sync.sidecar.served import read_checkpoint

    path = fp8_serving.write_fp8_checkpoint(tiny_qwen3, tmp_path / "fp8", "cpu")
    served = read_checkpoint(path)
    client = WeightSyncClient(["http://127.0.0.1:9"], quantization=fp8_serving.quantization())
    try:
        manifest = client.manifest(named_tensors(load_hf_model(tiny_qwen3)))
    finally:
        client.close()
    validate(manifest, served)  # raises the sidecar's 4xx error on any name / shape / dtype mismatch
    fp8 = {n for n, spec in served.tensors.items() if "float8" in spec.dtype}
    layers = range(json.loads((path / "config.json").read_text())["num_hidden_layers"])
    projections = ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert fp8 == {f"model.layers.{i}.{p}.weight" for i in layers for p in projections}
    ignored = json.loads((path / "config.json").read_text())["quantization_config"]["ignored_layers"]
    assert set(ignored) == {f"model.layers.{i}.self_attn.{p}_proj" for i in layers for p in "qkv"}
