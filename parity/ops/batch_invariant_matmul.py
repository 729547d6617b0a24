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
of the definition; the rest of the launch -- the kernel, ``BLOCK_M``, ``BLOCK_N``, ``GROUP_M``, warps,
stages, and where K is a multiple of it a wider K step (below) -- is a *member of the family* chosen
per call by :func:`config_for` from M and the weight's shape.

Kernels
-------
Two kernels implement these semantics with the same per-element arithmetic; they differ only in how
data moves and in which program computes which tile (``MatmulConfig.kernel``):

- ``"ptr"`` (:func:`_bi_matmul_kernel`): one program per output tile, masked pointer loads pipelined
  by Triton (``cp.async``), masked pointer stores. Any strides.
- ``"tma_persistent"`` (:func:`_bi_matmul_tma_kernel`): a persistent grid of min(SMs, tiles) programs,
  each looping over tiles in the same grouped order; X and W tiles loaded by TMA through descriptors
  built on the device (``tl.make_tensor_descriptor``; out-of-bounds elements load as exact zeros, as
  the masked loads), the K loop flattened into the tile loop so the next tile's loads overlap this
  tile's epilogue; the output stored by TMA (optionally in two halves, ``epilogue_subtile``) or, when
  Y's layout does not allow TMA, by masked pointer stores. ``warp_specialize`` members use Triton's
  Hopper warp specialisation (a producer warp group issuing TMA loads, two consumer warp groups each
  running the wgmma chain of 64 rows of the tile).

