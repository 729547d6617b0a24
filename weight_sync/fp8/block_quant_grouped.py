"""Block FP8 quantization of many weights in one launch (a transfer bucket's worth): kernel + reference.

The problem
-----------
The sidecar receives the trainer's bf16 weights bucket by bucket into one flat buffer (a ring slot)
and quantizes every weight into its place in the staging buffer. One launch of
:func:`~weight_sync.fp8.block_quant.fp8_block_quant_triton` per weight costs ~50-150 us of host
time (argument checks, launch options, the launch itself, one finiteness check per scale tensor):
for Llama-3-8B's 224 quantized weights that is 40-76 ms of host time per push (measured on an
H200 host), against a ~47 ms push over NVLink, so the quantization, which the GPU does in a few
milliseconds, was paced by the host and FP8 added 46-86% to the push.

This module quantizes all the weights of one source dtype that lie in one source buffer with ONE
launch. A table (built once per transfer plan, :func:`plan_grouped`) lists, per weight, its first
block in a global block numbering, its byte offsets in the source buffer and in the destination
buffer (e4m3 bytes and fp32 scales) and its shape. A persistent grid walks the global blocks; each
program finds the weight of its block by a binary search over the table's first-block column and
runs exactly the per-block code of the single-weight kernel (``_quant_store_block``: the same
semantics, so the same bits), prefetching its next block while quantizing the current one.

Non-finite weights: a block holding NaN/Inf gets a NaN scale, as with the single-weight kernel, and
its weight's entry in a per-weight ``int32`` flag vector is set to 1 (every program that finds a bad
block stores the same value, so the race is benign). One host synchronization over the flags of a
whole transfer then decides; :func:`~weight_sync.fp8.block_quant.check_finite_scales` names the
first bad block of a flagged weight.

Trade-offs and limits
---------------------
- A weight joins a group only if its rows are whole multiples of 128 columns (``K % 128 == 0``) and
  its offsets are 16-byte aligned (:func:`groupable`). Then no block needs a column mask, the row
  mask is constant along a row, and the compiler, told the alignment (``tl.multiple_of``), issues
  16-byte loads and stores as the single-weight kernel does on whole blocks. Other weights (rare:
  no Llama/Qwen projection has ``K % 128 != 0``) are quantized one launch each by the caller.
- The binary search reads ``log2(weights)`` table entries per block from L1/L2 (a few hundred bytes
  for a whole bucket), against 32 KiB of weight data per block.
- Offsets are 64-bit everywhere: a 4 GiB bucket exceeds 2^31 bytes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from weight_sync.fp8.block_quant import (
    BLOCK,
    DEFAULT_DIV_MODE,
    DIV_RN,
    EPS,
    FP8_MAX,
    INTERPRETER_SMS,
    _interpreting,
    _num_sms,
    _quant_store_block,
    fp8_block_quant_torch,
    scale_shape,
)

# Columns of the table (int64): the weight's first block in the launch's global numbering, the
# element offset of its first element in the source buffer (in source-dtype elements), the byte
# offset of its e4m3 bytes and the fp32-element offset of its scales in the destination buffer,
# its rows N, its columns K and its blocks per row ceil(K / 128). The last column pads rows to 8.
COL_FIRST, COL_SRC, COL_Q, COL_SCALE, COL_N, COL_K, COL_KBLOCKS, COLS = 0, 1, 2, 3, 4, 5, 6, 8
ALIGN = 16  # bytes: what a 16-byte vector access needs, and what the wire layout guarantees
PROGRAMS_PER_SM = 2  # the single-weight kernel's best launch (two 8-warp programs per SM, prefetching)
SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GroupedWeight:
    """One weight of a grouped launch: where it is read and where its results are written (bytes)."""

    name: str
    shape: tuple[int, int]
    src_offset: int  # its first element in the source buffer
    q_offset: int  # its e4m3 bytes ([N, K], row-major) in the destination buffer
    scale_offset: int  # its fp32 scales ([ceil(N/128), ceil(K/128)], row-major) there


def groupable(
    shape: tuple[int, ...], dtype: torch.dtype, src_offset: int, q_offset: int, scale_offset: int
) -> bool:
    """Whether a weight can join a grouped launch (see the module docstring); else one launch of its own."""
    return (
        len(shape) == 2
        and shape[0] > 0
        and shape[1] > 0
        and shape[1] % BLOCK == 0
        and dtype in SOURCE_DTYPES
        and src_offset % ALIGN == 0
        and q_offset % ALIGN == 0
        and scale_offset % 4 == 0
    )


@dataclass(frozen=True)
class GroupedQuant:
    """A grouped launch: weights of one source dtype, read from one buffer, written to another."""

    dtype: torch.dtype
    weights: tuple[GroupedWeight, ...]
    table: torch.Tensor  # int64 [len(weights), COLS] on the CPU
    n_blocks: int  # 128x128 blocks in all
    src_extent: int  # bytes of the source buffer the launch reads (up to the last weight's end)
    dst_extent: int  # bytes of the destination buffer it writes
    _device_tables: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def device_table(self, device: torch.device) -> torch.Tensor:
        """The table on ``device`` (copied once per device and cached)."""
        key = str(device)
        if key not in self._device_tables:
            self._device_tables[key] = self.table.to(device)
        return self._device_tables[key]


def plan_grouped(weights: list[GroupedWeight], dtype: torch.dtype) -> GroupedQuant:
    """The table of a grouped launch over ``weights`` (all of source dtype ``dtype``)."""
    if not weights:
        raise ValueError("a grouped launch needs at least one weight")
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows, first, src_end, dst_end = [], 0, 0, 0
    for w in weights:
        if not groupable(w.shape, dtype, w.src_offset, w.q_offset, w.scale_offset):
            raise ValueError(
                f"{w.name}: shape {list(w.shape)} {dtype} at offsets {w.src_offset}/{w.q_offset}/"
                f"{w.scale_offset} cannot join a grouped launch (needs 2-D, K % {BLOCK} == 0, "
                f"{ALIGN}-byte aligned offsets)"
            )
        n, k = w.shape
        nb, kb = scale_shape((n, k))
        rows.append([first, w.src_offset // itemsize, w.q_offset, w.scale_offset // 4, n, k, kb, 0])
        first += nb * kb
        src_end = max(src_end, w.src_offset + n * k * itemsize)
        dst_end = max(dst_end, w.q_offset + n * k, w.scale_offset + nb * kb * 4)
    table = torch.tensor(rows, dtype=torch.int64)
    return GroupedQuant(dtype, tuple(weights), table, first, src_end, dst_end)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _locate(gid, table_ptr, n_weights, STEPS: tl.constexpr, COLS: tl.constexpr, SRC_ALIGN: tl.constexpr):
    """Global block ``gid``: its weight's table row ``t`` (the last weight whose first block is
    <= gid, by a branch-free binary search of STEPS = ceil(log2(n_weights)) steps), the weight's
    offsets and shape, and the block's coordinates in the weight (block row, block column)."""
    t = gid * 0
    for s in tl.static_range(STEPS):
        cand = t + (1 << (STEPS - 1 - s))
        first = tl.load(table_ptr + tl.minimum(cand, n_weights - 1) * COLS)
        t = tl.where((cand < n_weights) & (first <= gid), cand, t)
    row = table_ptr + t.to(tl.int64) * COLS
    n_kblocks = tl.load(row + 6)
    local = gid - tl.load(row)
    pid_n = local // n_kblocks
    kb = local - pid_n * n_kblocks
    # Alignment facts the host checked (groupable), stated so the compiler can use 16-byte vector
    # accesses: element offset of the source a multiple of 16 bytes, e4m3 offset of 16, K of 128.
    src_off = tl.multiple_of(tl.load(row + 1), SRC_ALIGN)
    q_off = tl.multiple_of(tl.load(row + 2), 16)
    s_off = tl.load(row + 3)
    n = tl.load(row + 4)
    k = tl.multiple_of(tl.load(row + 5), 128)
    return t, src_off, q_off, s_off, n, k, n_kblocks, pid_n, kb


