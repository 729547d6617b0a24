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

No split-K, no stream-K. ``BLOCK_K`` (``FAMILY_BLOCK_K`` = 64) and the MMA instruction family are part
of the definition; the rest of the launch -- ``BLOCK_M``, ``BLOCK_N``, ``GROUP_M``, warps, stages --
is a *member of the family* chosen per call by :func:`config_for` from M and the weight's shape.

Configuration families, and why the launch may depend on M
----------------------------------------------------------
On Hopper (sm_90) Triton lowers ``tl.dot`` to ``wgmma`` when the tile allows it (``BLOCK_M`` a
multiple of 64, ``num_warps`` a multiple of 4), else to ``mma.sync``. With wgmma an output element's
K loop is a chain of ``m64nNk16`` instructions over increasing 16-wide K groups into one fp32
accumulator, whatever the tile. The *family* is the set of configurations with ``FAMILY_BLOCK_K`` that
lower to wgmma: ``CANDIDATES`` lists its members that the launcher may use, ``CONFIG`` is the
canonical one (64 x 128 x 64, 4 warps, 3 stages: the single configuration of earlier versions).

The claim: every member computes every output element with bitwise the same result, so the choice of
member -- and hence M -- never changes a bit. Tile sizes change which program and which warp group
computes an element and the instruction's N width, not the element's K order or its instructions'
arithmetic. NVIDIA does not document wgmma's internal accumulation, so this rests on evidence, checked
per GPU and Triton version:

- ``tests/test_batch_invariant_matmul_gpu.py::test_family_members_give_the_canonical_bits`` (GPU):
  every member of ``CANDIDATES`` gives the canonical configuration's bits on fresh random and
  wide-exponent inputs (odd M, K tails, odd N, bias, bf16 and fp16), and
  ``::test_dispatched_rows_alone_equal_rows_in_large_batches`` / ``::test_rows_do_not_depend_on_m``
  check rows under the dispatch (M = 1 alone vs inside M = 4096 / 8192, other members);
- ``tests/test_batch_invariant_matmul.py::test_table_configs_compile_to_wgmma_on_sm90`` (CPU): every
  member compiles for sm_90 to ``wgmma ... k16.f32`` only, no ``mma.sync`` (no silent fallback);
- ``benchmarks/bench_batch_invariant_matmul.py --sweep`` re-checks each candidate bitwise on every
  benchmarked input and never proposes one that differs.

If the family test fails on some GPU, ``DISPATCH = ((None, CONFIG),)`` restores one configuration for
every M (the pre-dispatch contract: slower, but then no equivalence is assumed).

What is guaranteed: row ``m``'s bits depend only on ``x[m]``, ``W``, ``bias``, the family and the GPU --
not on M, not on the other rows, not on where the row sits in its M tile, and (by the family test)
not on the member the dispatch picked. Server and trainer get the same bits by calling this same
kernel. What is *not* claimed: bitwise agreement with a plain-PyTorch reference. Tensor cores
accumulate the products of one MMA with their own internal alignment and truncation, which no
sequence of IEEE operations in PyTorch reproduces; :func:`linear_reference` (fp32 accumulation in the
same K order) agrees to within fp32 rounding of the accumulation, and the tests hold it to an error
bound, as a check that the kernel computes the right product -- exactness is tested as M-invariance,
bit for bit.

Trade-offs
----------
* Without split-K a program owns whole output tiles: at decode (M <= 64, one M tile) the parallelism
  is ``cdiv(N, BLOCK_N)`` programs, so small ``BLOCK_N`` (16: 256 programs for N = 4096, but only 64
  for N = 1024) and deep pipelines keep W streaming; narrow layers (N = 1024) at M = 1 may stay below
  what cuBLAS's split-K GEMV reaches. Large M uses 128 x 256 tiles, but no TMA, persistent or
  warp-specialised schedule. Not yet measured: ``DISPATCH`` is a first-principles default until a GPU
  sweep (``benchmarks/bench_batch_invariant_matmul.py --sweep``, which prints a pasteable table)
  replaces it.
