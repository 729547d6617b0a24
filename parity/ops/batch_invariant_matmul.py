"""Batch-invariant linear layer: a Triton GEMM whose every output row is independent of M.

The problem
-----------
``F.linear`` on a GPU goes to cuBLAS, which picks its kernel (tile shape, split-K, stream-K) from the
problem size: the same token's row of ``x @ W.T`` is summed in one order when the server decodes 3
requests (M = 3), in another when it prefills 700 tokens, and in a third when the trainer runs the
whole sequence (M = 4096). Each order rounds differently, so logits and logprobs drift even when
attention and norms agree.

Semantics (the contract of this op)
-----------------------------------
``y[m, n] = round(sum_k x[m, k] w[n, k] (+ bias[n]))`` in the output dtype, computed as

- ``acc = 0`` (fp32); for ``k0 = 0, BLOCK_K, 2 BLOCK_K, ...`` in increasing order:
  ``acc = acc + dot(x[m, k0:k0+BLOCK_K], w[n, k0:k0+BLOCK_K])`` where ``dot`` is the GPU's MMA
  (``tl.dot``: bf16/fp16 products, fp32 accumulation; the K tail padded with exact zeros);
- then ``acc + float32(bias[n])`` and one rounding to the output dtype (nearest even).

No split-K, no stream-K, one fixed tile configuration (``CONFIG``: ``BLOCK_M, BLOCK_N, BLOCK_K``,
warps, stages) for every M. The configuration may depend on (N, K, dtype, GPU) -- a weight's shape,
the same on server and trainer -- never on M. The row index M is not specialised by the JIT
(``do_not_specialize``), so one compiled kernel serves every M.

What is guaranteed: row ``m``'s bits depend only on ``x[m]``, ``W``, ``bias``, the configuration and the
GPU -- not on M, not on the other rows, not on where the row sits in its M tile (each output element
of an MMA is computed by the same instruction sequence over K). Server and trainer get the same bits
by calling this same kernel. What is *not* claimed: bitwise agreement with a plain-PyTorch
reference. Tensor cores accumulate the products of one MMA with their own internal alignment and
truncation, which no sequence of IEEE operations in PyTorch reproduces; :func:`linear_reference`
(fp32 accumulation in the same K order) agrees to within fp32 rounding of the accumulation, and the
tests hold it to an error bound, as a check that the kernel computes the right product -- exactness
is tested as M-invariance, bit for bit.

Trade-offs
----------
* One configuration for all M: small M (decode) reads W once per N tile with few programs (no split-K
  to spread K over more SMs), large M (prefill) cannot switch to cuBLAS's best tile. The default
  (``CONFIG``: 64 x 128 x 64 tiles, 4 warps, 3 stages; not yet tuned on a GPU) is a middle ground;
  ``benchmarks/bench_paged_attention.py`` reports the ratio to cuBLAS at M = 1 .. 8192 to tune it per GPU.
* Grouped tile order (``GROUP_M`` M tiles share a band of W in L2) changes only which program runs
  when, never a value.
* On the CPU (not interpreting), :func:`batch_invariant_linear` is ``F.linear``: bf16 ``F.linear`` is
  already row-invariant there (tests/test_contract_ops.py), and the kernel needs a GPU.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class MatmulConfig(NamedTuple):
    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


CONFIG = MatmulConfig()  # part of the contract on a given GPU: server and trainer use the same one

_empty = torch.empty  # tests poison outputs through this


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit(do_not_specialize=["M"])
def _bi_matmul_kernel(
    X, W, BIAS, Y,
    M, N: tl.constexpr, K: tl.constexpr,  # weight shapes are compile-time (one kernel per layer shape)
    sxm, sxk, swn, swk, sym, syn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    OUT_BF16_INTERP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M consecutive M tiles sweep the N tiles together (L2 reuse of W)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    x_ptrs = X + rm.to(tl.int64)[:, None] * sxm + rk[None, :] * sxk
    w_ptrs = W + rn.to(tl.int64)[None, :] * swn + rk[:, None] * swk  # [BLOCK_K, BLOCK_N] view of W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # increasing K order, every M
        kmask = (k0 + rk) < K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
        if OUT_BF16_INTERP:
            # the interpreter's dot would multiply bf16's raw uint16 storage: give it the exact fp32
            # values (np.matmul, fp32)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)  # fp32 accumulation on tensor cores
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rm.to(tl.int64)[:, None] * sym + rn[None, :] * syn
    mask = mask_m[:, None] & mask_n[None, :]
    if OUT_BF16_INTERP:
        # the interpreter's fp32 -> bf16 cast is not round-to-nearest-even: round on the bits
        bits = acc.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(acc != acc, 0x7FC0, r)
        tl.store(y_ptrs, r.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)  # cvt.rn


def batch_invariant_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: MatmulConfig = CONFIG,
) -> torch.Tensor:
    """``x`` [M, K] @ ``weight`` [N, K]^T (+ bias) -> [M, N] in x's dtype, by the Triton kernel."""
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise NotImplementedError(f"batch-invariant matmul: x {x.dtype}, weight {weight.dtype} (bf16/fp16)")
    if x.dtype == torch.float16 and _interpreting():
        raise NotImplementedError("fp16 outputs need the GPU's cvt.rn (the interpreter rounds bf16 only)")
    m, k = x.shape
    n, k2 = weight.shape
    if k != k2:
        raise ValueError(f"x [{m}, {k}] against weight [{n}, {k2}]")
    if out is None:
        out = _empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    c = config
    grid = (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n),)
    _bi_matmul_kernel[grid](
        x, weight, bias if bias is not None else x, out,
        m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        OUT_BF16_INTERP=_interpreting() and x.dtype == torch.bfloat16,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip
    return out


class _BatchInvariantLinear(torch.autograd.Function):
    """Forward: the kernel. Backward: ``F.linear``'s (cuBLAS matmuls; gradients are not part of the
    contract, only the forward's bits are)."""

    @staticmethod
    def forward(ctx, x, weight, bias, config):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = batch_invariant_mm(x.reshape(-1, x.shape[-1]), weight, bias, config=config)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = (grad2 @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = grad2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = grad2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def batch_invariant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, config: MatmulConfig = CONFIG
) -> torch.Tensor:
    """``F.linear`` with M-invariant rows: the Triton kernel on CUDA (and under the interpreter),
    ``F.linear`` elsewhere (bf16 CPU linear rows are already M-invariant). Differentiable (the kernel
    path with ``F.linear``'s backward), so the trainer trains through it."""
    if not (x.is_cuda or _interpreting()):
        return torch.nn.functional.linear(x, weight, bias)
    return _BatchInvariantLinear.apply(x, weight, bias, config)


@torch.no_grad()
def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, config: MatmulConfig = CONFIG
) -> torch.Tensor:
    """Plain PyTorch, the same K blocks in the same order with fp32 accumulation (float64 inside each
    block): the kernel's value up to the tensor cores' rounding inside a block. Not bitwise (see the
    module docstring); for error-bound checks."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    w = weight.double()
    acc = torch.zeros(x2.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    for k0 in range(0, x2.shape[1], config.block_k):
        acc = acc + (x2[:, k0 : k0 + config.block_k] @ w[:, k0 : k0 + config.block_k].T).float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
