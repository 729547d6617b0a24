"""Fused Triton ops of the trainer side (Liger-Kernel ``ops/`` layout: kernels, launchers, autograd)."""
