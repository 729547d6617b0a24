"""``truepolicy server``: launch the real SGLang HTTP server with the truepolicy plugin enabled.

Our own options are parsed here; every other argument goes to ``sglang.launch_server`` unchanged.
The launcher replaces its own process with SGLang's (``os.execve``), so signals, exit status and the
process group are SGLang's own.

On the CPU (``--device cpu``): SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports names from
the CPU build of ``sgl_kernel``, which is not on PyPI. When the real ``sgl_kernel`` cannot be
imported, the stand-in shipped in ``server_patches/cpu_runtime`` is put on the PYTHONPATH of the
SGLang processes (and only theirs). ``--attention-backend torch_native`` is the default there.

On a GPU (``--device cuda``) with the plugin on, the contract's kernels replace SGLang's triton
attention backend (``server_patches/gpu_patches.py``): ``--attention-backend triton``,
``--disable-cuda-graph`` and ``--sampling-backend pytorch`` (SGLang's CUDA default is flashinfer,
whose sampling no per-request seed reproduces) are the defaults, and any other attention or sampling
backend is refused (the patches would not be on the code path). ``--cuda-graph`` lets SGLang capture
decode in CUDA graphs instead (dense models: the MoE patches refuse capture).
The device reaches the plugin through ``TRUEPOLICY_DEVICE``.

Two more variables make SGLang's CPU engine start (both only set when the user has not):
``SGLANG_NCCL_SO_PATH`` points at a missing library: torch's CUDA wheel ships libnccl, so SGLang
would build a PyNcclCommunicator for a CPU group and fail (``torch.cuda.device("cpu")`` in
pynccl.py); when the library cannot load, SGLang disables pynccl as on a CPU-only torch. With
``--tp-size`` > 1, ``SGLANG_CPU_OMP_THREADS_BIND`` gives each rank its own CPUs: without it
``ModelRunner.init_threads_binding`` asserts tp_size <= the number of NUMA nodes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from parity.ops import DEFAULT_GPU_ATTENTION, GPU_ATTENTION_KINDS
from server_patches.plugin import DEVICE_ENV, ENABLE_ENV, GPU_ATTENTION_ENV

CPU_RUNTIME_DIR = Path(__file__).resolve().parent / "cpu_runtime"
PLUGIN_NAME = "truepolicy"
MISSING_NCCL = "/nonexistent/libnccl.so.2"  # see the module docstring


class LaunchError(ValueError):
    """The requested SGLang configuration is outside what the on-policy patches cover."""


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="HF model directory (safetensors)")
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="cuda if a GPU is visible, else cpu",
    )
    parser.add_argument(
        "--gpu-attention",
        choices=GPU_ATTENTION_KINDS,
        default=DEFAULT_GPU_ATTENTION,
        help="GPU attention kernels: mma (tensor cores) or exact (fp32, CPU-reproducible, slower); the "
        "trainer must use the same (parity.prepare_model(..., gpu_attention=...))",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="on a GPU with the plugin on: let SGLang capture decode in CUDA graphs (default: "
        "--disable-cuda-graph is added); dense models only, the MoE patches refuse capture",
    )
    parser.add_argument(
        "--on-policy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="enable the truepolicy numerics plugin (--no-on-policy: plain SGLang, for comparisons)",
    )


def real_sgl_kernel_importable() -> bool:
    """Whether ``import sgl_kernel`` works (checked in a child: a broken build may abort Python)."""
    probe = subprocess.run([sys.executable, "-c", "import sgl_kernel"], capture_output=True, check=False)
    return probe.returncode == 0


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def flag_value(args: list[str], *flags: str) -> str | None:
    """The value of the last of ``flags`` in ``args`` (``--flag v`` or ``--flag=v``), else None."""
    value = None
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
    return value


def cpu_thread_groups(tp_size: int, cpus: list[int]) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for ``tp_size`` ranks: the CPUs split into contiguous groups."""
    bounds = [(i * len(cpus) // tp_size, (i + 1) * len(cpus) // tp_size) for i in range(tp_size)]
    groups = [cpus[lo:hi] or cpus[:1] for lo, hi in bounds]
    return "|".join(",".join(map(str, g)) for g in groups)


def runtime_env(
    device: str,
    on_policy: bool,
    base_env: dict[str, str],
    tp_size: int = 1,
    gpu_attention: str = DEFAULT_GPU_ATTENTION,
) -> dict[str, str]:
    """The environment of SGLang's processes: plugin switch, CPU engine, sgl_kernel stand-in."""
    env = dict(base_env)
    env.pop(GPU_ATTENTION_ENV, None)
    if on_policy:
        env[ENABLE_ENV] = "1"
        env[DEVICE_ENV] = device
        if device == "cuda":
            env[GPU_ATTENTION_ENV] = gpu_attention
        allowed = env.get("SGLANG_PLUGINS")
        if allowed and PLUGIN_NAME not in [x.strip() for x in allowed.split(",")]:
            env["SGLANG_PLUGINS"] = f"{allowed},{PLUGIN_NAME}"
    else:
        env.pop(ENABLE_ENV, None)
        env.pop(DEVICE_ENV, None)
    if device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        if not real_sgl_kernel_importable():
            path = env.get("PYTHONPATH")
            env["PYTHONPATH"] = f"{CPU_RUNTIME_DIR}{os.pathsep}{path}" if path else str(CPU_RUNTIME_DIR)
        env.setdefault("SGLANG_NCCL_SO_PATH", MISSING_NCCL)
        if tp_size > 1:
            cpus = sorted(os.sched_getaffinity(0))
            env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu_thread_groups(tp_size, cpus))
    return env


def plan_launch(opts: argparse.Namespace, sglang_args: list[str], base_env: dict[str, str]) -> LaunchPlan:
    device = opts.device or default_device()
    args = ["--model-path", opts.model_path, "--device", device, *sglang_args]
    if device == "cpu" and not has_flag(sglang_args, "--attention-backend"):
        args += ["--attention-backend", "torch_native"]
    if opts.cuda_graph and not (device == "cuda" and opts.on_policy):
        raise LaunchError(
            "--cuda-graph belongs to the GPU on-policy mode (--device cuda): on the CPU SGLang captures no "
            "CUDA graphs, and with --no-on-policy SGLang's own defaults apply"
        )
    if device == "cuda" and opts.on_policy:
        args += _gpu_on_policy_args(sglang_args, opts.cuda_graph)
    tp_size = int(flag_value(sglang_args, "--tp-size", "--tp") or 1)
    env = runtime_env(device, opts.on_policy, base_env, tp_size, opts.gpu_attention)
    return LaunchPlan(argv=[sys.executable, "-m", "sglang.launch_server", *args], env=env)


def _gpu_on_policy_args(sglang_args: list[str], cuda_graph: bool) -> list[str]:
    """The SGLang arguments the GPU patches need (added when absent; conflicting ones refused), with
    CUDA graphs (``cuda_graph``) or without."""
    added = []
    backend = flag_value(sglang_args, "--attention-backend")
    if backend is None:
        added += ["--attention-backend", "triton"]
    elif backend != "triton":
        raise LaunchError(
            f"--attention-backend {backend}: on a GPU the on-policy patches replace the triton backend "
            "only (use --attention-backend triton, or --no-on-policy)"
        )
    if cuda_graph and has_flag(sglang_args, "--disable-cuda-graph"):
        raise LaunchError("--cuda-graph and --disable-cuda-graph: choose one")
    if not cuda_graph and not has_flag(sglang_args, "--disable-cuda-graph"):
        added.append("--disable-cuda-graph")
    sampling = flag_value(sglang_args, "--sampling-backend")
    if sampling is None:
        added += ["--sampling-backend", "pytorch"]
    elif sampling != "pytorch":
        raise LaunchError(
            f"--sampling-backend {sampling}: the on-policy sampler is SGLang's pytorch backend with "
            "per-request seeds (use --sampling-backend pytorch, or --no-on-policy)"
        )
    return added


def exec_server(opts: argparse.Namespace, sglang_args: list[str]) -> None:
    plan = plan_launch(opts, sglang_args, dict(os.environ))
    sys.stdout.flush()
    os.execve(plan.argv[0], plan.argv, plan.env)
