"""Block-wise FP8 weight quantization (128x128 blocks, ``float8_e4m3fn``): Triton kernel + PyTorch reference.

The problem
-----------
Every RL step pushes the trainer's bf16 weights into an SGLang server that serves them in block FP8.
The quantization sits on the critical path of each step, so it has to run at memory bandwidth
(read 2 bytes, write 1 byte per element), and it has to be *exact*: the kernel must produce the same
bits as a plain-PyTorch reference that anyone can read, on every input.

Semantics (the format SGLang's ``Fp8LinearMethod`` loads with ``weight_block_size=[128, 128]``)
--------------------------------------------------------------------------------------------
For a weight ``w`` of shape ``[N, K]`` (any float dtype, read as fp32 exactly):

- ``weight``: ``torch.float8_e4m3fn``, shape ``[N, K]`` (same shape, no padding).
- ``weight_scale_inv``: ``torch.float32``, shape ``[ceil(N/128), ceil(K/128)]``; block ``(i, j)``
  covers rows ``128i .. 128i+127`` and columns ``128j .. 128j+127`` (clipped to the tensor). It is the
  *dequantization multiplier*: ``w ≈ weight.float() * weight_scale_inv[i, j]``.
- ``amax  = max |w|`` over the block, in fp32 (exact: max needs no rounding).
- ``scale = max(amax, EPS) / 448`` in fp32, IEEE division rounded to nearest even; ``EPS = 1e-10``.
  An all-zero block therefore gets ``scale = 1e-10 / 448`` (finite, normal) and quantizes to +0
  (or -0 where the bf16 input was -0). A block whose amax is below EPS is quantized against EPS
  (its absolute error stays below ``2^-4 * EPS``); real weights never come near that.
- ``q = e4m3_rne(clamp(w / scale, -448, 448))``: the correctly rounded fp32 quotient (not a
  multiplication by a reciprocal: ``w * (448/amax)`` rounds twice; it differs in ~1 of 10^4
  elements of a random bf16 weight, and in ~3% of the quotients that sit next to an e4m3 rounding
  midpoint), clamped to the largest finite e4m3 value, then rounded to nearest, ties to even. The
  clamp makes the cast saturating: torch's non-saturating ``.to(float8_e4m3fn)`` would turn values
  past the 464 rounding midpoint into NaN (e4m3fn has no infinity). ``|w / scale|`` exceeds 448
  only through the rounding of ``scale`` (by one fp32 ulp at most), so the clamp is there for the
  definition, never for a real change of value.
- Shapes that are not multiples of 128: the edge blocks are smaller; the kernel masks its loads
  and stores (masked lanes read 0, which cannot raise a block's amax) and never pads or copies.
- A NaN or ±Inf anywhere in a weight is an error (:class:`NonFiniteWeightError`) naming the tensor
  and the first bad block in row-major block order. Both implementations mark such a block with a
  NaN scale (so even an unchecked result can never look valid), and the check reads the scales.

Error bound: for a finite block with scale ``s``, every element satisfies
``|q * s - w| <= 2^-4 * |w| + 2^-10 * s`` up to fp32 rounding (relative 2^-22): e4m3 keeps 3
mantissa bits (half an ulp is 2^-4 of the value) down to 2^-6, and below that its subnormal spacing
is 2^-9 (half of it, times s, is the absolute term). In particular the error is at most
``2^-4 * amax`` of the block.

Bitwise equality, and why each step is written the way it is
------------------------------------------------------------
- Division: Triton's ``/`` on fp32 lowers to the approximate ``div.full.f32``. ``scale`` is
  computed with ``tl.math.div_rn`` (IEEE, round to nearest). The per-element quotient ``w / scale``
  is computed without a per-element division (``DIV_MARKSTEIN``): ``r = div_rn(1, scale)`` once per
  block, ``q0 = w * r``, the exact residual ``e = fma(q0, scale, -w)``, and ``fma(-e, r, q0)``,
  which by Markstein's theorem (``r`` correctly rounded, ``q0`` within one ulp) *is* the correctly
  rounded quotient; signed zeros and underflow are handled in the kernel's comments. The GPU tests
  check it bit for bit against IEEE division on millions of quotients placed next to e4m3 rounding
  midpoints, where a wrong last bit changes the fp8 result. (``div_rn`` per element, ``DIV_RN``,
  gives the same bits with a slow-path branch per element: 1-4% slower on large weights.)
- In PyTorch, ``t / 448.0`` with a Python scalar is computed on CUDA as ``t * (1/448)`` (an
  optimization for CPU-scalar divisors), so the reference divides by a *tensor* of 448s and by a
  broadcast tensor of scales: IEEE division on every device.
- Triton links libdevice with flush-to-zero. That cannot change a bit here: the scale is at least
  ``EPS / 448`` (a normal number), and any quotient that is an fp32 subnormal (or comes from one) is
  far below e4m3's rounding threshold 2^-10 and becomes a zero of the same sign either way.
- Non-finite detection costs no second reduction: the block max uses ``max.NaN.f32`` (NaN
  propagates) and Inf is larger than every float, so the block is bad iff its amax is not finite.
- The e4m3 cast: on the GPU the kernel uses the hardware conversion ``cvt.rn.satfinite.e4m3x2.f32``
  (round to nearest even, then saturate to ±448, which equals clamp-then-round bit for bit; the
  explicit clamp is skipped there). Triton's CPU interpreter (``TRITON_INTERPRET=1``) converts
  fp32 -> fp8 by truncating the mantissa and rounding halves up, not RNE, and computes ``tl.fma``
  with two roundings, so under the interpreter the kernel rounds to e4m3 in integer arithmetic
  (:func:`_e4m3_rne_bits`) and divides with ``div_rn`` per element; the GPU tests check that the
  integer rounding gives the hardware's bits.

Performance trade-offs
----------------------
The original launch: one program quantizes one 128x128 block held in registers: 8 warps, 64 values per
thread, 16-byte loads and stores, ~105 registers, two programs per SM. Bytes moved are the minimum (2
read + 1 written per element, plus 4 bytes of scale per 16 KiB). On an H100
(``benchmarks/bench_fp8_block_quant.py``): 0.93-0.94 of a device-to-device copy of the same bytes on
8192^2 .. 151936x4096 (2.6-2.8 TB/s), 1.0 on 4096^2, 20-24x the PyTorch reference. The math is no
longer the limit (the one-multiply reciprocal variant runs in the same time); more blocks per program,
prefetching the next block within a program, or 16/32 warps did not help. With two programs per SM,
at most two blocks' loads are in flight on an SM, and none for a program while it reduces and stores.

Launch options (:class:`Fp8LaunchConfig`; none changes a bit, each is checked bitwise): the grid order
(down the block rows or along K), a persistent grid (a fixed number of programs per SM looping over
the blocks) whose loop Triton software-pipelines (``num_stages``: the next blocks' loads go to shared
memory by ``cp.async`` while the current block is processed) or prefetches in registers
(``prefetch``), groups of blocks along K, warps, a register cap, streaming cache hints. Weights whose
blocks are all whole (``N % 128 == 0``, ``K % (128 GROUP_K) == 0``) take a path without masks. The
default is a fixed table per shape class (:func:`launch_config`), chosen with the benchmark's
``--sweep``; nothing is tuned at run time. The kernel writes to any output it is given (``out=`` /
``scale_out=``), so the sidecar points it straight at byte offsets of a flat transfer bucket
(``weight_sync.fp8.bucket``): no temporary, no second copy.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK = 128  # the quantization block (both dimensions), SGLang's weight_block_size=[128, 128]
FP8_MAX = 448.0  # largest finite float8_e4m3fn value: 2^8 * 1.75
EPS = 1e-10  # lower bound on a block's amax before the division: all-zero blocks get a finite scale
FP8_DTYPE = torch.float8_e4m3fn

DEFAULT_DIV_MODE = 1  # DIV_MARKSTEIN (defined with the kernel); launch options: launch_config()

__all__ = [
    "BLOCK",
    "CANDIDATE_CONFIGS",
    "DEFAULT_CONFIGS",
    "EPS",
    "FP8_MAX",
    "Fp8LaunchConfig",
    "NonFiniteWeightError",
    "check_finite_scales",
    "fp8_block_dequant",
    "fp8_block_quant",
    "fp8_block_quant_torch",
    "fp8_block_quant_triton",
    "launch_config",
    "scale_shape",
    "shape_class",
]


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or ±Inf: it must never reach the server."""

    def __init__(self, name: str, block_row: int, block_col: int, shape: tuple[int, ...]):
        self.name = name
        self.block_row = block_row
        self.block_col = block_col
        rows = (block_row * BLOCK, min((block_row + 1) * BLOCK, shape[0]))
        cols = (block_col * BLOCK, min((block_col + 1) * BLOCK, shape[1]))
        super().__init__(
            f"non-finite value (NaN or Inf) in weight {name!r} of shape {list(shape)}: first bad "
            f"{BLOCK}x{BLOCK} block is (block_row={block_row}, block_col={block_col}), "
            f"rows [{rows[0]}, {rows[1]}) cols [{cols[0]}, {cols[1]})"
        )