@triton.jit
def _block(src_ptr, src_off, n, k, pid_n, kb, valid, BLOCK: tl.constexpr):
    """Offsets of block (pid_n, kb) of a weight (relative to its first element) and the block,
    loaded (masked lanes read 0: rows past N, or the whole block if not ``valid``). Rows are whole
    multiples of 128 columns, so the mask is constant along a row and loads stay 16 bytes wide."""
    rows = pid_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    off = rows[:, None] * k + cols[None, :]
    mask = tl.broadcast_to(((rows < n) & valid)[:, None], (BLOCK, BLOCK))
    w = tl.load(src_ptr + src_off + off, mask=mask, other=0.0)
    return off, mask, w


@triton.jit(do_not_specialize=["n_weights", "n_blocks"])
def _fp8_block_quant_grouped_kernel(
    src_ptr,  # the source buffer, typed as the weights' dtype
    q_ptr,  # the destination buffer (uint8): e4m3 bytes at each weight's q offset
    s_ptr,  # the destination buffer typed fp32: scales at each weight's scale offset
    bad_ptr,  # int32 [n_weights]: set to 1 for a weight with a non-finite block
    table_ptr,  # int64 [n_weights, COLS]
    n_weights,
    n_blocks,
    EPS: tl.constexpr,
    FP8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
    COLS: tl.constexpr,
    STEPS: tl.constexpr,  # ceil(log2(n_weights))
    SRC_ALIGN: tl.constexpr,  # source elements per 16 bytes
    SOFT_CAST: tl.constexpr,  # True: integer RNE (interpreter); False: hardware cvt.rn.satfinite
    DIV_MODE: tl.constexpr,  # as the single-weight kernel
    INTERPRET: tl.constexpr,
    N_ITERS: tl.constexpr,  # under the interpreter: ceil(n_blocks / grid) (else 0)
):
    # Persistent: program p quantizes global blocks p, p + grid, ...; the loads of its next block
    # are issued before the current block is reduced, quantized and stored (the single-weight
    # kernel's best launch). Which program handles a block changes no bit: each block is one
    # _quant_store_block, whose only reduction (a max) is exact in any order.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)  # <= n_blocks (the launcher's grid)
    t, src_off, q_off, s_off, n, k, n_kblocks, pid_n, kb = _locate(
        pid, table_ptr, n_weights, STEPS, COLS, SRC_ALIGN
    )
    off, mask, w = _block(src_ptr, src_off, n, k, pid_n, kb, pid < n_blocks, BLOCK)
    if INTERPRET:  # its scalars cannot bound a range() (numpy 2): the same blocks, counted loop
        for i in range(0, N_ITERS):
            if pid + i * nprog < n_blocks:
                t, q_off, s_off, n_kblocks, pid_n, kb, off, mask, w = _quantize_then_load_next(
                    pid + i * nprog, nprog, n_blocks, src_ptr, q_ptr, s_ptr, bad_ptr, table_ptr, n_weights,
                    t, q_off, s_off, n_kblocks, pid_n, kb, off, mask, w,
                    EPS, FP8_MAX, BLOCK, COLS, STEPS, SRC_ALIGN, SOFT_CAST, DIV_MODE, INTERPRET,
                )  # fmt: skip
    else:
        for gid in range(pid, n_blocks, nprog):
            t, q_off, s_off, n_kblocks, pid_n, kb, off, mask, w = _quantize_then_load_next(
                gid, nprog, n_blocks, src_ptr, q_ptr, s_ptr, bad_ptr, table_ptr, n_weights,
                t, q_off, s_off, n_kblocks, pid_n, kb, off, mask, w,
                EPS, FP8_MAX, BLOCK, COLS, STEPS, SRC_ALIGN, SOFT_CAST, DIV_MODE, INTERPRET,
            )  # fmt: skip