* The equivalence is an empirical property of sm_90 wgmma (and of the Triton version's lowering), not a
  theorem: a new GPU or Triton needs the family test re-run before the dispatch is trusted.
* Grouped tile order (``GROUP_M`` M tiles share a band of W in L2) changes only which program runs
  when, never a value.
* On the CPU (not interpreting), :func:`batch_invariant_linear` is ``F.linear``: bf16 ``F.linear`` is
  already row-invariant there (tests/test_contract_ops.py), and the kernel needs a GPU. Under the
  Triton interpreter ``tl.dot`` is numpy, so interpreter tests check the launcher and masks, not the
  family claim.
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

    @property
    def name(self) -> str:
        return (
            f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"
            f" g{self.group_m}"
        )


FAMILY_BLOCK_K = 64  # part of the contract: the K chunk order of every family member
CONFIG = MatmulConfig()  # the canonical family member (the GPU family test compares every member to it)


def _c(block_m: int, block_n: int, num_warps: int, num_stages: int) -> MatmulConfig:
    return MatmulConfig(block_m, block_n, FAMILY_BLOCK_K, 8, num_warps, num_stages)


# Every configuration the launcher may use: one family (FAMILY_BLOCK_K, wgmma-eligible tiles), each
# member checked bitwise against CONFIG on the GPU and for its wgmma lowering on the CPU. Shared memory
# per stage is (BLOCK_M + BLOCK_N) * 64 * 2 bytes; sm_90 allows 227 KiB per program.
CANDIDATES: tuple[MatmulConfig, ...] = (
    _c(64, 16, 4, 8),  # decode: N/16 programs, 7 x 2 KiB of W in flight each, 80 KiB smem (2 per SM)
    _c(64, 32, 4, 6),
    _c(64, 64, 4, 5),
    CONFIG,  # 64 x 128, 4 warps, 3 stages
    _c(64, 128, 4, 4),
    _c(64, 256, 8, 3),  # two warp groups side by side along N
    _c(128, 32, 4, 5),  # M ~ 128: W read once, N/32 programs
    _c(128, 64, 4, 4),
    _c(128, 128, 4, 4),
    _c(128, 128, 8, 4),  # two warp groups stacked along M
    _c(128, 256, 8, 3),  # prefill: the Triton Hopper GEMM tile (144 KiB smem)
    _c(128, 256, 8, 4),  # 192 KiB smem
)

# M ranges -> family member: (largest M of the range, config); the last row's None is "any larger M".
# First-principles defaults, to be replaced by the GPU sweep's table:
# - M <= 64 (one 64-row tile; W's N*K*2 bytes dominate): BLOCK_N 16 -> most SMs stream W (N = 4096:
#   256 programs on 132 SMs), 8 stages keep ~14 KiB of W in flight per program;
# - M <= 256: still memory-bound on W (M flops per byte of W, H100's ridge is ~300): grow BLOCK_N with M
#   so that cdiv(M, 64) * cdiv(N, BLOCK_N) stays ~256 programs and grouped M tiles share W in L2;
# - M <= 4096: 128 x 128 tiles, enough programs for 132 SMs even at N = 1024;
# - larger M: 128 x 256 x 64, 8 warps, 3 stages (compute-bound: fewest bytes of smem per flop).
# From `bench_batch_invariant_matmul.py --sweep` on an H200 (2026-11-28; every candidate bitwise equal
# to CONFIG there, and tests/test_batch_invariant_matmul_gpu.py's family test passed): per M range
# the candidate with the best worst-case cuBLAS/ours over the bench shapes; per shape where it gains.
DISPATCH: tuple[tuple[int | None, MatmulConfig], ...] = (
    (64, _c(64, 64, 4, 5)),
    (128, _c(128, 32, 4, 5)),
    (256, _c(64, 128, 4, 4)),
    (1024, _c(128, 128, 8, 4)),
    (None, _c(128, 256, 8, 4)),
)
SHAPE_DISPATCH: dict[tuple[int, int], tuple[tuple[int | None, MatmulConfig], ...]] = {
    (1024, 4096): (
        (64, _c(64, 64, 4, 5)),
        (128, _c(64, 16, 4, 8)),
        (256, _c(64, 32, 4, 6)),
        (1024, _c(64, 64, 4, 5)),
        (4096, _c(128, 256, 8, 4)),
        (None, _c(128, 256, 8, 3)),
    ),
    (4096, 4096): (
        (128, _c(128, 32, 4, 5)),
        (256, _c(64, 64, 4, 5)),
        (1024, _c(128, 256, 8, 3)),
        (4096, _c(128, 256, 8, 4)),
        (None, _c(128, 256, 8, 3)),
    ),
    (4096, 12288): (
        (64, _c(64, 16, 4, 8)),
        (128, _c(64, 32, 4, 6)),
        (256, _c(64, 64, 4, 5)),
        (None, _c(128, 256, 8, 4)),
    ),
    (4096, 14336): (
        (128, _c(64, 32, 4, 6)),
        (256, _c(64, 64, 4, 5)),
        (None, _c(128, 256, 8, 4)),
    ),
    (12288, 4096): (
        (64, _c(64, 64, 4, 5)),
        (128, _c(128, 64, 4, 4)),
        (1024, _c(128, 256, 8, 4)),
        (4096, _c(128, 256, 8, 3)),
        (None, _c(128, 256, 8, 4)),
    ),
    (14336, 4096): (
        (64, _c(64, 64, 4, 5)),
        (128, _c(128, 64, 4, 4)),
        (256, _c(128, 256, 8, 4)),
        (1024, _c(128, 128, 8, 4)),
        (None, _c(128, 256, 8, 4)),
    ),
    (151936, 1024): (
        (64, _c(64, 128, 4, 3)),
        (4096, _c(128, 256, 8, 4)),
        (None, _c(128, 256, 8, 3)),
    ),
}


def wgmma_eligible(c: MatmulConfig) -> bool:
    """Whether Triton lowers this tile's ``tl.dot`` to sm_90's wgmma (its MMAv3 conditions for 16-bit
    inputs: BLOCK_M a multiple of 64, warps a multiple of 4, BLOCK_N a multiple of 8 and K >= 16;
    ``tl.dot`` itself needs every dimension >= 16)."""
    return (
        c.block_m % 64 == 0
        and c.num_warps % 4 == 0
        and c.block_n % 8 == 0
        and c.block_n >= 16
        and c.block_k % 16 == 0
        and c.block_k >= 16
    )


def in_family(c: MatmulConfig) -> bool:
    """A member of the family: the contract's BLOCK_K and a wgmma-eligible tile."""
    return c.block_k == FAMILY_BLOCK_K and wgmma_eligible(c)


def _check_table(rows) -> None:
    bounds = [b for b, _ in rows]
    if not rows or bounds[-1] is not None or any(b is None or b < 1 for b in bounds[:-1]):
        raise ValueError(f"dispatch rows must be (M bound >= 1, config)..., (None, config): {bounds}")
    if bounds[:-1] != sorted(set(bounds[:-1])):
        raise ValueError(f"dispatch M bounds must increase: {bounds}")
    for _, c in rows:
        if c not in CANDIDATES:
            raise ValueError(f"dispatch config {c} is not in CANDIDATES (the GPU-tested family)")


def _check_tables() -> None:
    for c in CANDIDATES:
        if not in_family(c):
            raise ValueError(f"candidate {c} is outside the family (BLOCK_K {FAMILY_BLOCK_K}, wgmma)")
    if CONFIG not in CANDIDATES:
        raise ValueError("CONFIG must be one of CANDIDATES")
    _check_table(DISPATCH)
    for rows in SHAPE_DISPATCH.values():
        _check_table(rows)


_check_tables()


def config_for(m: int, n: int, k: int) -> MatmulConfig:
    """The family member for an ``[m, k] @ [n, k]^T`` product: the first row of ``SHAPE_DISPATCH[(n, k)]``
    (else ``DISPATCH``) whose M bound is >= m. A pure function of (m, n, k): no device, dtype, timing or
    autotuning state. Any member gives the same bits (the family test, see the module docstring), so
    the choice affects speed only."""
    for bound, c in SHAPE_DISPATCH.get((n, k), DISPATCH):
        if bound is None or m <= bound:
            return c
    raise AssertionError("unreachable: the last dispatch row has no bound")


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
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """``x`` [M, K] @ ``weight`` [N, K]^T (+ bias) -> [M, N] in x's dtype, by the Triton kernel.

    ``config=None``: the family member :func:`config_for` picks for (M, N, K) (same bits as any
    other member). An explicit ``config`` is used as given, in the family or not (tests, sweeps)."""
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
    c = config if config is not None else config_for(m, n, k)
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
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """``F.linear`` with M-invariant rows: the Triton kernel on CUDA (and under the interpreter),
    ``F.linear`` elsewhere (bf16 CPU linear rows are already M-invariant). Differentiable (the kernel
    path with ``F.linear``'s backward), so the trainer trains through it. ``config``: as
    :func:`batch_invariant_mm` (None: the dispatch, with M = the product of x's leading dimensions)."""
    if not (x.is_cuda or _interpreting()):
        return torch.nn.functional.linear(x, weight, bias)
    return _BatchInvariantLinear.apply(x, weight, bias, config)


@torch.no_grad()
def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, config: MatmulConfig = CONFIG
) -> torch.Tensor:
    """Plain PyTorch, the same K blocks in the same order with fp32 accumulation (float64 inside each
    block): the kernel's value up to the tensor cores' rounding inside a block. Not bitwise (see the
    module docstring); for error-bound checks. Only ``config.block_k`` matters, the same for every
    family member (the default, ``CONFIG``, stands for whichever member the dispatch picks)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    w = weight.double()
    acc = torch.zeros(x2.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    for k0 in range(0, x2.shape[1], config.block_k):
        acc = acc + (x2[:, k0 : k0 + config.block_k] @ w[:, k0 : k0 + config.block_k].T).float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
