"""Qwen3's per-head q/k RMSNorms as one kernel, in the GPU contract's norm (``rms_norm_pairwise``).

The problem
-----------
Qwen3 normalises every head of q and of k (RMSNorm over ``head_dim``, one weight for q, one for k)
between the qkv projection and RoPE. q and k arrive as column slices of the one qkv output row, so
SGLang's unfused path (``apply_qk_norm`` without its JIT kernel) copies each to a contiguous
``[tokens * heads, head_dim]`` tensor and runs the norm on each: four kernels per layer, and at batch
1 a decode step is a chain of small kernels whose count is its time. SGLang's own fused kernel is one
launch but not the contract (it multiplies by the weight in fp32 before rounding; HF rounds first).

This op reads both strided slices and writes both normalised outputs, contiguous, in one launch: one
program per (token, head) row of q or k. Each row is the contract's norm, computed by the same row
function as ``rms_norm_pairwise_kernel`` (``pairwise_rms_norm_row``: a fixed pairwise tree for the
variance, IEEE division and sqrt, HF's two bf16 roundings), so a row's bits are what the unfused path
(the ``rmsnorm_cuda`` patch on contiguous copies) gives: the tree's additions are fixed by the code,
not by the layout (``launch_options``: the bits do not depend on ``num_warps``). The reference,
:func:`qk_rms_norm_reference`, is ``rms_norm_pairwise`` per head.

Trade-off: one program per 64-256 element row is a small program; at decode the launch count is what
matters, and prefill rows are few bytes each either way (the op is memory-bound at any size).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.ops.rms_norm_pairwise import launch_options, pairwise_rms_norm_row, rms_norm_pairwise


def qk_rms_norm_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: the contract's norm of every ``head_dim`` slice of q's and k's rows, contiguous
    outputs of q's and k's shapes (any device: the same bits)."""
    return (
        rms_norm_pairwise(q.reshape(-1, head_dim), q_weight, eps).reshape(q.shape),
        rms_norm_pairwise(k.reshape(-1, head_dim), k_weight, eps).reshape(k.shape),
    )


@triton.jit
def _qk_norm_kernel(
    Q, sq,  # bf16 [tokens, HQ * D] (row stride sq, unit column stride)
    K, sk,  # bf16 [tokens, HK * D]
    QW, KW,  # bf16 [D]
    OQ, OK,  # bf16 outputs, contiguous [tokens, HQ * D] / [tokens, HK * D]
    HQ, HK, D, eps,
    BLOCK_H: tl.constexpr, LOG2_BLOCK_H: tl.constexpr, EXACT_RNE: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)  # int64: tokens * row stride may exceed 2**31
    head = tl.program_id(1)  # 0 .. HQ-1: q's heads, HQ .. HQ+HK-1: k's
    cols = tl.arange(0, BLOCK_H)
    mask = cols < D
    if head < HQ:
        src = Q + token * sq + head * D
        dst = OQ + token * (HQ * D) + head * D
        w_ptr = QW
    else:
        src = K + token * sk + (head - HQ) * D
        dst = OK + token * (HK * D) + (head - HQ) * D
        w_ptr = KW
    x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)  # exact upcast; padding 0 adds nothing
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + cols, pairwise_rms_norm_row(x, w, D, eps, BLOCK_H, LOG2_BLOCK_H, EXACT_RNE), mask=mask)


_empty = torch.empty  # the tests swap in a NaN-poisoning allocator


def _check(q, k, q_weight, k_weight, head_dim) -> None:
    tensors = (q, k, q_weight, k_weight)
    if any(t.dtype != torch.bfloat16 for t in tensors):
        raise TypeError(f"qk_rms_norm: bf16 only, got {', '.join(str(t.dtype) for t in tensors)}")
    if q.dim() != 2 or k.dim() != 2 or q.shape[0] != k.shape[0]:
        raise ValueError(f"qk_rms_norm: q and k must be [tokens, heads * head_dim], got {q.shape}, {k.shape}")
    if head_dim < 1 or q.shape[1] % head_dim or k.shape[1] % head_dim:
        raise ValueError(
            f"qk_rms_norm: head_dim {head_dim} does not divide q's {q.shape[1]} / k's {k.shape[1]}"
        )
    if q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
        raise ValueError(f"qk_rms_norm: weights must be [{head_dim}], got {q_weight.shape}, {k_weight.shape}")
    if q.stride(1) != 1 or k.stride(1) != 1:
        raise ValueError(f"qk_rms_norm: q and k need a unit column stride, got {q.stride()}, {k.stride()}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError("qk_rms_norm: q, k and the weights on different devices")


def qk_rms_norm(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel: the contract's norm of every head of q and k (column slices of one row are fine),
    as new contiguous tensors of q's and k's shapes; bitwise :func:`qk_rms_norm_reference`."""
    _check(q, k, q_weight, k_weight, head_dim)
    out_q = _empty(q.shape, dtype=q.dtype, device=q.device)
    out_k = _empty(k.shape, dtype=k.dtype, device=k.device)
    hq, hk = q.shape[1] // head_dim, k.shape[1] // head_dim
    if q.shape[0] and hq + hk:
        _qk_norm_kernel[(q.shape[0], hq + hk)](
            q, q.stride(0), k, k.stride(0), q_weight.contiguous(), k_weight.contiguous(), out_q, out_k,
            hq, hk, head_dim, eps, **launch_options(head_dim),
        )  # fmt: skip
    return out_q, out_k