*Dispatch by layout*: TMA needs a unit last-dimension stride, a row stride that is a multiple of 16
bytes and a 16-byte aligned base (:func:`tma_compatible`). A ``tma_persistent`` member called with an
``x`` or ``weight`` that does not qualify (K * 2 bytes not a multiple of 16, a non-contiguous view, a
misaligned ``data_ptr``) runs ``_bi_matmul_kernel`` with its tile, warps and stages instead -- another
member of the same family, so the bits are the same (the GPU family test includes such a layout).
The device-side descriptors need Triton's global scratch allocator; :func:`_launch_tma` sets one
(PyTorch's caching allocator) for the duration of its launch only and restores the previous one.

Configuration families, and why the launch may depend on M
----------------------------------------------------------
On Hopper (sm_90) Triton lowers ``tl.dot`` to ``wgmma`` when the tile allows it (``BLOCK_M`` a
multiple of 64, ``num_warps`` a multiple of 4), else to ``mma.sync``. With wgmma an output element's
K loop is a chain of ``m64nNk16`` instructions over increasing 16-wide K groups into one fp32
accumulator, whatever the tile. The *family* is the set of configurations with ``FAMILY_BLOCK_K`` (or
a wide K step, below) that lower to wgmma: ``CANDIDATES`` lists its members that the launcher may
use, ``CONFIG`` is the canonical one (64 x 128 x 64, 4 warps, 3 stages: the single configuration of
earlier versions).

*Wide K steps.* A pointer-kernel member may step K by 128 or 256 (``WIDE_BLOCK_KS``): one ``tl.dot``
over 2 or 4 of the contract's 64-wide chunks. With wgmma that is the same chain of k16 instructions in
the same increasing order into the same accumulator, only issued from one loop iteration instead of
several; halving the K iterations is what lets a narrow layer (N = 1024: 64 programs at BLOCK_N 16,
no split-K) keep more of W in flight. Such a member serves only weights whose K is a multiple of its
step (:func:`serves_k`): there its tiles have no padded tail, so the padding never differs from the
64-wide chunks'. The shape tables may use it for such a (N, K) only; ``DISPATCH`` (any K) never.

The claim: every member computes every output element with bitwise the same result, so the choice of
member -- and hence M -- never changes a bit. Tile sizes and the kernel change which program and
which warp group computes an element, the instruction's N width and how the operands reach shared
memory (``cp.async`` or TMA), not the element's K order or its instructions' arithmetic. NVIDIA does
not document wgmma's internal accumulation, so this rests on evidence, checked per GPU and Triton
version:

- ``tests/test_batch_invariant_matmul_gpu.py::test_family_members_give_the_canonical_bits`` (GPU):
  every member of ``CANDIDATES`` gives the canonical configuration's bits on fresh random and
  wide-exponent inputs (odd M, K tails, odd N, bias, bf16 and fp16, a K whose rows TMA cannot
  address), and
  ``::test_dispatched_rows_alone_equal_rows_in_large_batches`` / ``::test_rows_do_not_depend_on_m``
  check rows under the dispatch (M = 1 alone vs inside M = 4096 / 8192, other members), and
  ``::test_tma_members_rows_alone_equal_rows_in_m4096`` each ``tma_persistent`` member on its own;
- ``tests/test_batch_invariant_matmul.py::test_table_configs_compile_to_wgmma_on_sm90`` (CPU): every
  member compiles for sm_90 to ``wgmma ... k16.f32`` only, no ``mma.sync`` (no silent fallback), always
  accumulating into its C operand (scale-d constant true: the explicit fp32 zero of the contract, never
  wgmma's "D = A B" form, which could differ in the sign of a zero); ``tma_persistent`` members load
  by ``cp.async.bulk.tensor`` and lower their layout fallback (the pointer kernel) to wgmma too;
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
  what cuBLAS's split-K GEMV reaches. The persistent grid is one program per SM (not two where shared
  memory would allow it). ``DISPATCH`` / ``SHAPE_DISPATCH`` come from a GPU sweep of every member,
  pointer and TMA (``benchmarks/bench_batch_invariant_matmul.py --sweep``, H200): the TMA members
  carry prefill (M >= 1024: 0.85-1.01 of cuBLAS, the pointer kernel 0.67-0.85), the pointer members
  most of decode.
* Warp specialisation on sm_90 is Triton 3.6's automatic Hopper pass: it partitions the loop only with
  ``num_warps`` 4 (other warp counts, or a flattened loop nest, compile unpartitioned) and fails to
  compile a subtiled epilogue; the CPU lowering test checks that each ``warp_specialize`` member
  really is partitioned.
* The equivalence is an empirical property of sm_90 wgmma (and of the Triton version's lowering), not a
  theorem: a new GPU or Triton needs the family test re-run before the dispatch is trusted.
* Grouped tile order (``GROUP_M`` M tiles share a band of W in L2) changes only which program runs
  when, never a value.
* On the CPU (not interpreting), :func:`batch_invariant_linear` is ``F.linear``: bf16 ``F.linear`` is
  already row-invariant there (tests/test_contract_ops.py), and the kernel needs a GPU. Under the
  Triton interpreter ``tl.dot`` is numpy, so interpreter tests check the launcher and masks, not the
  family claim (the interpreter runs TMA descriptors as masked pointer accesses, with TMA's alignment
  rules asserted; it ignores flattening and warp specialisation:
  tests/test_batch_invariant_matmul_tma_interpreter.py).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from parity.ops.device import sm_count

KERNELS = ("ptr", "tma_persistent")  # the two kernels of the family (see "Kernels" above)


class MatmulConfig(NamedTuple):
    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = "ptr"  # one of KERNELS
    epilogue_subtile: bool = False  # tma_persistent: the output tile stored in two BLOCK_N / 2 halves
    warp_specialize: bool = False  # tma_persistent: Triton's warp-specialised (producer/consumer) loop

    @property
    def name(self) -> str:
        base = (
            f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} s{self.num_stages}"
            f" g{self.group_m}"
        )
        if self.kernel == "ptr":
            return base
        return base + " tma" + " sub" * self.epilogue_subtile + " ws" * self.warp_specialize


FAMILY_BLOCK_K = 64  # part of the contract: the K chunk order of every family member
WIDE_BLOCK_KS = (128, 256)  # wider K steps of pointer members, for K a multiple of the step (serves_k)
CONFIG = MatmulConfig()  # the canonical family member (the GPU family test compares every member to it)


def _c(block_m: int, block_n: int, num_warps: int, num_stages: int) -> MatmulConfig:
    return MatmulConfig(block_m, block_n, FAMILY_BLOCK_K, 8, num_warps, num_stages)


def _w(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> MatmulConfig:
    return MatmulConfig(block_m, block_n, block_k, 8, num_warps, num_stages)


def _t(
    block_m: int, block_n: int, num_warps: int, num_stages: int, *, sub: bool = False, ws: bool = False
) -> MatmulConfig:
    return MatmulConfig(block_m, block_n, FAMILY_BLOCK_K, 8, num_warps, num_stages, "tma_persistent", sub, ws)


# Every configuration the launcher may use: one family (FAMILY_BLOCK_K or a wide step, wgmma tiles), each
# member checked bitwise against CONFIG on the GPU and for its wgmma lowering on the CPU. Shared memory
# per stage is (BLOCK_M + BLOCK_N) * 64 * 2 bytes; the TMA kernel adds its output staging buffer,
# BLOCK_M * BLOCK_N * 2 bytes (half of it with the epilogue subtiled); sm_90 allows 227 KiB per program.
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
    # the persistent TMA kernel (not yet in the dispatch tables: the GPU sweep places them). Decode: W
    # streamed by TMA in deep pipelines (one tile per program while tiles <= SMs)
    _t(64, 16, 4, 10),  # 10 x 10 KiB stages
    _t(64, 32, 4, 8),
    _t(64, 64, 4, 6),
    _t(64, 128, 4, 4),
    # M in the hundreds to thousands
    _t(128, 64, 4, 5),
    _t(128, 128, 8, 4),  # 160 KiB smem
    # prefill: the tutorial's Hopper tiles; subtiling halves the 64 KiB output staging buffer
    _t(128, 256, 8, 3, sub=True),  # 176 KiB smem
    _t(128, 256, 8, 4, sub=True),  # 224 KiB smem
    # warp-specialised (sm_90, Triton 3.6: num_warps 4 -> one producer and two consumer warp groups of
    # 4 warps, each consumer 64 rows of the tile; the pass rejects subtiled epilogues)
    _t(128, 128, 4, 4, ws=True),
    _t(128, 256, 4, 3, ws=True),  # 208 KiB smem
    # wide K steps (pointer kernel; K a multiple of the step): narrow decode layers, half or a quarter
    # of the K iterations. (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes per stage
    _w(64, 16, 256, 4, 4),  # 4 x 40 KiB stages: N = 1024
    _w(64, 32, 128, 4, 5),  # 5 x 24 KiB stages: N = 4096
)

# M ranges -> family member: (largest M of the range, config); the last row's None is "any larger M".
# The first-principles reasoning behind the candidates (the sweep below picks among them):
# - M <= 64 (one 64-row tile; W's N*K*2 bytes dominate): BLOCK_N 16 -> most SMs stream W (N = 4096:
#   256 programs on 132 SMs), 8 stages keep ~14 KiB of W in flight per program;
# - M <= 256: still memory-bound on W (M flops per byte of W, H100's ridge is ~300): grow BLOCK_N with M
#   so that cdiv(M, 64) * cdiv(N, BLOCK_N) stays ~256 programs and grouped M tiles share W in L2;
# - M <= 4096: 128 x 128 tiles, enough programs for 132 SMs even at N = 1024;
# - larger M: 128 x 256 x 64, 8 warps, 3 stages (compute-bound: fewest bytes of smem per flop).
# From `bench_batch_invariant_matmul.py --sweep` on an H200 (2026-11-28, with the TMA members; every
# candidate bitwise equal to CONFIG there, and tests/test_batch_invariant_matmul_gpu.py's family test
# passed): per M range the candidate with the best worst-case cuBLAS/ours over the bench shapes; per
# shape where it gains. The comments: that worst case (and the global table's pick at the same rows).
# Decode rows (M <= 256) marked "graph": from `--sweep --graph` (2026-11-29, H200; the products timed
# as SGLang's decode runs them, inside CUDA graphs over distinct weights, no L2 flush per call) over
# the 7 bench shapes and Qwen3-0.6B's four (qkv 4096x1024, o 1024x2048, gate_up 6144x1024, down
# 1024x3072); every candidate bitwise equal to CONFIG there too. Under do_bench these 5-15 us products
# were timed mostly as the L2 flush's tail and the launch, which had picked 128x32 for M <= 64.
# Rows marked "wide K": from `--sweep --graph` with the wide K steps among the candidates (2026-11-30,
# H200, M = 1..256, the narrow shapes; every candidate bitwise equal to CONFIG, and the family test
# passed with them); in parentheses the best 64-wide member's worst case.
DISPATCH: tuple[tuple[int | None, MatmulConfig], ...] = (
    (64, _c(64, 32, 4, 6)),  # graph, M 1..64: worst 0.63 at N=1024 K=4096 M=1 (128x32 s5: 0.50)
    (128, _t(64, 64, 4, 6)),  # M 65..128: worst 0.61 at N=1024 K=4096 M=128 (now 0.35)
    (256, _c(64, 64, 4, 5)),  # M 129..256: worst 0.49 at N=151936 K=1024 M=256 (now 0.68)
    (1024, _t(128, 128, 8, 4)),  # M 257..1024: worst 0.58 at N=1024 K=4096 M=1024 (now 0.67)
    (None, _t(128, 256, 8, 4, sub=True)),  # M 1025..inf: worst 0.88 at N=14336 K=4096 M=4096 (now 0.70)
)
SHAPE_DISPATCH: dict[tuple[int, int], tuple[tuple[int | None, MatmulConfig], ...]] = {
    # Qwen3-0.6B's projections (graph; the rows above 256 are DISPATCH's)
    (1024, 2048): (
        (128, _w(64, 16, 256, 4, 4)),  # graph, wide K: worst 0.92 (64x16 s8: 0.88); worst 0.95 (0.90)
        (256, _w(64, 32, 128, 4, 5)),  # graph, wide K: worst 0.89 (64x32 s6: 0.89)
        (1024, _t(128, 128, 8, 4)),
        (None, _t(128, 256, 8, 4, sub=True)),
    ),
    (1024, 3072): (
        (128, _w(64, 16, 256, 4, 4)),  # graph, wide K: worst 0.92 (64x16 s8: 0.85); worst 0.97 (0.90)
        (256, _w(64, 32, 128, 4, 5)),  # graph, wide K: worst 0.80 (64x32 s6: 0.79)
        (1024, _t(128, 128, 8, 4)),
        (None, _t(128, 256, 8, 4, sub=True)),
    ),
    (4096, 1024): (
        (64, _c(64, 32, 4, 6)),  # graph: worst 0.93 (128x32 s5: 0.71)
        (256, _c(64, 64, 4, 5)),  # graph: worst 0.85 (global pick 0.61); worst 0.80 (global pick 0.80)
        (1024, _t(128, 128, 8, 4)),
        (None, _t(128, 256, 8, 4, sub=True)),
    ),
    (6144, 1024): (
        (128, _c(64, 64, 4, 5)),  # graph: worst 0.90 (128x32 s5: 0.59); worst 0.77 (global pick 0.52)
        (256, _c(128, 128, 8, 4)),  # graph: worst 0.73 (global pick 0.54)
        (1024, _t(128, 128, 8, 4)),
        (None, _t(128, 256, 8, 4, sub=True)),
    ),
    (1024, 4096): (
        (128, _w(64, 16, 256, 4, 4)),  # graph, wide K: worst 0.69 (64x16 s8: 0.63); worst 0.83 (0.76)
        (256, _w(64, 32, 128, 4, 5)),  # graph, wide K: worst 0.83 (64x32 s6: 0.80)
        (1024, _c(64, 64, 4, 5)),  # worst 0.70 (global pick 0.58)
        (None, _t(128, 256, 8, 4, sub=True)),  # worst 0.90 (global pick 0.90)
    ),
    (4096, 4096): (
        (64, _w(64, 32, 128, 4, 5)),  # graph, wide K: worst 0.93 (64x32 s6: 0.77)
        (128, _c(64, 32, 4, 6)),  # graph: worst 0.81 (64x64 s5: 0.66); worst 0.82 (64x64 tma: 0.75)
        (256, _c(64, 64, 4, 5)),  # worst 0.87 (global pick 0.87)
        (1024, _c(128, 256, 8, 4)),  # worst 0.83 (global pick 0.74)
        (None, _t(128, 256, 8, 4, sub=True)),  # worst 0.90 (global pick 0.90)
    ),
    (4096, 12288): (
        (64, _w(64, 32, 128, 4, 5)),  # graph, wide K: worst 0.91 (64x32 s6: 0.67)
        (128, _t(64, 64, 4, 6)),  # graph: worst 0.74 (64x32 s6: 0.73)
        (256, _t(128, 64, 4, 5)),  # graph: worst 0.76 (global pick 0.68)
        (None, _t(128, 256, 8, 4, sub=True)),  # worst 0.91 (global pick 0.82); worst 0.94 (global pick 0.94)
    ),
    (4096, 14336): (
        (128, _c(64, 32, 4, 6)),  # worst 0.77 (global pick 0.60); worst 0.76 (global pick 0.75)
        (256, _t(128, 64, 4, 5)),  # worst 0.73 (global pick 0.68)
        (1024, _t(128, 256, 4, 3, ws=True)),  # worst 0.88 (global pick 0.80)
        (None, _t(128, 256, 8, 4, sub=True)),  # worst 0.90 (global pick 0.90)
    ),
    (12288, 4096): (
        (64, _c(64, 64, 4, 5)),  # graph: worst 1.00 (64x128 tma: 0.69)
        (128, _t(128, 128, 4, 4, ws=True)),  # worst 0.86 (global pick 0.67)
        (256, _t(128, 256, 8, 4, sub=True)),  # worst 0.79 (global pick 0.55)
        (1024, _t(128, 256, 4, 3, ws=True)),  # worst 0.92 (global pick 0.86)
        (None, _t(128, 256, 8, 4, sub=True)),  # worst 0.93 (global pick 0.93)
    ),
    (14336, 4096): (
        (64, _c(64, 64, 4, 5)),  # worst 0.98 (global pick 0.64)
        (128, _c(128, 64, 4, 4)),  # worst 0.93 (global pick 0.62)
        (256, _t(128, 256, 8, 4, sub=True)),  # worst 0.92 (global pick 0.51)
        (None, _t(128, 128, 8, 4)),  # worst 0.85 (global pick 0.85); worst 0.89 (global pick 0.88)
    ),
    (151936, 1024): (
        (64, _c(64, 128, 4, 3)),  # worst 1.02 (global pick 0.55)
        (128, _t(128, 128, 4, 4, ws=True)),  # worst 0.99 (global pick 0.68)
        (1024, _t(128, 256, 8, 4, sub=True)),  # worst 0.94 (global pick 0.49); worst 0.96 (global pick 0.86)
        (None, _t(128, 256, 8, 3, sub=True)),  # worst 0.97 (global pick 0.95)
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
    """A member of the family: the contract's BLOCK_K (or, in the pointer kernel, one of
    ``WIDE_BLOCK_KS``), a wgmma-eligible tile and one of ``KERNELS`` (the subtile and
    warp-specialisation switches exist only in the TMA kernel)."""
    knobs_ok = c.kernel == "tma_persistent" or not (c.epilogue_subtile or c.warp_specialize)
    step_ok = c.block_k == FAMILY_BLOCK_K or (c.block_k in WIDE_BLOCK_KS and c.kernel == "ptr")
    return step_ok and wgmma_eligible(c) and c.kernel in KERNELS and knobs_ok


def serves_k(c: MatmulConfig, k: int) -> bool:
    """Whether member ``c`` gives the family's bits for a weight with ``k`` columns: every member at
    the contract's BLOCK_K; a wide K step only where it divides K (no padded tail)."""
    return c.block_k == FAMILY_BLOCK_K or k % c.block_k == 0


def _check_table(rows, k: int | None) -> None:
    """One dispatch table: increasing M bounds, the last None; members of CANDIDATES that serve ``k``
    (None: the global table, any K)."""
    bounds = [b for b, _ in rows]
    if not rows or bounds[-1] is not None or any(b is None or b < 1 for b in bounds[:-1]):
        raise ValueError(f"dispatch rows must be (M bound >= 1, config)..., (None, config): {bounds}")
    if bounds[:-1] != sorted(set(bounds[:-1])):
        raise ValueError(f"dispatch M bounds must increase: {bounds}")
    for _, c in rows:
        if c not in CANDIDATES:
            raise ValueError(f"dispatch config {c} is not in CANDIDATES (the GPU-tested family)")
        if not (serves_k(c, k) if k is not None else c.block_k == FAMILY_BLOCK_K):
            where = f"K = {k}" if k is not None else "DISPATCH (any K)"
            raise ValueError(f"dispatch config {c}: its K step {c.block_k} does not serve {where}")


def _check_tables() -> None:
    for c in CANDIDATES:
        if not in_family(c):
            raise ValueError(
                f"candidate {c} is outside the family (BLOCK_K {FAMILY_BLOCK_K} or a pointer member's"
                f" {WIDE_BLOCK_KS}, wgmma, KERNELS)"
            )
    if CONFIG not in CANDIDATES:
        raise ValueError("CONFIG must be one of CANDIDATES")
    _check_table(DISPATCH, None)
    for (_, k), rows in SHAPE_DISPATCH.items():
        _check_table(rows, k)


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


@triton.jit
def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(M tile, N tile) of linear tile index ``tile`` in ``_bi_matmul_kernel``'s grouped order: GROUP_M
    consecutive M tiles sweep the N tiles together (L2 reuse of W). Scheduling only, never a value."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _round_to_output(acc, OUT_DTYPE: tl.constexpr, OUT_BF16_INTERP: tl.constexpr):
    """The contract's one rounding of the fp32 result: ``cvt.rn`` to the output dtype on the GPU; under
    the interpreter (whose fp32 -> bf16 cast is not round-to-nearest-even) the same rounding on the bits:
    add 0x7FFF plus the lowest kept bit, drop the low 16 bits; NaN -> the canonical quiet NaN.
    (``_bi_matmul_kernel`` keeps these lines inline: ``parity/ops/moe_experts.py`` mirrors it line by
    line.)"""
    if OUT_BF16_INTERP:
        bits = acc.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(acc != acc, 0x7FC0, r)
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return acc.to(OUT_DTYPE)


@triton.jit(do_not_specialize=["M"])
def _bi_matmul_tma_kernel(
    X, W, BIAS, Y,
    M, N: tl.constexpr, K: tl.constexpr,
    sxm, swn, sym, syn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, Y_TMA: tl.constexpr,
    OUT_BF16_INTERP: tl.constexpr,
    INTERP_STEPS: tl.constexpr,  # under the interpreter: cdiv(tiles, programs) (else 0)
):  # fmt: skip
    """The persistent TMA kernel: the same per-element arithmetic as ``_bi_matmul_kernel`` (fp32 zero,
    ``tl.dot`` over increasing BLOCK_K chunks, + fp32 bias, one rounding); only the data movement and
    the schedule differ. X [M, K] and W [N, K] are read through TMA descriptors built on the device; Y
    is written by TMA (``Y_TMA``) or by masked pointer stores (a Y row stride TMA cannot address)."""
    # Out-of-bounds box elements load as exact zeros ("zero" padding): the K tail and the rows / columns
    # past M / N contribute +0 products, as the pointer kernel's masked loads (other=0).
    x_desc = tl.make_tensor_descriptor(X, [M, K], [sxm, 1], [BLOCK_M, BLOCK_K], padding_option="zero")
    w_desc = tl.make_tensor_descriptor(W, [N, K], [swn, 1], [BLOCK_N, BLOCK_K], padding_option="zero")
    if Y_TMA:
        # a TMA store writes only the in-bounds part of its box (the pointer kernel's store mask)
        y_desc = tl.make_tensor_descriptor(
            Y, [M, N], [sym, 1], [BLOCK_M, BLOCK_N // 2 if EPILOGUE_SUBTILE else BLOCK_N]
        )
    start = tl.program_id(0)
    step = tl.num_programs(0)  # the persistent grid: min(SMs, tiles) programs, tiles strided over them
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m * num_n
    # The epilogue derives its tile from its own counter (as Triton's persistent-matmul tutorial), so
    # the flattened loop's pipeliner does not carry the prologue's indices into the epilogue.
    tile_c = start - step
    # This program's tiles: start, start + step, ... < num_tiles. The interpreter's program id cannot
    # bound a range() (numpy 2): there the launcher passes the busiest program's count (INTERP_STEPS),
    # and the other programs' spare steps redo the last tile (the same values, stored again).
    # flatten: the K loop fused into the tile loop, so loads for the next tile overlap this tile's
    # epilogue; Triton 3.6's Hopper warp specialisation needs the loop nest unflattened.
    for i in tl.range(
        0,
        INTERP_STEPS if INTERP_STEPS else tl.cdiv(num_tiles - start, step),
        flatten=not WARP_SPECIALIZE,
        warp_specialize=WARP_SPECIALIZE,
    ):
        tile = start + i * step
        if INTERP_STEPS:
            tile = tl.minimum(tile, num_tiles - 1)
        pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # increasing K order, every M: the contract's order
            a = x_desc.load([pid_m * BLOCK_M, k0])
            b = w_desc.load([pid_n * BLOCK_N, k0])  # [BLOCK_N, BLOCK_K] of W; b.T is W^T's tile
            if OUT_BF16_INTERP:
                # the interpreter's dot would multiply bf16's raw uint16 storage: give it the exact fp32
                # values (np.matmul, fp32)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b.T, acc)  # fp32 accumulation on tensor cores
        tile_c += step
        if INTERP_STEPS:
            tile_c = tl.minimum(tile_c, num_tiles - 1)
        pid_m, pid_n = _grouped_tile(tile_c, num_m, num_n, GROUP_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc = acc + tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        y = _round_to_output(acc, Y.dtype.element_ty, OUT_BF16_INTERP)  # elementwise: one rounding each
        if Y_TMA:
            if EPILOGUE_SUBTILE:
                # columns [0, BLOCK_N/2) and [BLOCK_N/2, BLOCK_N) as two stores (data movement only)
                y0, y1 = y.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1).split()
                y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y0)
                y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], y1)
            else:
                y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y)
        else:
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            y_ptrs = Y + rm.to(tl.int64)[:, None] * sym + rn[None, :] * syn
            tl.store(y_ptrs, y, mask=(rm < M)[:, None] & (rn < N)[None, :])


