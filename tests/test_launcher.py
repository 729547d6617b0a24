"""`truepolicy server` builds the right SGLang command line and environment."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from server_patches.launcher import (
    CPU_RUNTIME_DIR,
    MISSING_NCCL,
    LaunchError,
    add_server_arguments,
    cpu_thread_groups,
    plan_launch,
)


def parse(argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_server_arguments(parser)
    return parser.parse_known_args(argv)


def test_cpu_plan_enables_plugin_engine_and_stand_in():
    opts, rest = parse(["--model-path", "/m", "--device", "cpu", "--port", "1234", "--foo=bar"])
    plan = plan_launch(opts, rest, {"PATH": "/bin"})
    assert plan.argv[1:3] == ["-m", "sglang.launch_server"]
    assert plan.argv[3:] == [
        "--model-path", "/m", "--device", "cpu", "--port", "1234", "--foo=bar",
        "--attention-backend", "torch_native",
    ]  # fmt: skip
    assert plan.env["TRUEPOLICY_ON_POLICY"] == "1"
    assert plan.env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert plan.env["PYTHONPATH"].split(":")[0] == str(CPU_RUNTIME_DIR)
    assert plan.env["SGLANG_NCCL_SO_PATH"] == MISSING_NCCL
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in plan.env


def test_cpu_tensor_parallel_binds_one_cpu_group_per_rank():
    opts, rest = parse(["--model-path", "/m", "--device", "cpu", "--tp-size=2"])
    plan = plan_launch(opts, rest, {})
    groups = plan.env["SGLANG_CPU_OMP_THREADS_BIND"].split("|")
    assert len(groups) == 2 and all(groups)
    assert cpu_thread_groups(3, [0, 1, 2, 3, 4, 5]) == "0,1|2,3|4,5"
    assert cpu_thread_groups(2, [0]) == "0|0"
    opts, rest = parse(["--model-path", "/m", "--device", "cpu", "--tp", "2"])
    user = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}
    assert plan_launch(opts, rest, user).env["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1"


def test_user_attention_backend_wins():
    opts, rest = parse(["--model-path", "/m", "--device", "cpu", "--attention-backend=triton"])
    plan = plan_launch(opts, rest, {})
    assert plan.argv.count("--attention-backend") == 0
    assert "--attention-backend=triton" in plan.argv


def test_no_on_policy_leaves_sglang_unpatched():
    opts, rest = parse(["--model-path", "/m", "--device", "cpu", "--no-on-policy"])
    plan = plan_launch(opts, rest, {"TRUEPOLICY_ON_POLICY": "1"})
    assert "TRUEPOLICY_ON_POLICY" not in plan.env


def test_plugin_allow_list_gains_truepolicy():
    opts, rest = parse(["--model-path", "/m", "--device", "cpu"])
    plan = plan_launch(opts, rest, {"SGLANG_PLUGINS": "other"})
    assert plan.env["SGLANG_PLUGINS"] == "other,truepolicy"


def test_cuda_plan_never_carries_the_stand_in():
    opts, rest = parse(["--model-path", "/m", "--device", "cuda", "--attention-backend", "triton"])
    plan = plan_launch(opts, rest, {"PYTHONPATH": "/x"})
    assert plan.env["PYTHONPATH"] == "/x"
    assert "SGLANG_USE_CPU_ENGINE" not in plan.env
    assert plan.env["TRUEPOLICY_DEVICE"] == "cuda"


def test_cuda_on_policy_runs_the_triton_backend_and_pytorch_sampler_without_cuda_graphs():
    opts, rest = parse(["--model-path", "/m", "--device", "cuda"])
    argv = plan_launch(opts, rest, {}).argv
    assert argv[-5:] == [
        "--attention-backend", "triton", "--disable-cuda-graph", "--sampling-backend", "pytorch"
    ]  # fmt: skip
    opts, rest = parse(["--model-path", "/m", "--device", "cuda", "--attention-backend", "fa3"])
    with pytest.raises(LaunchError, match="--attention-backend fa3"):
        plan_launch(opts, rest, {})
    opts, rest = parse(["--model-path", "/m", "--device", "cuda", "--sampling-backend", "flashinfer"])
    with pytest.raises(LaunchError, match="--sampling-backend flashinfer"):
        plan_launch(opts, rest, {})
    opts, rest = parse(
        ["--model-path", "/m", "--device", "cuda", "--no-on-policy", "--attention-backend=fa3"]
    )
    plan = plan_launch(opts, rest, {"TRUEPOLICY_DEVICE": "cuda"})
    assert "--disable-cuda-graph" not in plan.argv and "TRUEPOLICY_DEVICE" not in plan.env


def test_cuda_graph_is_opt_in_and_conflicts_are_refused():
    opts, rest = parse(["--model-path", "/m", "--device", "cuda", "--cuda-graph"])
    argv = plan_launch(opts, rest, {}).argv
    assert "--disable-cuda-graph" not in argv
    assert argv[-4:] == ["--attention-backend", "triton", "--sampling-backend", "pytorch"]
    opts, rest = parse(["--model-path", "/m", "--device", "cuda", "--cuda-graph", "--disable-cuda-graph"])
    with pytest.raises(LaunchError, match="--cuda-graph and --disable-cuda-graph"):
        plan_launch(opts, rest, {})
    for other in (["--device", "cpu"], ["--device", "cuda", "--no-on-policy"]):
        opts, rest = parse(["--model-path", "/m", *other, "--cuda-graph"])
        with pytest.raises(LaunchError, match="--cuda-graph belongs to the GPU on-policy mode"):
            plan_launch(opts, rest, {})


def test_plugin_takes_the_gpu_patches_on_cuda_only(monkeypatch):
    from server_patches.gpu_patches import GPU_PATCHES
    from server_patches.plugin import active_patches
    from server_patches.table import PATCHES

    monkeypatch.setenv("TRUEPOLICY_DEVICE", "cpu")
    assert active_patches() == PATCHES
    monkeypatch.setenv("TRUEPOLICY_DEVICE", "cuda")
    assert active_patches() == (*PATCHES, *GPU_PATCHES)
    for patch in GPU_PATCHES:  # their targets exist with the expected signatures in SGLang 0.5.15
        patch.check()
    monkeypatch.setenv("TRUEPOLICY_DEVICE", "tpu")
    with pytest.raises(SystemExit, match="TRUEPOLICY_DEVICE"):
        active_patches()


def test_gpu_attention_kernels_reach_the_plugin(monkeypatch):
    from parity.ops import DEFAULT_GPU_ATTENTION, paged_attention, paged_attention_mma
    from server_patches import gpu_patches
    from server_patches.plugin import active_patches

    opts, rest = parse(["--model-path", "/m", "--device", "cuda", "--gpu-attention", "mma"])
    assert plan_launch(opts, rest, {}).env["TRUEPOLICY_GPU_ATTENTION"] == "mma"
    opts, rest = parse(["--model-path", "/m", "--device", "cuda", "--gpu-attention", "exact"])
    assert plan_launch(opts, rest, {}).env["TRUEPOLICY_GPU_ATTENTION"] == "exact"
    opts, rest = parse(["--model-path", "/m", "--device", "cuda"])
    assert plan_launch(opts, rest, {}).env["TRUEPOLICY_GPU_ATTENTION"] == "mma"  # the default
    opts, rest = parse(["--model-path", "/m", "--device", "cpu"])
    assert "TRUEPOLICY_GPU_ATTENTION" not in plan_launch(opts, rest, {"TRUEPOLICY_GPU_ATTENTION": "mma"}).env
    monkeypatch.setenv("TRUEPOLICY_DEVICE", "cuda")
    try:
        monkeypatch.setenv("TRUEPOLICY_GPU_ATTENTION", "exact")
        active_patches()
        assert gpu_patches._attention is paged_attention
        monkeypatch.setenv("TRUEPOLICY_GPU_ATTENTION", "flash")
        with pytest.raises(SystemExit, match="TRUEPOLICY_GPU_ATTENTION"):
            active_patches()
        monkeypatch.delenv("TRUEPOLICY_GPU_ATTENTION")
        active_patches()
        assert gpu_patches._attention is paged_attention_mma  # the default
    finally:
        gpu_patches.select_attention(DEFAULT_GPU_ATTENTION)


def test_help_names_our_options_and_the_pass_through():
    out = subprocess.run(
        [sys.executable, "-m", "truepolicy.cli", "server", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for needle in ("--model-path", "--device", "--on-policy", "passed unchanged to SGLang"):
        assert needle in " ".join(out.split()), needle