def scale_shape(shape: tuple[int, int] | torch.Size) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape``: ``[ceil(N/128), ceil(K/128)]``."""
    n, k = shape
    return (triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _e4m3_rne_bits(y):
    """Bits of ``float8_e4m3fn`` nearest to fp32 ``y`` (ties to even), for finite ``|y| <= 448``.

    Integer arithmetic on the fp32 bit pattern, so it rounds the same on every backend (used under
    Triton's interpreter, whose own fp8 conversion does not round to nearest even).
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80  # fp32 sign bit 31 -> e4m3 sign bit 7
    a = bits & 0x7FFFFFFF  # |y| as bits: 8 exponent bits (bias 127) over 23 mantissa bits
    e = a >> 23
    # Normal e4m3 (|y| >= 2^-6, biased fp32 exponent >= 121): keep 3 of 23 mantissa bits. Adding
    # 2^19 - 1 plus the lowest kept bit, then shifting, rounds to nearest with ties to even; a
    # carry out of the mantissa correctly bumps the exponent. Rebias the exponent 127 -> 7.
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal e4m3 (|y| < 2^-6): the result is round(|y| * 2^9), an integer 0..8 (8 encodes
    # 2^-6, the smallest normal, whose bits are exactly 8). With the implicit bit restored,
    # |y| * 2^9 = m / 2^shift, shift = 20 + (121 - e). Below e = 117 the value is < 2^-10 and
    # rounds to 0; clamping e at 116 keeps the shift at most 25 and still yields 0 there (and for
    # fp32 zeros/subnormals, where the restored implicit bit is wrong but m < 2^24 < 2^25 - half).
    shift = 141 - tl.maximum(e, 116)
    m = (a & 0x7FFFFF) | 0x800000
    sub = (m + ((1 << (shift - 1)) - 1) + ((m >> shift) & 1)) >> shift
    mag = tl.where(e >= 121, normal, sub)
    return (sign | mag).to(tl.uint8)


@triton.jit
def _max_propagate_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# Per-element division modes of the kernel (the constexpr DIV_MODE).
DIV_RN = 0  # tl.math.div_rn per element: IEEE w / scale (slow-path branch per element; interpreter)
DIV_MARKSTEIN = 1  # the same IEEE w / scale, from the block's correctly rounded reciprocal + 2 FMAs
DIV_RECIPROCAL = 2  # variant semantics, benchmark only: w * RN(448 / max(amax, EPS))


@triton.jit
def _group_coords(gid, n_rblocks, n_kgroups, ORDER: tl.constexpr):
    """(block row, group of GROUP_K blocks along K) of the linear group index ``gid``.

    ORDER 0: the block row varies fastest (consecutive groups stack down a 128-column strip);
    ORDER 1: the K group varies fastest (consecutive groups walk along the same 128 rows).
    """
    if ORDER == 0:
        pid_k = gid // n_rblocks
        pid_n = gid - pid_k * n_rblocks
    else:
        pid_n = gid // n_kgroups
        pid_k = gid - pid_n * n_kgroups
    return pid_n, pid_k


@triton.jit
def _block_offsets(pid_n, kb, N, K, stride_wn, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """Element offsets of block (pid_n, kb) in ``w`` and ``q``, and its in-bounds mask."""
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    if INT64:
        rows = rows.to(tl.int64)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    return rows[:, None] * stride_wn + cols[None, :], rows[:, None] * K + cols[None, :], mask


@triton.jit
def _load_block(w_ptr, w_off, mask, MASKED: tl.constexpr, EVICT: tl.constexpr):
    """One block of ``w``; masked lanes read 0, which cannot raise the block's amax."""
    if MASKED:
        if EVICT:
            return tl.load(w_ptr + w_off, mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            return tl.load(w_ptr + w_off, mask=mask, other=0.0)
    else:
        if EVICT:
            return tl.load(w_ptr + w_off, eviction_policy="evict_first")
        else:
            return tl.load(w_ptr + w_off)


@triton.jit
def _quant_store_block(
    w_raw,
    q_ptr,
    q_off,
    mask,
    s_ptr,
    pid_n,
    kb,
    n_kblocks,
    EPS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MASKED: tl.constexpr,
    EVICT: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    DIV_MODE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Quantize one loaded block and store its e4m3 bits and its scale (the whole semantics);
    returns the scale (NaN for a block holding NaN/Inf)."""
    w = w_raw.to(tl.float32)  # exact for bf16/fp16/fp32
    # One reduction gives amax and the non-finite flag: the max propagates NaN (max.NaN.f32)
    # and Inf is larger than any float, so amax is finite iff every element of the block is.
    aw = tl.abs(w)
    if INTERPRET:
        # The interpreter's tl.max is numpy's nanmax, which skips NaN: count NaNs explicitly
        # (numpy-fast; a custom combine function would run element by element in Python).
        amax = tl.max(tl.max(aw, axis=1), axis=0)
        n_nan = tl.sum(tl.sum((aw != aw).to(tl.int32), axis=1), axis=0)
        amax = tl.where(n_nan > 0, float("nan"), amax)
    else:
        amax = tl.reduce(tl.reduce(aw, 1, _max_propagate_nan), 0, _max_propagate_nan)
    # scale = max(amax, EPS) / 448, IEEE division in fp32 (div_rn; "/" would be approximate).
    scale = tl.math.div_rn(tl.maximum(amax, EPS), FP8_MAX)
    if DIV_MODE == 0:
        y = tl.math.div_rn(w, scale)
    elif DIV_MODE == 1:
        # IEEE w / scale without a division per element (Markstein's theorem): with
        # r = RN(1/scale) and q0 = RN(w * r) (within 1 ulp of w / scale), the residual
        # e = q0 * scale - w is exact in one FMA, and RN(q0 - e * r) is the correctly rounded
        # quotient. Negations are multiplications by -1 (exact, sign flips on zeros too;
        # Triton's unary minus is 0 - x, which turns -0 into +0). Signed zeros come out
        # right: w = -0 gives e = +0 and y = +0 * -r + -0 = -0; w = +0 gives y = +0. If q0
        # underflows to ±0 (|w / scale| < 2^-149, far below e4m3's 2^-10 rounding threshold),
        # e = -w and y = RN(w * r): a zero or subnormal with w's sign.
        r = tl.math.div_rn(1.0, scale)
        q0 = w * r
        e = tl.fma(q0, scale, w * -1.0)
        y = tl.fma(e, r * -1.0, q0)
    else:
        y = w * tl.math.div_rn(FP8_MAX, tl.maximum(amax, EPS))
    if SOFT_CAST:
        # Saturate to the finite e4m3 range, then round (see module docstring).
        qb = _e4m3_rne_bits(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX))
    else:
        # cvt.rn.satfinite.e4m3x2.f32: round to nearest even, then saturate to ±448, which
        # gives the bits of clamp-then-round for every input (both map (448, inf) to 448).
        qb = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    if MASKED:
        if EVICT:
            tl.store(q_ptr + q_off, qb, mask=mask, cache_modifier=".cs")
        else:
            tl.store(q_ptr + q_off, qb, mask=mask)
    else:
        if EVICT:
            tl.store(q_ptr + q_off, qb, cache_modifier=".cs")
        else:
            tl.store(q_ptr + q_off, qb)
    # A bad block (amax NaN or Inf) is marked by a NaN scale; the host check raises on it.
    scale = tl.where(amax <= 3.4028234663852886e38, scale, float("nan"))
    if MASKED:
        if kb < n_kblocks:  # the last group of a row may reach past the last block
            tl.store(s_ptr + pid_n * n_kblocks + kb, scale)
    else:
        tl.store(s_ptr + pid_n * n_kblocks + kb, scale)
    return scale


@triton.jit
def _plain_group(
    w_ptr, q_ptr, s_ptr, pid_n, pid_k, N, K, stride_wn, n_kblocks,
    EPS: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, GROUP_K: tl.constexpr,
    SOFT_CAST: tl.constexpr, DIV_MODE: tl.constexpr, INT64: tl.constexpr, INTERPRET: tl.constexpr,
    MASKED: tl.constexpr, EVICT: tl.constexpr,
):  # fmt: skip
    """The GROUP_K blocks of one unit of work, each loaded right before it is processed."""
    for g in tl.static_range(GROUP_K):
        kb = pid_k * GROUP_K + g
        w_off, q_off, mask = _block_offsets(pid_n, kb, N, K, stride_wn, BLOCK, INT64)
        w_raw = _load_block(w_ptr, w_off, mask, MASKED, EVICT)
        _quant_store_block(
            w_raw, q_ptr, q_off, mask, s_ptr, pid_n, kb, n_kblocks,
            EPS, FP8_MAX, MASKED, EVICT, SOFT_CAST, DIV_MODE, INTERPRET,
        )  # fmt: skip


@triton.jit
def _prefetching_group(
    w_ptr, q_ptr, s_ptr, w_next, gid, nprog, N, K, stride_wn, n_kblocks, n_rblocks, n_kgroups, n_groups,
    EPS: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, GROUP_K: tl.constexpr,
    SOFT_CAST: tl.constexpr, DIV_MODE: tl.constexpr, INT64: tl.constexpr, INTERPRET: tl.constexpr,
    ORDER: tl.constexpr, MASKED: tl.constexpr, EVICT: tl.constexpr,
):  # fmt: skip
    """Unit ``gid`` of a persistent program whose first block is already loaded (``w_next``); each
    block's processing starts after the next block's loads (this unit's, or the program's next
    unit's, ``gid + nprog``) are issued. Returns the next unit's first block."""
    pid_n, pid_k = _group_coords(gid, n_rblocks, n_kgroups, ORDER)
    for g in tl.static_range(GROUP_K):
        kb = pid_k * GROUP_K + g
        w_off, q_off, mask = _block_offsets(pid_n, kb, N, K, stride_wn, BLOCK, INT64)
        w_raw = w_next
        if g + 1 < GROUP_K:
            nw_off, _nq, nmask = _block_offsets(pid_n, kb + 1, N, K, stride_wn, BLOCK, INT64)
            w_next = _load_block(w_ptr, nw_off, nmask, MASKED, EVICT)
        else:
            nxt = gid + nprog  # past the end: a fully masked load (no memory traffic)
            nn, nk = _group_coords(tl.minimum(nxt, n_groups - 1), n_rblocks, n_kgroups, ORDER)
            nw_off, _nq, nmask = _block_offsets(nn, nk * GROUP_K, N, K, stride_wn, BLOCK, INT64)
            w_next = _load_block(w_ptr, nw_off, nmask & (nxt < n_groups), True, EVICT)
        _quant_store_block(
            w_raw, q_ptr, q_off, mask, s_ptr, pid_n, kb, n_kblocks,
            EPS, FP8_MAX, MASKED, EVICT, SOFT_CAST, DIV_MODE, INTERPRET,
        )  # fmt: skip
    return w_next


@triton.jit(do_not_specialize=["N", "n_kblocks", "n_rblocks", "n_kgroups", "n_groups"])
def _fp8_block_quant_kernel(
    w_ptr,  # [N, K] input, row stride stride_wn, column stride 1 (any float dtype)
    q_ptr,  # [N, K] output bytes (float8_e4m3fn bits), contiguous
    s_ptr,  # [ceil(N/128), ceil(K/128)] fp32 output, contiguous
    N,
    K,
    stride_wn,
    n_kblocks,  # ceil(K / 128): row length of the scale tensor
    n_rblocks,  # ceil(N / 128)
    n_kgroups,  # ceil(n_kblocks / GROUP_K)
    n_groups,  # n_rblocks * n_kgroups: the units of work
    EPS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUP_K: tl.constexpr,  # 128x128 blocks per unit of work, along K
    PREFETCH: tl.constexpr,  # load the next block before processing this one
    SOFT_CAST: tl.constexpr,  # True: integer RNE (interpreter); False: hardware cvt.rn.satfinite
    DIV_MODE: tl.constexpr,  # DIV_RN, DIV_MARKSTEIN or DIV_RECIPROCAL (see above)
    INT64: tl.constexpr,  # 64-bit offsets for tensors of 2^31 elements or more
    INTERPRET: tl.constexpr,  # running under TRITON_INTERPRET=1
    ORDER: tl.constexpr,  # 0: block rows fastest (2-D grid), 1: K groups fastest (see _group_coords)
    PERSISTENT: tl.constexpr,  # a fixed grid; each program loops over groups pid, pid + grid, ...
    NUM_STAGES: tl.constexpr,  # PERSISTENT: > 1 lets Triton pipeline the loop's loads (cp.async)
    EVEN: tl.constexpr,  # every block is whole (N % 128 == 0, K % (128 GROUP_K) == 0): no masks
    EVICT: tl.constexpr,  # streaming cache hints: loads evict_first, stores .cs
    N_ITERS: tl.constexpr,  # PERSISTENT under the interpreter: ceil(n_groups / grid) (else 0)
):
    # Launch options (ORDER, PERSISTENT, NUM_STAGES, PREFETCH, GROUP_K, EVICT, warps) only choose
    # which program handles which block and when its loads are issued; every block goes through the
    # same _quant_store_block, and its only reduction (a max) is exact in any order: no option can
    # change a bit (the interpreter and GPU tests compare every option with the reference).
    MASKED: tl.constexpr = not EVEN
    if PERSISTENT:
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)  # <= n_groups (the launcher's grid)
        if PREFETCH:
            # Software pipeline in registers: the loads of this program's next block are in
            # flight while the current block is reduced, quantized and stored.
            pid_n, pid_k = _group_coords(pid, n_rblocks, n_kgroups, ORDER)
            w_off, _q_off, mask = _block_offsets(pid_n, pid_k * GROUP_K, N, K, stride_wn, BLOCK, INT64)
            w_next = _load_block(w_ptr, w_off, mask, MASKED, EVICT)
            if INTERPRET:  # its scalars cannot bound a range() (numpy 2): the same units, counted loop
                for i in range(0, N_ITERS):
                    if pid + i * nprog < n_groups:
                        w_next = _prefetching_group(
                            w_ptr, q_ptr, s_ptr, w_next, pid + i * nprog, nprog, N, K, stride_wn, n_kblocks,
                            n_rblocks, n_kgroups, n_groups, EPS, FP8_MAX, BLOCK, GROUP_K, SOFT_CAST, DIV_MODE,
                            INT64, INTERPRET, ORDER, MASKED, EVICT,
                        )  # fmt: skip
            else:
                for gid in range(pid, n_groups, nprog):
                    w_next = _prefetching_group(
                        w_ptr, q_ptr, s_ptr, w_next, gid, nprog, N, K, stride_wn, n_kblocks,
                        n_rblocks, n_kgroups, n_groups, EPS, FP8_MAX, BLOCK, GROUP_K, SOFT_CAST, DIV_MODE,
                        INT64, INTERPRET, ORDER, MASKED, EVICT,
                    )  # fmt: skip
        else:
            if INTERPRET:
                for i in range(0, N_ITERS):
                    if pid + i * nprog < n_groups:
                        pid_n, pid_k = _group_coords(pid + i * nprog, n_rblocks, n_kgroups, ORDER)
                        _plain_group(
                            w_ptr, q_ptr, s_ptr, pid_n, pid_k, N, K, stride_wn, n_kblocks, EPS, FP8_MAX,
                            BLOCK, GROUP_K, SOFT_CAST, DIV_MODE, INT64, INTERPRET, MASKED, EVICT,
                        )  # fmt: skip
            else:
                for gid in tl.range(pid, n_groups, nprog, num_stages=NUM_STAGES):
                    pid_n, pid_k = _group_coords(gid, n_rblocks, n_kgroups, ORDER)
                    _plain_group(
                        w_ptr, q_ptr, s_ptr, pid_n, pid_k, N, K, stride_wn, n_kblocks,
                        EPS, FP8_MAX, BLOCK, GROUP_K, SOFT_CAST, DIV_MODE, INT64, INTERPRET, MASKED, EVICT,
                    )  # fmt: skip
    else:
        if ORDER == 0:
            pid_n = tl.program_id(0)
            pid_k = tl.program_id(1)
        else:
            pid_n, pid_k = _group_coords(tl.program_id(0), n_rblocks, n_kgroups, ORDER)
        if PREFETCH:
            # Issue the next block's loads before this block's reduction, math and stores.
            w_off, _q_off, mask = _block_offsets(pid_n, pid_k * GROUP_K, N, K, stride_wn, BLOCK, INT64)
            w_next = _load_block(w_ptr, w_off, mask, MASKED, EVICT)
            for g in tl.static_range(GROUP_K):
                kb = pid_k * GROUP_K + g
                w_off, q_off, mask = _block_offsets(pid_n, kb, N, K, stride_wn, BLOCK, INT64)
                w_raw = w_next
                if g + 1 < GROUP_K:
                    nw_off, _nq, nmask = _block_offsets(pid_n, kb + 1, N, K, stride_wn, BLOCK, INT64)
                    w_next = _load_block(w_ptr, nw_off, nmask, MASKED, EVICT)
                _quant_store_block(
                    w_raw, q_ptr, q_off, mask, s_ptr, pid_n, kb, n_kblocks,
                    EPS, FP8_MAX, MASKED, EVICT, SOFT_CAST, DIV_MODE, INTERPRET,
                )  # fmt: skip
        else:
            _plain_group(
                w_ptr, q_ptr, s_ptr, pid_n, pid_k, N, K, stride_wn, n_kblocks,
                EPS, FP8_MAX, BLOCK, GROUP_K, SOFT_CAST, DIV_MODE, INT64, INTERPRET, MASKED, EVICT,
            )  # fmt: skip


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"block FP8 quantization takes a 2-D weight, got shape {list(w.shape)}")
    if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float64):
        raise ValueError(f"block FP8 quantization takes a bf16/fp16/fp32 weight, got {w.dtype}")


def _outputs(w: torch.Tensor, out: torch.Tensor | None, scale_out: torch.Tensor | None):
    n, k = w.shape
    if out is None:
        out = torch.empty((n, k), dtype=FP8_DTYPE, device=w.device)
    if scale_out is None:
        scale_out = torch.empty(scale_shape((n, k)), dtype=torch.float32, device=w.device)
    if out.dtype not in (FP8_DTYPE, torch.uint8) or tuple(out.shape) != (n, k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {list(w.shape)} float8_e4m3fn (or uint8) tensor")
    if scale_out.dtype != torch.float32 or tuple(scale_out.shape) != scale_shape((n, k)):
        raise ValueError(f"scale_out must be a float32 tensor of shape {list(scale_shape((n, k)))}")
    if not scale_out.is_contiguous():
        raise ValueError("scale_out must be contiguous")
    if out.device != w.device or scale_out.device != w.device:
        raise ValueError("out and scale_out must be on the weight's device")
    return out, scale_out


@dataclass(frozen=True)
class Fp8LaunchConfig:
    """Launch options of the kernel. None of them changes a bit of the output (see the kernel).

    - ``group_k``: 128x128 blocks per unit of work, along K (one program's static loop).
    - ``num_warps``: warps per program (8: 64 values per thread for one block).
    - ``prefetch``: issue the loads of the next block before processing the current one (registers).
    - ``order``: 0 = consecutive programs go down the block rows (2-D grid, the original launch);
      1 = consecutive programs go along K, so the programs running at once read whole rows.
    - ``persistent``: 0 = one program per unit of work; ``p > 0`` = ``p`` programs per SM (at most one
      per unit), each looping over units ``pid, pid + grid, ...``.
    - ``num_stages``: with ``persistent``, ``> 1`` asks Triton to software-pipeline the loop's loads
      (``cp.async`` into a ring of ``num_stages`` shared-memory buffers of 32 KiB each).
    - ``evict``: streaming cache hints (loads ``evict_first``, stores ``.cs``).
    - ``maxnreg``: register cap per thread (more programs per SM, possibly spills); ``None``: no cap.
    - ``unmasked``: weights whose blocks are all whole take the path without load/store masks (False:
      masks always, as the original kernel).
    """

    group_k: int = 1
    num_warps: int = 8
    prefetch: bool = False
    order: int = 0
    persistent: int = 0
    num_stages: int = 1
    evict: bool = False
    maxnreg: int | None = None
    unmasked: bool = True

    def __repr__(self) -> str:  # only the fields that differ from the defaults (pasteable)
        fields = dataclasses.fields(self)
        diff = [f"{f.name}={getattr(self, f.name)!r}" for f in fields if getattr(self, f.name) != f.default]
        return f"Fp8LaunchConfig({', '.join(diff)})"

    @property
    def name(self) -> str:
        s = f"g{self.group_k}w{self.num_warps}o{self.order}"
        if self.persistent:
            s += f"P{self.persistent}"
        if self.num_stages > 1:
            s += f"s{self.num_stages}"
        if self.prefetch:
            s += "p"
        if self.evict:
            s += "e"
        if self.maxnreg:
            s += f"r{self.maxnreg}"
        if not self.unmasked:
            s += "m"
        return s

    def validate(self) -> Fp8LaunchConfig:
        if self.group_k < 1 or self.persistent < 0 or self.num_stages < 1 or self.order not in (0, 1):
            raise ValueError(f"bad launch configuration {self}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two <= 32, got {self.num_warps}")
        if self.num_stages > 1 and (not self.persistent or self.prefetch):
            raise ValueError(
                "num_stages > 1 pipelines the persistent loop: needs persistent > 0, no prefetch"
            )
        return self


# Default launch configuration per shape class (see launch_config). The classes exist because the
# best configuration may differ between weights that fill the GPU a few times (small) and those that
# fill it hundreds of times; `python benchmarks/bench_fp8_block_quant.py --sweep` times the
# candidates per shape and prints the best worst-case configuration of each class as a
# DEFAULT_CONFIGS line. Measured (H200, 2026-11-27, one process, each config bitwise the reference):
# g1w8o1P2p (2 persistent programs per SM walking along K, next block prefetched) is the best
# worst case of both classes: 4096^2 1.010, 8192^2 0.958, 28672x8192 0.977, 151936x4096 0.968 of a
# device copy of the same bytes (the original launch: 0.439 / 0.916 / 0.906 / 0.886 in that run).
SMALL_MAX_BLOCKS = 2048  # <= 2048 blocks of 128x128 (32 Mi elements, e.g. 4096x4096): "small"
DEFAULT_CONFIGS: dict[str, Fp8LaunchConfig] = {
    "small": Fp8LaunchConfig(prefetch=True, order=1, persistent=2),
    "large": Fp8LaunchConfig(prefetch=True, order=1, persistent=2),
}
DEFAULT_CONFIG = DEFAULT_CONFIGS["large"]
DEFAULT_GROUP_K = DEFAULT_CONFIG.group_k
DEFAULT_NUM_WARPS = DEFAULT_CONFIG.num_warps
DEFAULT_PREFETCH = DEFAULT_CONFIG.prefetch
INTERPRETER_SMS = 2  # the "SM count" of persistent grids under TRITON_INTERPRET=1 (several loops each)


_C = Fp8LaunchConfig
# The launch configurations `bench_fp8_block_quant.py --sweep` times (and the GPU tests prove bitwise).
# Programs resident per SM on an H100 (65536 registers, 228 KiB shared memory), from the compiled
# kernels' register counts (Triton 3.6): 8 warps ~105 registers -> 2; 16 warps ~53 -> 2; 4 warps
# ~158 -> 3; 8 warps capped at 80 registers (no spills) -> 3. Persistent grids use that many per SM.
CANDIDATE_CONFIGS: tuple[Fp8LaunchConfig, ...] = (
    _C(num_warps=8, unmasked=False),  # the original kernel: one block per program, block rows fastest
    _C(num_warps=8),  # the same, without masks on whole blocks
    _C(num_warps=8, order=1),
    _C(num_warps=16),
    _C(num_warps=16, order=1),
    _C(num_warps=4, order=1),
    _C(num_warps=8, order=1, maxnreg=80),
    _C(num_warps=8, order=1, evict=True),
    _C(group_k=2, num_warps=16, order=1, prefetch=True),
    _C(num_warps=8, order=1, persistent=2),
    _C(num_warps=8, order=1, persistent=2, num_stages=2),
    _C(num_warps=8, order=1, persistent=2, num_stages=3),
    _C(num_warps=8, order=0, persistent=2, num_stages=3),
    _C(num_warps=8, order=1, persistent=2, num_stages=3, evict=True),
    _C(num_warps=8, order=1, persistent=1, num_stages=3),
    _C(num_warps=8, order=1, persistent=1, num_stages=4),
    _C(num_warps=8, order=1, persistent=3, num_stages=2, maxnreg=80),
    _C(group_k=2, num_warps=8, order=1, persistent=2, num_stages=2),
    _C(num_warps=16, order=1, persistent=2, num_stages=2),
    _C(num_warps=16, order=1, persistent=2, num_stages=3),
    _C(num_warps=4, order=1, persistent=3, num_stages=3),
    _C(num_warps=8, order=1, persistent=2, prefetch=True),
    _C(num_warps=8, order=0, persistent=2, prefetch=True),
    _C(num_warps=8, order=1, persistent=2, prefetch=True, evict=True),
    _C(num_warps=16, order=1, persistent=2, prefetch=True, maxnreg=64),
)


def shape_class(n: int, k: int) -> str:
    """``"small"`` if the weight has at most SMALL_MAX_BLOCKS 128x128 blocks, else ``"large"``."""
    nb, kb = scale_shape((n, k))
    return "small" if nb * kb <= SMALL_MAX_BLOCKS else "large"


def launch_config(n: int, k: int) -> Fp8LaunchConfig:
    """The default launch configuration for an ``[n, k]`` weight: a fixed table, no run-time tuning."""
    return DEFAULT_CONFIGS[shape_class(n, k)]


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def fp8_block_quant_triton(
    w: torch.Tensor,
    *,
    name: str = "<weight>",
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    check: bool = True,
    config: Fp8LaunchConfig | None = None,
    group_k: int | None = None,
    num_warps: int | None = None,
    prefetch: bool | None = None,
    order: int | None = None,
    persistent: int | None = None,
    num_stages: int | None = None,
    evict: bool | None = None,
    maxnreg: int | None = None,
    unmasked: bool | None = None,
    soft_cast: bool | None = None,
    div_mode: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` with the Triton kernel; returns ``(weight_fp8, weight_scale_inv)``.

    ``out`` / ``scale_out`` may be given (e.g. views into a transfer bucket); they are written in
    place and returned. ``check=False`` skips the non-finite check (and its host synchronization):
    the caller must then run :func:`check_finite_scales` on the scales before using the result.
    Launch options: ``config`` (default :func:`launch_config` of the shape), each field overridable
    by the keyword of the same name; none of them changes the result's bits.
    ``soft_cast`` and ``div_mode`` default to what the backend needs: under ``TRITON_INTERPRET=1``
    the integer e4m3 rounding and ``div_rn`` per element (the interpreter computes ``tl.fma`` with
    two roundings, which the FMA correction of ``DIV_MARKSTEIN`` cannot tolerate).
    """
    _check_weight(w)
    if w.stride(1) != 1 and w.shape[1] > 1:
        w = w.contiguous()  # rows must be contiguous; any row stride is fine
    out, scale_out = _outputs(w, out, scale_out)
    n, k = w.shape
    cfg = config if config is not None else launch_config(n, k)
    overrides = dict(
        group_k=group_k, num_warps=num_warps, prefetch=prefetch, order=order, persistent=persistent,
        num_stages=num_stages, evict=evict, maxnreg=maxnreg, unmasked=unmasked,
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, **{f: v for f, v in overrides.items() if v is not None}).validate()
    if soft_cast is None:
        soft_cast = _interpreting()
    if div_mode is None:
        div_mode = DIV_RN if _interpreting() else DEFAULT_DIV_MODE
    if n * k > 0:
        n_kblocks = triton.cdiv(k, BLOCK)
        n_rblocks = triton.cdiv(n, BLOCK)
        n_kgroups = triton.cdiv(n_kblocks, cfg.group_k)
        n_groups = n_rblocks * n_kgroups
        if cfg.persistent:
            sms = (
                _num_sms(w.device.index if w.device.index is not None else 0)
                if w.is_cuda
                else INTERPRETER_SMS
            )
            grid = (min(n_groups, sms * cfg.persistent),)
        elif cfg.order == 0:
            grid = (n_rblocks, n_kgroups)
        else:
            grid = (n_groups,)
        big = max(n * max(w.stride(0), k), n * k) >= 2**31
        launch = {"num_warps": cfg.num_warps}
        if cfg.maxnreg is not None:
            launch["maxnreg"] = cfg.maxnreg
        _fp8_block_quant_kernel[grid](
            w, out.view(torch.uint8), scale_out, n, k, w.stride(0), n_kblocks, n_rblocks, n_kgroups, n_groups,
            EPS=EPS, FP8_MAX=FP8_MAX, BLOCK=BLOCK, GROUP_K=cfg.group_k,
            PREFETCH=cfg.prefetch and (cfg.group_k > 1 or cfg.persistent > 0),
            SOFT_CAST=soft_cast, DIV_MODE=div_mode, INT64=big, INTERPRET=_interpreting(),
            ORDER=cfg.order, PERSISTENT=cfg.persistent > 0, NUM_STAGES=cfg.num_stages,
            EVEN=cfg.unmasked and n % BLOCK == 0 and k % (BLOCK * cfg.group_k) == 0, EVICT=cfg.evict,
            N_ITERS=triton.cdiv(n_groups, grid[0]) if cfg.persistent and _interpreting() else 0,
            **launch,
        )  # fmt: skip
    if check:
        check_finite_scales(name, scale_out, (n, k))
    return out, scale_out


# --------------------------------------------------------------------------------------------------
# Plain-PyTorch reference (same fp32 expression, step by step)
# --------------------------------------------------------------------------------------------------


def fp8_block_quant_torch(
    w: torch.Tensor,
    *,
    name: str = "<weight>",
    check: bool = True,
    _reciprocal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the stated semantics in plain PyTorch (pads a copy; the kernel does not)."""
    _check_weight(w)
    n, k = w.shape
    nb, kb = scale_shape((n, k))
    # fp32 copy padded with zeros to whole blocks (zeros cannot raise amax); the upcast is exact.
    wp = torch.zeros((nb * BLOCK, kb * BLOCK), dtype=torch.float32, device=w.device)
    wp[:n, :k] = w
    blocks = wp.view(nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))  # exact
    bad = ~torch.isfinite(blocks).all(dim=3).all(dim=1)
    # Divide by a tensor, never by the Python scalar 448.0: on CUDA a CPU-scalar divisor is turned
    # into a multiplication by its reciprocal, which rounds differently.
    floor = amax.clamp_min(EPS)
    scale = floor / torch.full_like(amax, FP8_MAX)
    if _reciprocal:
        y = blocks * (torch.full_like(amax, FP8_MAX) / floor)[:, None, :, None]
    else:
        y = blocks / scale[:, None, :, None]  # IEEE fp32 division, broadcast per block
    y = y.clamp(-FP8_MAX, FP8_MAX)  # saturate first: torch's cast maps |y| >= 464 to NaN
    q = y.to(FP8_DTYPE)  # round to nearest, ties to even
    q = q.view(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous()
    scale = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    if check:
        check_finite_scales(name, scale, (n, k))
    return q, scale


def check_finite_scales(name: str, scale: torch.Tensor, shape: tuple[int, int]) -> None:
    """Raise :class:`NonFiniteWeightError` if a block of weight ``name`` held NaN/Inf (one sync)."""
    bad = ~torch.isfinite(scale)
    if bool(bad.any()):
        first = int(bad.flatten().nonzero()[0])
        raise NonFiniteWeightError(name, first // scale.shape[1], first % scale.shape[1], tuple(shape))


def fp8_block_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``q * scale`` per 128x128 block (what SGLang's block-FP8 GEMM computes with)."""
    n, k = q.shape
    s = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]
    return q.to(torch.float32) * s


def fp8_block_quant(
    w: torch.Tensor,
    *,
    name: str = "<weight>",
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize with the kernel where it can run (CUDA, or Triton's interpreter), else the reference.

    Both give the same bits; the reference allocates its outputs, so ``out`` / ``scale_out`` are
    filled by a copy there.
    """
    if w.is_cuda or _interpreting():
        return fp8_block_quant_triton(w, name=name, out=out, scale_out=scale_out, check=check)
    q, s = fp8_block_quant_torch(w, name=name, check=check)
    if out is None and scale_out is None:
        return q, s
    out, scale_out = _outputs(w, out, scale_out)
    out.view(torch.uint8).copy_(q.view(torch.uint8))
    scale_out.copy_(s)
    return out, scale_out
