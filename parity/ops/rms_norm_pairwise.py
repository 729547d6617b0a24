"""RMSNorm with a fully specified variance: the GPU contract's norm (Triton kernel + PyTorch reference).

The problem
-----------
HF's RMSNorm is ``weight * (h * rsqrt(mean(h * h) + eps)).to(dtype)`` with ``h = x.float()``. Every
step is elementwise except ``mean``, and PyTorch does not specify the order in which ``mean`` adds:
its CUDA reduction, its CPU reduction, sgl_kernel's fused norm and a fused all-reduce + norm kernel
each add the squares in their own order, so the fp32 variance differs in its last bits (in many rows:
``tests/test_tp_kernel_interpreter.py``) and, rarely, a bf16 output differs. A fused all-reduce +
residual + RMSNorm kernel (issue 11) can only be bitwise the unfused path if the norm's order is one
both sides can compute.

The contract (GPU)
------------------
``rms_norm_pairwise``: the squares, zero-padded to a power of two, are added by a fixed pairwise tree
(``s[i] = s[2i] + s[2i+1]`` level by level), divided by H with IEEE division, ``1 / sqrt`` with IEEE
sqrt and division, no fused multiply-add; then HF's casts: ``h * inv`` rounded to the input dtype,
times the weight (in the input dtype: fp32 product rounded once). With a residual, ``residual + x`` is
added in bf16 first (as HF's decoder and ``parity.contract.add_rms_norm``) and feeds both outputs.
Every step is one IEEE operation in a stated order, so the plain-PyTorch reference here gives the
kernel's bits on any device; a row's result depends on nothing but the row (batch-invariant).

Trade-off: the tree costs ~log2(H) reshuffles in the kernel (register-only, no extra memory traffic),
and the GPU contract's norm is no longer ``parity.contract.rms_norm`` (the CPU contract keeps
PyTorch's ``mean``: on the CPU both engines call that same function, so its order needs no name).

Used by: the server's ``rmsnorm_cuda`` patch (``server_patches.gpu_patches``), the trainer's RMSNorm
modules under ``parity.gpu_contract.prepare_model`` (:func:`rms_norm`, differentiable), and the fused
all-reduce + residual + RMSNorm kernel (``parity.ops.fused_allreduce_rmsnorm``), which shares
:func:`_pairwise_rms_norm_row`.

Under ``TRITON_INTERPRET=1`` (CPU) Triton's fp32 -> bf16 conversion truncates, so the kernel rounds to
nearest-even with integer operations instead (``EXACT_RNE``; NaN is not preserved there, the
interpreter is for tests only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.ops.batch_invariant_matmul import _interpreting

# --------------------------------------------------------------------------------------------------
# Plain-PyTorch reference (CPU and GPU)
# --------------------------------------------------------------------------------------------------


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def pairwise_sum_of_squares(h: torch.Tensor) -> torch.Tensor:
    """fp32 ``sum(h * h)`` over the last dim by the fixed tree: squares padded with zeros to a power
    of two, then ``s[i] = s[2i] + s[2i+1]`` level by level. Elementwise IEEE adds only, so the bits are
    the same on every device. Returns shape ``[..., 1]``."""
    sq = h * h
    width = next_pow2(sq.shape[-1])
    if width != sq.shape[-1]:
        sq = torch.nn.functional.pad(sq, (0, width - sq.shape[-1]))
    while sq.shape[-1] > 1:
        sq = sq[..., 0::2] + sq[..., 1::2]
    return sq


def rms_norm_pairwise(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in HF's order with the pairwise-tree variance (see the module doc). Differentiable."""
    h = x.to(torch.float32)
    total = pairwise_sum_of_squares(h)
    variance = total / torch.full_like(total, float(x.shape[-1]))  # IEEE division, not * (1/H)
    inv = torch.ones_like(variance) / torch.sqrt(variance + eps)
    return weight * (h * inv).to(x.dtype)


