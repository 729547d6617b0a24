"""Fused Triton ops of the trainer side (Liger-Kernel ``ops/`` layout: kernels, launchers, autograd)."""

# The GPU attention kernel families, server (``truepolicy server --gpu-attention``) and trainer
# (``parity.prepare_model(..., gpu_attention=...)``) alike -- the two must match (different bits):
# "mma" (``paged_attention_mma``: tensor cores; GPU == GPU) and "exact" (``paged_attention``: fp32
# CUDA-core arithmetic, reproduced by a plain-PyTorch reference on any device; 1.2-12x slower decode).
GPU_ATTENTION_KINDS = ("mma", "exact")
DEFAULT_GPU_ATTENTION = "mma"