def tma_compatible(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address the 2-D tensor ``t``: unit stride along the last dimension,
    non-overlapping rows whose stride is a multiple of 16 bytes, a 16-byte aligned base address."""
    row_bytes = t.stride(0) * t.element_size()
    return t.stride(1) == 1 and t.stride(0) >= t.shape[1] and row_bytes % 16 == 0 and t.data_ptr() % 16 == 0


_INTERPRETER_PROGRAMS = 3  # the interpreter's "SMs": few, so that each program runs several tiles


def _persistent_programs(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else _INTERPRETER_PROGRAMS


def _scratch_allocator(device: torch.device):
    """Triton's global-scratch allocator for the device-side TMA descriptors (128 bytes per descriptor
    and program, 128-byte aligned). The buffer comes from PyTorch's caching allocator on the current
    stream -- the stream Triton launches on -- so freeing it when the launch returns is safe
    (stream-ordered reuse), and under CUDA-graph capture it comes from the graph's pool."""

    def alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        buf = torch.empty(size, dtype=torch.int8, device=device)
        if buf.data_ptr() % alignment:  # cudaMalloc'd blocks are >= 256-byte aligned; never expected
            raise RuntimeError(
                f"TMA descriptor scratch at {buf.data_ptr():#x} is not {alignment}-byte aligned"
            )
        return buf

    return alloc


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
    other member). An explicit ``config`` is used as given, in the family or not (tests, sweeps). A
    ``tma_persistent`` member whose ``x`` or ``weight`` TMA cannot address (:func:`tma_compatible`) runs
    the pointer kernel with the same tile (dispatch by layout, see the module docstring)."""
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
    if c.kernel not in KERNELS:
        raise ValueError(f"unknown kernel {c.kernel!r} in {c} (one of {KERNELS})")
    if c.kernel == "tma_persistent" and tma_compatible(x) and tma_compatible(weight):
        _launch_tma(x, weight, bias, out, c)
    else:  # the pointer kernel: its own members, and TMA members on layouts TMA cannot address
        _launch_ptr(x, weight, bias, out, c)
    return out


def _launch_ptr(x, weight, bias, out, c: MatmulConfig) -> None:
    m, k = x.shape
    n = weight.shape[0]
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


def _launch_tma(x, weight, bias, out, c: MatmulConfig) -> None:
    m, k = x.shape
    n = weight.shape[0]
    tiles = triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n)
    grid = (min(_persistent_programs(x.device), tiles),)
    # Set the allocator for this launch only, and put back whatever was set before (another library's,
    # or none): ``triton.set_allocator`` sets this ContextVar but hands back no token to undo it. Triton
    # calls the allocator synchronously inside the launch.
    token = _allocation._allocator.set(_scratch_allocator(x.device))
    try:
        _bi_matmul_tma_kernel[grid](
            x, weight, bias if bias is not None else x, out,
            m, n, k,
            x.stride(0), weight.stride(0), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
            EPILOGUE_SUBTILE=c.epilogue_subtile, WARP_SPECIALIZE=c.warp_specialize,
            Y_TMA=tma_compatible(out),
            OUT_BF16_INTERP=_interpreting() and x.dtype == torch.bfloat16,
            INTERP_STEPS=triton.cdiv(tiles, grid[0]) if _interpreting() else 0,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip
    finally:
        _allocation._allocator.reset(token)


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
