"""Fused Triton ops of the trainer side (Liger-Kernel ``ops/`` layout: kernels, launchers, autograd)."""

import importlib
from types import ModuleType

# The GPU attention kernel families, server (``truepolicy server --gpu-attention``) and trainer
# (``parity.prepare_model(..., gpu_attention=...)``) alike -- the two must match (different bits):
# "mma" (``paged_attention_mma``: tensor cores; GPU == GPU) and "exact" (``paged_attention``: fp32
# CUDA-core arithmetic, reproduced by a plain-PyTorch reference on any device; 1.2-12x slower decode).
_GPU_ATTENTION_MODULES = {"mma": "paged_attention_mma", "exact": "paged_attention"}
GPU_ATTENTION_KINDS = tuple(_GPU_ATTENTION_MODULES)
DEFAULT_GPU_ATTENTION = "mma"


def gpu_attention_kernels(kind: str) -> ModuleType:
    """The kernel module of the ``kind`` family (imported on first use: the launcher reads the names
    above without loading any kernel)."""
    if kind not in _GPU_ATTENTION_MODULES:
        raise ValueError(f"GPU attention kernels must be one of {sorted(GPU_ATTENTION_KINDS)}, got {kind!r}")
    return importlib.import_module(f"{__name__}.{_GPU_ATTENTION_MODULES[kind]}")