@triton.jit
def _quantize_then_load_next(
    gid, nprog, n_blocks, src_ptr, q_ptr, s_ptr, bad_ptr, table_ptr, n_weights,
    t, q_off, s_off, n_kblocks, pid_n, kb, off, mask, w,
    EPS: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, COLS: tl.constexpr,
    STEPS: tl.constexpr, SRC_ALIGN: tl.constexpr, SOFT_CAST: tl.constexpr, DIV_MODE: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Block ``gid`` (weight ``t``, already loaded in ``w``): issue the loads of this program's
    next block (``gid + nprog``; past the end, a fully masked load: no memory traffic), then
    quantize and store ``gid``, flagging its weight if the block is not finite. Returns the next
    block's state."""
    nxt = gid + nprog
    n_t, n_src, n_q, n_s, n_n, n_k, n_kbs, n_pid_n, n_kb = _locate(
        tl.minimum(nxt, n_blocks - 1), table_ptr, n_weights, STEPS, COLS, SRC_ALIGN
    )
    n_off, n_mask, n_w = _block(src_ptr, n_src, n_n, n_k, n_pid_n, n_kb, nxt < n_blocks, BLOCK)
    scale = _quant_store_block(
        w, q_ptr + q_off, off, mask, s_ptr + s_off, pid_n, kb, n_kblocks,
        EPS, FP8_MAX, True, False, SOFT_CAST, DIV_MODE, INTERPRET,
    )  # fmt: skip
    tl.store(bad_ptr + t, 1, mask=scale != scale)  # every bad block stores the same 1
    return n_t, n_q, n_s, n_kbs, n_pid_n, n_kb, n_off, n_mask, n_w


def _typed(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A flat uint8 buffer viewed as ``dtype`` (its whole elements; the buffer's start is aligned)."""
    item = torch.empty((), dtype=dtype).element_size()
    return buf[: buf.numel() // item * item].view(dtype)


def _check_buffers(src: torch.Tensor, dst: torch.Tensor, group: GroupedQuant) -> None:
    for what, buf, need in (("source", src, group.src_extent), ("destination", dst, group.dst_extent)):
        if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError(f"the {what} buffer must be a contiguous 1-D uint8 tensor")
        if buf.numel() < need:
            raise ValueError(f"the {what} buffer holds {buf.numel()} bytes, the launch needs {need}")
        if buf.data_ptr() % ALIGN:
            raise ValueError(f"the {what} buffer must start at a {ALIGN}-byte aligned address")
    if src.device != dst.device:
        raise ValueError("source and destination buffers must be on one device")


def fp8_block_quant_grouped_triton(
    src: torch.Tensor, dst: torch.Tensor, group: GroupedQuant, *, programs_per_sm: int = PROGRAMS_PER_SM
) -> torch.Tensor:
    """Quantize every weight of ``group`` from ``src`` into ``dst`` (flat uint8 buffers) with one
    launch; returns the ``int32`` per-weight flags (1: the weight has a non-finite block, whose scale
    is NaN), not synchronized. Under ``TRITON_INTERPRET=1`` the kernel runs in the interpreter."""
    _check_buffers(src, dst, group)
    bad = torch.zeros(len(group.weights), dtype=torch.int32, device=src.device)
    interpreting = _interpreting()
    if interpreting:
        sms = INTERPRETER_SMS
    else:
        sms = _num_sms(src.device.index if src.device.index is not None else 0)
    grid = (min(group.n_blocks, sms * programs_per_sm),)
    item = torch.empty((), dtype=group.dtype).element_size()
    _fp8_block_quant_grouped_kernel[grid](
        _typed(src, group.dtype), dst, _typed(dst, torch.float32), bad, group.device_table(src.device),
        len(group.weights), group.n_blocks,
        EPS=EPS, FP8_MAX=FP8_MAX, BLOCK=BLOCK, COLS=COLS, STEPS=_steps(len(group.weights)),
        SRC_ALIGN=ALIGN // item, SOFT_CAST=interpreting,
        DIV_MODE=DIV_RN if interpreting else DEFAULT_DIV_MODE,
        INTERPRET=interpreting, N_ITERS=triton.cdiv(group.n_blocks, grid[0]) if interpreting else 0,
        num_warps=8,
    )  # fmt: skip
    return bad


@functools.cache
def _steps(n_weights: int) -> int:
    return max(n_weights - 1, 0).bit_length()


# --------------------------------------------------------------------------------------------------
# Plain-PyTorch reference
# --------------------------------------------------------------------------------------------------


def fp8_block_quant_grouped_torch(src: torch.Tensor, dst: torch.Tensor, group: GroupedQuant) -> torch.Tensor:
    """The reference: each weight through :func:`fp8_block_quant_torch`, written at its offsets."""
    _check_buffers(src, dst, group)
    bad = torch.zeros(len(group.weights), dtype=torch.int32, device=src.device)
    item = torch.empty((), dtype=group.dtype).element_size()
    for i, w in enumerate(group.weights):
        n, k = w.shape
        x = src[w.src_offset : w.src_offset + n * k * item].view(group.dtype).view(n, k)
        q, s = fp8_block_quant_torch(x, name=w.name, check=False)
        dst[w.q_offset : w.q_offset + n * k].copy_(q.view(torch.uint8).flatten())
        dst[w.scale_offset : w.scale_offset + s.numel() * 4].view(torch.float32).copy_(s.flatten())
        bad[i] = int(not bool(torch.isfinite(s).all()))
    return bad


def fp8_block_quant_grouped(src: torch.Tensor, dst: torch.Tensor, group: GroupedQuant) -> torch.Tensor:
    """The kernel where it can run (CUDA, or Triton's interpreter), else the reference: same bits."""
    if src.is_cuda or _interpreting():
        return fp8_block_quant_grouped_triton(src, dst, group)
    return fp8_block_quant_grouped_torch(src, dst, group)


__all__ = [
    "GroupedQuant",
    "GroupedWeight",
    "fp8_block_quant_grouped",
    "fp8_block_quant_grouped_torch",
    "fp8_block_quant_grouped_triton",
    "groupable",
    "plan_grouped",
]