def add_rms_norm_pairwise(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``summed = residual + x`` in ``x.dtype``; returns ``(rms_norm_pairwise(summed), summed)``."""
    summed = residual + x
    return rms_norm_pairwise(summed, weight, eps), summed


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def to_bf16(x, EXACT_RNE: tl.constexpr):
    if EXACT_RNE:
        # Round fp32 to nearest-even bf16 with integer ops; the top 16 bits are the bf16, taken by a
        # bitcast (the interpreter's fp32 -> bf16 conversion would also flush subnormals).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def pairwise_rms_norm_row(
    h, w, H, eps, BLOCK_H: tl.constexpr, LOG2_BLOCK_H: tl.constexpr, EXACT_RNE: tl.constexpr
):
    """One row: ``h`` fp32 [BLOCK_H] (lanes >= H exact zeros), ``w`` the weight in fp32 (exact
    bf16 values). Returns the bf16 normed row."""
    sq = h * h
    for i in tl.static_range(LOG2_BLOCK_H):
        # s'[i] = s[2i] + s[2i+1]: a sum over an axis of 2 is one addition, exact in order.
        # (Not tl.split: the split form needs a layout conversion per level, 20-50x the PTX and
        # minutes of compile per hidden size.)
        sq = tl.sum(tl.reshape(sq, [BLOCK_H >> (i + 1), 2]), 1)
    total = tl.sum(sq, 0)  # one element: exact
    variance = tl.div_rn(total, H.to(tl.float32))
    inv = tl.div_rn(1.0, tl.sqrt_rn(variance + eps))
    # HF's casts: h * inv rounded to bf16, then the bf16 x bf16 product (fp32, rounded once).
    return to_bf16(w * to_bf16(h * inv, EXACT_RNE).to(tl.float32), EXACT_RNE)


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,  # bf16 [rows, H] or unused (HAS_RESIDUAL=False)
    weight_ptr,
    normed_ptr,
    summed_ptr,  # bf16 [rows, H] or unused
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    LOG2_BLOCK_H: tl.constexpr,
    EXACT_RNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * H may exceed 2**31
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    offs = row * H + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + offs, mask=mask, other=0.0)
        # the residual add in bf16: both operands exact in fp32, the sum rounded once
        x = to_bf16(res.to(tl.float32) + x.to(tl.float32), EXACT_RNE)
        tl.store(summed_ptr + offs, x, mask=mask)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = pairwise_rms_norm_row(x.to(tl.float32), w, H, eps, BLOCK_H, LOG2_BLOCK_H, EXACT_RNE)
    tl.store(normed_ptr + offs, normed, mask=mask)


_empty = torch.empty  # the tests swap in a NaN-poisoning allocator


def launch_options(hidden: int) -> dict:
    """The row kernels' shared launch constants for hidden size ``hidden`` (the bits do not depend on
    ``num_warps``: every addition of the tree is a pair)."""
    block = next_pow2(hidden)
    return dict(
        BLOCK_H=block, LOG2_BLOCK_H=block.bit_length() - 1, EXACT_RNE=_interpreting(),
        num_warps=max(1, min(16, block // 256)), enable_fp_fusion=False,
    )  # fmt: skip


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if any(t.dtype != torch.bfloat16 for t in tensors):
        raise TypeError(
            f"rms_norm_pairwise kernel: bf16 only, got {', '.join(str(t.dtype) for t in tensors)}"
        )
    if weight.shape != x.shape[-1:] or (residual is not None and residual.shape != x.shape):
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"rms_norm_pairwise kernel: shapes {shapes} (x [..., H], weight [H], residual as x)")
    if x.device != weight.device or (residual is not None and residual.device != x.device):
        raise ValueError("rms_norm_pairwise kernel: x, weight and residual on different devices")


def rms_norm_pairwise_kernel(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel: ``(normed, summed)`` with ``summed = residual + x`` (None without a residual), bitwise
    :func:`rms_norm_pairwise` / :func:`add_rms_norm_pairwise`. bf16, any leading shape."""
    _check(x, weight, residual)
    hidden = x.shape[-1]
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    normed = _empty(x.shape, dtype=x.dtype, device=x.device)
    summed = _empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    rows = x.numel() // hidden if hidden else 0
    if rows:
        _rms_norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight.contiguous(), normed,
            summed if summed is not None else normed, hidden, eps, HAS_RESIDUAL=residual is not None,
            **launch_options(hidden),
        )  # fmt: skip
    return normed, summed


class _PairwiseRMSNorm(torch.autograd.Function):
    """Forward: the kernel. Backward: autograd through the reference, recomputed (the forward keeps
    only its inputs); gradients are not part of the contract."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return rms_norm_pairwise_kernel(x, weight, eps)[0]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            xd, wd = x.detach().requires_grad_(), weight.detach().requires_grad_()
            dx, dw = torch.autograd.grad(rms_norm_pairwise(xd, wd, ctx.eps), (xd, wd), grad)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The trainer's GPU-contract RMSNorm: the kernel on CUDA (differentiable), the reference elsewhere
    (the same bits)."""
    if x.is_cuda:
        return _PairwiseRMSNorm.apply(x, weight, eps)
    return rms_norm_pairwise(x, weight, eps)
