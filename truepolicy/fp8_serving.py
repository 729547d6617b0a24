"""Serving the tiny model as block FP8 for ``truepolicy demo --fp8``.

The server must *serve* a block-FP8 checkpoint (SGLang builds FP8 linear layers from its
``quantization_config``) so that the sidecar's FP8 pushes (``Quantization("fp8_block")``: the trainer
sends bf16, the sidecar quantizes) land in FP8 parameters. The checkpoint is the bf16 one quantized
with the same policy and kernel the sidecar uses (``weight_sync.fp8``).

The tiny Qwen3's k/v projections have 64 output rows; SGLang fuses q/k/v into one ``qkv_proj``
whose shards must each be whole 128-row blocks in block FP8, so the attention input projections stay
bf16 (``FP8_KEEP``; the checkpoint lists them as ``ignored_layers``). o_proj and the MLP (128, 256 and
256 rows, 128 / 256 columns) are quantized.

FP8 rollouts are not bitwise on-policy against a bf16 trainer: the server's matmuls see FP8-rounded
weights (and activations), the trainer's the bf16 ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from weight_sync.fp8 import Fp8BlockPolicy
from weight_sync.sidecar.wire import Quantization

FP8_KEEP = (r"\.(q_proj|k_proj|v_proj)\.",)
# SGLang on a GPU with block-FP8 weights: its triton FP8 GEMM (the other runners need extra kernels).
CUDA_FP8_SERVER_ARGS = ["--fp8-gemm-backend", "triton"]


def quantization() -> Quantization:
    """What the client asks the sidecar to do with every push."""
    return Quantization(method="fp8_block", extra_keep=FP8_KEEP)


def fp8_unsupported(device: str) -> str | None:
    """Why SGLang 0.5.15 cannot serve block-FP8 weights on ``device`` (None: it can)."""
    if device != "cpu":
        return None
    from server_patches.launcher import real_sgl_kernel_importable

    amx = torch.cpu._is_amx_tile_supported()
    kernel = real_sgl_kernel_importable()
    if amx and kernel:
        return None
    return (
        "--fp8 cannot run on this CPU: SGLang 0.5.15 computes block-FP8 linear layers on the CPU only "
        "with Intel AMX tiles and the CPU build of sgl_kernel (Fp8LinearMethod asserts "
        f"cpu_has_amx_support() when it loads the weights); here AMX: {'yes' if amx else 'no'}, "
        f"sgl_kernel: {'installed' if kernel else 'missing (the demo runs on its import-only stand-in)'}. "
        "There is no bf16 fallback: run --fp8 with --device cuda."
    )


def write_fp8_checkpoint(bf16_dir: Path, out_dir: Path, device: str) -> Path:
    """``bf16_dir``'s checkpoint quantized as the sidecar quantizes pushes, written to ``out_dir``."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from weight_sync.fp8 import bucket_view, fill_bucket, plan_bucket

    policy = Fp8BlockPolicy(extra_keep=FP8_KEEP)
    state = {n: t.to(device) for n, t in load_file(str(bf16_dir / "model.safetensors")).items()}
    plan = plan_bucket([(n, tuple(t.shape), t.dtype) for n, t in state.items()], policy)
    bucket = plan.allocate(device)
    fill_bucket(bucket, plan, state)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {e.name: bucket_view(bucket, e).cpu().clone() for e in plan.entries}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = AutoConfig.from_pretrained(bf16_dir)
    config.quantization_config = policy.quantization_config(state)
    config.save_pretrained(out_dir)
    if (bf16_dir / "generation_config.json").is_file():
        shutil.copy(bf16_dir / "generation_config.json", out_dir / "generation_config.json")
    return out_dir
