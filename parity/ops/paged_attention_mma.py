"""Causal attention over SGLang's paged KV cache on tensor cores, whose every row has one definition on
the GPU: decode row == extend row == the trainer's full-sequence row, bit for bit, at any batch
composition. The same public API and paged layout as :mod:`parity.ops.paged_attention` (switch by
changing the import); unlike it, no plain-PyTorch code reproduces these bits (tensor-core accumulation
is not IEEE), so its guarantee is GPU == GPU (and interpreter == interpreter), not GPU == CPU.

The definition (what decode and extend both compute)
----------------------------------------------------
For a query row at position ``p`` of a request (keys ``0 .. p``), query head ``h`` with kv head
``h // G`` (``G = Hq / Hkv``), head dim ``D``, ``C = CONTRACT_CHUNK`` (64), ``N = CONTRACT_GROUP`` (4)
and ``qk_scale = fp32(scale * log2(e))``:

1. The keys are cut into chunks of a **fixed size** ``C``: chunk ``j`` holds positions
   ``jC .. jC + C - 1``; the row uses chunks ``0 .. p // C`` (lanes ``> p`` invalid). The chunks are
   cut into groups of a **fixed count** ``N``: group ``k`` holds chunks ``kN .. kN + N - 1``.
   Boundaries depend on positions only, never on the batch, the split count or the number of query
   rows.
2. Per group, from ``(m, l, acc) = (-inf, 0, 0)``, its chunks in increasing ``j`` (``_chunk_step``),
   one **tile** of ``BLOCK_M = 64`` query rows x ``D`` (bf16/fp16), ``MMA_NUM_WARPS = 4``:

   - ``s = tl.dot(q_tile, kT_chunk) * qk_scale`` (tensor cores, fp32 accumulate; then one fp32
     multiply); invalid lanes ``-inf``;
   - ``m' = max(m, max_n s + 0.0)`` (``+ 0.0``: never ``-0.0``); ``r = m'``, or ``0`` for a row with no
     valid lane yet (``-inf``: no ``inf - inf``); ``alpha = exp2(m - r)``;
   - ``p = exp2(s - r)`` (``tl.exp2``: ``ex2.approx``; invalid lanes exactly ``+0``);
     ``l = l * alpha + tl.sum(p, 1)``;
   - ``acc = tl.dot(p.to(v.dtype), v_chunk, acc * alpha)``: the tensor cores accumulate into the
     rescaled accumulator (flash attention's step).

3. The group partials ``(m_k, l_k, acc_k)`` are folded in increasing ``k`` from
   ``(M, L, A) = (-inf, 0, 0)``: ``M' = max(M, m_k)``, ``r = M'`` (``0`` if ``-inf``),
   ``a = exp2(M - r)``, ``b = exp2(m_k - r)``, ``L = L * a + l_k * b``, ``A = A * a + acc_k * b``
   (each product rounded, then the sum: kernels compile with ``enable_fp_fusion=False``).
4. ``out = div_rn(A, L) + 0.0`` (IEEE division; ``+ 0.0`` turns a ``-0.0`` into ``+0.0``), rounded
   once to the output dtype.

Why decode == extend bitwise
----------------------------
* **Extend** (prefill after a cached prefix, and the trainer's full sequence): a tile is up to 64
  consecutive rows of one request and **one query head** (GQA heads are not mixed: each head of a
  group is its own tile, the kv chunk is re-read from L2, as SGLang's extend does). One program walks
  the groups of the tile's last row, computing each group's partial and folding it at once; a row
  whose position is before group ``k`` keeps its state (a select). Inside a group, a row's chunks
  past its position have no valid lane: ``alpha = exp2(0) = 1``, ``p = +0``, so they leave its
  ``(m, l, acc)`` as they were (zero products do not change the accumulation: the second hardware
  assumption below).
* **Decode**: a tile is the ``G`` query heads of one kv head of one request (rows ``G .. 63`` padded,
  fully masked: decode is memory-bound, the idle MMA rows are free). Split-KV: programs compute the
  partials of a few groups each (``groups_per_program``, a launch option) and write them in fp32; a
  second kernel folds them in group order with the same ``_combine`` function. How that fold is
  spread is a launch option too: a (kv head, request) may be cut into slices of its D columns and
  of its query heads, each program folding the same groups in the same order for its slice (``M``
  and ``L`` recomputed by each with the same ops); the partials may be loaded a few groups ahead.
* **Per element, an MMA result depends only on its row of A and its column of B** (each output is a
  dot product; the other rows of the tile never enter it), and its accumulation order depends only
  on the instruction sequence, which ``tl.dot`` fixes from the operand shapes ([64, D] x [D, C] and
  [64, C] x [C, D] into [64, D]), dtypes and warp count, all identical in both kernels (both call the
  same ``@triton.jit`` helpers: ``_load_kv`` -> ``_chunk_step`` (-> ``_combine``)). So the row's scores
  are the same bits in a decode tile (with its padded rows) and in an extend tile (with its
  neighbours), and so are ``acc`` (its ``p`` row is the same; invalid lanes have ``p = +0`` in both,
  whatever V holds there: zero products do not change a non-zero sum, and the sign of a zero result
  is normalised by the final ``+ 0.0``).
* The reductions ``max`` and ``sum`` over the 64 lanes run on the same register layout (the MMA
  output layout of the [64, C] score tile), with the same code, so in the same order. ``max`` is exact
  anyway; ``sum`` is order-sensitive, hence the shared helper.
* Everything after the reductions is element-wise fp32 (``max``, ``-``, ``exp2``, ``*``, ``+``,
  ``div_rn``): the same ops on the same values give the same bits in any layout and in any kernel,
  and a partial stored to memory in fp32 and reloaded is exact. Fusion into fma is disabled.
* Launch options (groups per decode program, ``num_stages`` pipelining, the fold's :class:`FoldLaunch`
  slices, prefetch, stages, unrolling and warps) change the schedule, never the instruction sequence
  of a chunk's arithmetic nor the order of the fold: they do not change the bits. ``BLOCK_M``, ``C``
  ``N`` and ``MMA_NUM_WARPS`` are part of the definition (``num_warps`` other than 4 is refused).

Checked without a GPU: ``tests/test_paged_attention_mma_interpreter.py`` compiles both kernels for
sm_90 (H100/H200) and asserts that every copy of the chunk arithmetic (first dot .. second dot: wgmma
m64n64k16 / m64n128k16, the row max and sum on one MMA register layout, exp2, the rescale, casts) is
one TTGIR in the extend kernel and in the decode kernel at any ``num_stages``, and that the PTX has no
fma (``num_warps = 8`` would change the layout: the check catches it). On the GPU
(``tests/test_paged_attention_mma_gpu.py``): decode == extend at every position and split, a row's bits
unchanged when the other rows of its tile change, random batches to 32k context. Two assumptions about
the hardware rest on those GPU tests: an MMA output element depends only on its row and column, and
zero products of either sign (an extend row's lanes past its position hold real V, a decode row's
hold 0) do not change a non-zero accumulation.

The bits belong to a GPU architecture and a Triton version (the MMA instructions they select): run
the trainer and the rollout server on the same kind of GPU and the same Triton. Not the same bits as
:mod:`parity.ops.paged_attention` (CUDA-core trees, CPU-reproducible), nor as SGLang's kernels or flash
attention. ``tl.exp2`` is ``ex2.approx.ftz.f32``: ~2 ulp, deterministic. Inputs with NaN/inf are
outside the definition.

Under ``TRITON_INTERPRET=1`` (CPU tests) the same kernels run with numpy: ``tl.dot`` of bf16 is broken
there (Triton 3.6 multiplies the raw uint16 bits), so the interpreter path upcasts the dot operands to
fp32 (the products are exact; numpy's sgemm accumulates) and rounds ``p`` and the bf16 output to
nearest even on the bits (the interpreter's own casts truncate). decode == extend holds there by the
same argument (the sgemm of a [64, K] tile is row-independent), with other bits than the GPU's.

Trade-offs
----------
* Tensor cores for both products: extend runs at flash-attention-like speed (two [64, 64]-ish MMAs per
  chunk and tile) instead of the CUDA-core trees. The price over SGLang's extend: a fixed 64-row tile
  (SGLang uses 128 on Hopper), the un-fused ``A * a + acc * b`` fold ([64, D] extra multiplies per
  group) and no fma.
* **Why groups** (``N``): decode cannot fold a row's chunks in one program without giving up split-KV
  parallelism, so each chunk's partial used to be written and folded by a second kernel, a serial
  chain of ``ceil(len / 64)`` steps: at batch 1 and 32k context that chain alone took ~35 us of the
  decode's ~93 (flash: 58), one warp per SM issuing every ~2.4 cycles (ncu; at most 4096 independent
  (head, column) chains exist at batch 1, Hq 32, D 128, so it cannot spread wider). In groups, the
  chunks of a group are accumulated by one program the flash way (no partial written, no fold step)
  and only the groups are folded: a chain of ``ceil(len / (64 N))`` steps and ``N`` times fewer
  partials (``D + 2`` fp32 per group and query head). The price is split-KV parallelism at short
  context and small batch: a (kv head, request) has ``ceil(len / (64 N))`` programs' worth of work.
  On the H200 (``--only groups``, decode from CUDA graphs vs flash at 1k / 4k / 16k / 32k context,
  batch 1 / 8 / 64, this kernel): N = 4 was 0.79-1.36x of flash, 8 of the 12 points within 1.15x;
  N = 1 (no groups) 0.90-1.71x (7 of 12; the serial fold at long context), N = 8 0.76-1.81x (7 of 12;
  1k batch 1 has 16 programs) and N = 16 0.74-2.83x (6 of 12). The groups change the bits, so N is
  part of the definition. Where N = 4 trails (batch 8 at 16k / 32k: 1.31 / 1.36x) the partials kernel
  itself is the time (0.32 of 0.35 ms at 32k, ``--only profile``), at ~0.75 of the copy bandwidth
  with two programs per SM, each with one chunk's K and V in flight.
* The fold kernel is spread by :class:`FoldLaunch` (default ``d2_r2_p16_w1`` of ``FOLD_CANDIDATES``:
  the best, or within 3% of the best, at every point of ``benchmarks/bench_paged_attention.py
  --sweep`` on an H200 but one, measured with one chunk per group): each (kv head, request) folded by
  4 one-warp programs (2 D slices x 2 row slices), loading partials 16 groups ahead into registers.
* The decode partials use ~113 KB of shared memory at D = 128 (K and V double-buffered, q, and the
  conversion of the [64, D] partial to a coalesced store): 2 programs per SM. ``num_stages = 3`` (the
  slot load one chunk further ahead) and ~2 programs' worth of work per SM (``_groups_per_program``)
  were the best of the sweep (``--only partials``, one chunk per group).
* The extend kernel uses ~252 registers per thread at D = 128 (no spills on sm_90 at its launches):
  2 programs per SM.
* ``out`` may be passed as a float32 tensor: the unrounded ``A / L`` (tests use it to see every bit).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from parity.ops.device import device_properties, sm_count
from parity.ops.paged_attention import _attention_fp32, _check, _full_sequence_rows, _inner_unit, _store_rows
from parity.ops.paged_attention import extend_rows as extend_rows  # same helper, re-exported
from parity.ops.policy_loss import _interpreting

CONTRACT_CHUNK = 64  # keys per chunk (part of the definition: changes the bits)
CONTRACT_GROUP = 4  # chunks per group (part of the definition: changes the bits)
BLOCK_M = 64  # query rows per MMA tile, decode and extend (part of the definition)
MMA_NUM_WARPS = 4  # warps of every kernel that runs the tile's dots (part of the definition)

# Launch options (never change the bits).
DECODE_NUM_STAGES = 3  # the partials' pipeline (3: the slot ids one chunk ahead of K and V)
DECODE_PROGRAMS_PER_SM = 2  # resident partials programs per SM (shared memory: ~113 KB each at D = 128)
DECODE_MAX_GROUPS_PER_PROGRAM = 8  # 32 chunks
# The fold kernel launched as a programmatic dependent of the partials (sm_90+: it starts while the
# partials' last programs run and waits on ``griddepcontrol.wait`` before reading them). Off: on the
# H200 it was 1-3% slower at the same partials launch (--only partials, one chunk per group: 32k
# batch 1 0.0986 vs 0.0957 ms, 16k batch 8 0.2167 vs 0.2126).
DECODE_PDL = False
EXTEND_NUM_STAGES = 2


@dataclasses.dataclass(frozen=True)
class FoldLaunch:
    """How the decode fold (``_decode_combine_kernel``) is spread and its loads issued: launch options,
    never the bits (every program folds its rows' and columns' groups in group order with ``_combine``).
    The defaults are the H200 sweep's pick, ``d2_r2_p16_w1`` (the module docstring)."""

    d_slices: int = 2  # programs per (kv head, request) over the D columns: a power of two <= D
    row_slices: int = 2  # ... over the G query heads: a power of two <= G's next power of two
    prefetch: int = 16  # P > 0: partials loaded P groups ahead into registers; 0: the pipelined loop
    num_warps: int = 1  # a power of two <= 16
    num_stages: int = 6  # the pipelined loop's stages (prefetch 0)
    unroll: int = 8  # the pipelined loop's unrolled steps (prefetch 0)

    @property
    def name(self) -> str:
        loop = f"p{self.prefetch}" if self.prefetch else f"s{self.num_stages}_u{self.unroll}"
        return f"d{self.d_slices}_r{self.row_slices}_{loop}_w{self.num_warps}"


# Fold launches for the benchmark's --sweep (benchmarks/bench_paged_attention.py) to time, by name; the
# sm_90 compile test builds each without register spills.
# (P = 32 compiles too, without spills at 8 D slices, but Triton's coalescing pass takes ~40 s on it.)
FOLD_CANDIDATES: dict[str, FoldLaunch] = {
    f.name: f
    for f in (
        FoldLaunch(d, r, p, w, *((s, u) if s else ()))
        for d, r, p, s, u, w in (
            # d, r: D / row slices; p: groups loaded ahead (0: pipelined loop, s stages, u unrolled); w: warps
            (1, 1, 0, 3, 4, 4), (1, 1, 0, 4, 8, 4), (1, 1, 0, 6, 8, 4), (1, 1, 0, 8, 4, 4),
            (2, 1, 0, 6, 8, 2), (4, 1, 0, 4, 8, 1), (4, 1, 0, 8, 8, 1), (8, 1, 0, 8, 8, 1),
            (1, 1, 8, 0, 0, 4), (2, 1, 8, 0, 0, 2), (2, 1, 16, 0, 0, 2), (4, 1, 8, 0, 0, 1),
            (4, 1, 16, 0, 0, 1), (8, 1, 8, 0, 0, 1), (8, 1, 16, 0, 0, 1), (1, 4, 16, 0, 0, 1),
            (2, 2, 16, 0, 0, 1), (4, 4, 8, 0, 0, 1), (4, 4, 16, 0, 0, 1),
        )
    )
}  # fmt: skip
# Tried on the H200 and not kept (same bits; whole decode replayed from a CUDA graph, Hq 32 / Hkv 8):
# - the partials grid with the kv head as its fastest axis (programs launched together read adjacent
#   slots): within +-1% everywhere; KV slots in order instead of randomly permuted: 1-3% faster, so the
#   paging is not what the partials pay for.
# - the fold's factors first: every chunk's a_j = exp2(M_{j-1} - r_j), b_j = exp2(m_j - r_j) by a
#   prefix-max scan over all chunks at once (max is exact: the same M_j as the serial fold), then a
#   chain of multiplies and adds only (~31 instructions a step instead of ~40, no exp2 in the loop).
#   Bitwise equal to the serial fold on the GPU, but slower: 32k batch 1 0.093-0.114 ms vs 0.091,
#   16k batch 1 0.052-0.063 vs 0.052, batch 8 +1-4%: the chain's time is not its instruction count.
# - groups per program 16 / 32 and 4 stages (--only partials, 6 shapes, both slot layouts): the default
#   within 1-2% of the best everywhere.
# Considered from the sm_90 compile, not built: the partial's store converts the [64, D] fp32 tile to a
# coalesced layout through 32 KB of shared memory (115 KB per program in all). Storing only the G rows
# (each an exact sum over the tile's rows with -0.0 elsewhere) drops that to 84.5 KB, but a third K/V
# buffer (a deeper pipeline: more bytes in flight) would then need ~117 KB per program, 2 x 117 KB >
# 228 KB per SM: no gain at 2 programs per SM.
SEARCH_BLOCK = 256  # segments scanned per step when a tile looks up its request

_LOG2E = 1.4426950408889634

# Output allocator (tests swap it for one that poisons, to check that every element is written).
_empty = torch.empty

_SUPPORTED = (torch.bfloat16, torch.float16)


# ====================================================================================================
# Triton: the per-chunk arithmetic, shared by the decode and extend kernels
# ====================================================================================================
@triton.jit
def _round_to(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (nearest even) as a dot operand. On the GPU: the cast (cvt.rn).
    Under the interpreter: kept as fp32 holding the rounded values (its bf16 cast truncates and its
    bf16 dot is broken)."""
    if INTERP:
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            return r.to(tl.float32, bitcast=True)
        else:
            return x.to(dtype).to(tl.float32)
    else:
        return x.to(dtype)


@triton.jit
def _operand(x, INTERP: tl.constexpr):
    """A loaded bf16/fp16 tile as a dot operand (fp32 under the interpreter: exact upcast)."""
    if INTERP:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _load_kv(
    R2T, pool, stride_r, j, lim, K, V, sk_t, sk_h, sv_t, sv_h, kvh, C: tl.constexpr, D: tl.constexpr
):
    """Chunk j's keys as kT [D, C] and values v [C, D] (positions jC ..; those >= lim read 0)."""
    pos = j * C + tl.arange(0, C)
    inb = pos < lim
    slot = tl.load(R2T + pool * stride_r + pos, mask=inb, other=0).to(tl.int64)
    offs_d = tl.arange(0, D)
    kT = tl.load(K + slot[None, :] * sk_t + kvh * sk_h + offs_d[:, None], mask=inb[None, :], other=0.0)
    v = tl.load(V + slot[:, None] * sv_t + kvh * sv_h + offs_d[None, :], mask=inb[:, None], other=0.0)
    return kT, v


@triton.jit
def _chunk_step(q, kT, v, row_lim, j, qk_scale, m, l_sum, acc, C: tl.constexpr, INTERP: tl.constexpr):
    """Chunk j folded into its group's running (m, l, acc) for the tile's rows: q [BLOCK_M, D], kT [D, C],
    v [C, D]; row i attends to positions < row_lim[i]. The second dot accumulates into ``acc * alpha``
    (the tensor cores' fp32 accumulator). One code path for decode and extend (module docstring)."""
    s = tl.dot(_operand(q, INTERP), _operand(kT, INTERP))  # [BLOCK_M, C], fp32 accumulate
    s = s * qk_scale
    lane = j * C + tl.arange(0, C)
    s = tl.where(lane[None, :] < row_lim[:, None], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1) + 0.0)  # (+ 0.0: never -0.0)
    r = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row without valid lanes yet: no inf - inf
    alpha = tl.exp2(m - r)
    p = tl.exp2(s - r[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = tl.dot(_round_to(p, v.dtype, INTERP), _operand(v, INTERP), acc * alpha[:, None])
    return m_new, l_sum, acc


@triton.jit
def _fresh(BLOCK_M: tl.constexpr, D: tl.constexpr):
    """A group's running (m, l, acc) before its first chunk: (-inf, 0, 0)."""
    return (
        tl.full([BLOCK_M], float("-inf"), tl.float32),
        tl.zeros([BLOCK_M], tl.float32),
        tl.zeros([BLOCK_M, D], tl.float32),
    )


@triton.jit
def _combine(M, L, A, m, l_sum, acc):
    """Fold one group's partial into the running (M, L, A): element-wise, products rounded first."""
    m_new = tl.maximum(M, m)
    r = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no valid lane yet: no inf - inf
    a = tl.exp2(M - r)
    b = tl.exp2(m - r)
    L = L * a + l_sum * b
    A = A * a[:, None] + acc * b[:, None]
    return m_new, L, A


@triton.jit
def _extend_step(
    q, R2T, pool, stride_r, j, n_all, lim, K, V, sk_t, sk_h, sv_t, sv_h, kvh, row_lim, qk_scale, M, L, A,
    m, l_sum, acc, pos, BLOCK_M: tl.constexpr, C: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    INTERP: tl.constexpr,
):  # fmt: skip
    """Chunk j of an extend tile folded into its group (decode's code); after a group's last chunk,
    the group folded into the rows' state (the decode fold's code) and a fresh group begun. Rows whose
    position is before the group keep their state (they do not use it)."""
    kT, v = _load_kv(R2T, pool, stride_r, j, lim, K, V, sk_t, sk_h, sv_t, sv_h, kvh, C, D)
    m, l_sum, acc = _chunk_step(q, kT, v, row_lim, j, qk_scale, m, l_sum, acc, C, INTERP)
    if (j + 1) % GROUP == 0 or j + 1 == n_all:
        M2, L2, A2 = _combine(M, L, A, m, l_sum, acc)
        use = (j // GROUP) * GROUP * C <= pos
        M = tl.where(use, M2, M)
        L = tl.where(use, L2, L)
        A = tl.where(use[:, None], A2, A)
        m, l_sum, acc = _fresh(BLOCK_M, D)
    return M, L, A, m, l_sum, acc


@triton.jit
def _finish(A, L):
    """out = A / L (IEEE division), + 0.0 (no -0.0): still fp32, rounded by the store."""
    return tl.math.div_rn(A, L[:, None]) + 0.0


# ====================================================================================================
# Triton: kernels
# ====================================================================================================
@triton.jit
def _extend_kernel(
    Q, sq_t, sq_h,
    K, sk_t, sk_h, V, sv_t, sv_h,
    R2T, stride_r,
    SEG, S, ROW_POS, n_tiles,
    OUT, so_t, so_h,
    qk_scale,
    G: tl.constexpr, D: tl.constexpr, C: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    SEARCH: tl.constexpr, HAS_ROW_POS: tl.constexpr, INTERP: tl.constexpr, OUT_BF16_INTERP: tl.constexpr,
):  # fmt: skip
    """Extend / full sequence: one program per (row tile, query head). SEG [5, S] (int32) describes
    the segments (runs of rows of one request): first row, rows, pool row, position of the first row,
    cumulative tile count. Tiles are taken longest-last-first (reverse order)."""
    t = n_tiles - 1 - tl.program_id(0)
    h = tl.program_id(1)
    # the segment of tile t: how many segments end (in tiles) at or before t
    s = 0
    s0 = 0
    while s0 < S:  # (a while loop: the interpreter cannot range() over a scalar argument)
        offs = s0 + tl.arange(0, SEARCH)
        ends = tl.load(SEG + 4 * S + offs, mask=offs < S, other=2147483647)
        s += tl.sum((ends <= t).to(tl.int32), 0)
        s0 += SEARCH
    if s >= S:  # a spare grid slot (the grid is an upper bound, no host sync)
        return
    before = tl.load(SEG + 4 * S + s - 1, mask=s > 0, other=0)
    start = tl.load(SEG + s)
    nrows = tl.load(SEG + S + s)
    pool = tl.load(SEG + 2 * S + s).to(tl.int64)
    local = (t - before) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = local < nrows
    rows = (start + local).to(tl.int64)
    if HAS_ROW_POS:
        pos = tl.load(ROW_POS + rows, mask=rmask, other=0).to(tl.int32)
    else:
        pos = tl.load(SEG + 3 * S + s) + local
    pos = tl.where(rmask, pos, -1)
    row_lim = pos + 1  # padded rows: 0 (no valid lane)
    p_max = tl.max(pos, 0)
    kvh = h // G
    offs_d = tl.arange(0, D)
    q = tl.load(Q + rows[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=rmask[:, None], other=0.0)
    M = tl.full([BLOCK_M], float("-inf"), tl.float32)
    L = tl.zeros([BLOCK_M], tl.float32)
    A = tl.zeros([BLOCK_M, D], tl.float32)
    lim = p_max + 1
    n_all = p_max // C + 1  # chunks of the last row
    m, l_sum, acc = _fresh(BLOCK_M, D)
    if INTERP:  # the interpreter cannot run range() to a loaded bound: the same steps in a while loop
        j = 0
        while j < n_all:
            M, L, A, m, l_sum, acc = _extend_step(
                q, R2T, pool, stride_r, j, n_all, lim, K, V, sk_t, sk_h, sv_t, sv_h, kvh, row_lim, qk_scale,
                M, L, A, m, l_sum, acc, pos, BLOCK_M, C, D, GROUP, INTERP,
            )  # fmt: skip
            j += 1
    else:
        for j in range(0, n_all):
            M, L, A, m, l_sum, acc = _extend_step(
                q, R2T, pool, stride_r, j, n_all, lim, K, V, sk_t, sk_h, sv_t, sv_h, kvh, row_lim, qk_scale,
                M, L, A, m, l_sum, acc, pos, BLOCK_M, C, D, GROUP, INTERP,
            )  # fmt: skip
    o = _finish(A, L)
    _store_rows(OUT + rows[:, None] * so_t + h * so_h + offs_d[None, :], o, rmask[:, None], OUT_BF16_INTERP)


@triton.jit
def _decode_step(
    q, R2T, pool, stride_r, j, j1, seq, K, V, sk_t, sk_h, sv_t, sv_h, kvh, row_lim, qk_scale, m, l_sum, acc,
    MID, MM, ML, base, g, gmask, G: tl.constexpr, BLOCK_M: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
    GROUP: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """Decode stage 1: chunk j folded into its group (the extend's code); after a group's last chunk
    (or the program's last), the group's partial written in fp32 and a fresh group begun."""
    kT, v = _load_kv(R2T, pool, stride_r, j, seq, K, V, sk_t, sk_h, sv_t, sv_h, kvh, C, D)
    m, l_sum, acc = _chunk_step(q, kT, v, row_lim, j, qk_scale, m, l_sum, acc, C, INTERP)
    if (j + 1) % GROUP == 0 or j + 1 == j1:
        off = (base + j // GROUP) * G + g  # partials laid out [B, Hkv, groups, G, (D)]
        tl.store(MM + off, m, mask=gmask)
        tl.store(ML + off, l_sum, mask=gmask)
        tl.store(MID + off[:, None] * D + tl.arange(0, D)[None, :], acc, mask=gmask[:, None])
        m, l_sum, acc = _fresh(BLOCK_M, D)
    return m, l_sum, acc


@triton.jit
def _decode_partials_kernel(
    Q, sq_b, sq_h,
    K, sk_t, sk_h, V, sv_t, sv_h,
    R2T, stride_r, POOL, SEQ,
    MID, MM, ML, max_groups, gpp,
    qk_scale,
    G: tl.constexpr, D: tl.constexpr, C: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    PDL: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """Decode stage 1: one program per (block of ``gpp`` groups, kv head, request) writes each group's
    partial (the extend's code) in fp32; the tile's rows are the kv head's G query heads (padded to
    BLOCK_M with rows that attend to nothing). PDL: let the fold kernel launch once every program has
    started (it waits for this grid's end to read)."""
    if PDL:
        gdc_launch_dependents()
    blk = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    seq = tl.load(SEQ + b).to(tl.int32)
    n_chunks = (seq + C - 1) // C
    n_groups = (n_chunks + GROUP - 1) // GROUP
    g0 = blk * gpp
    if g0 >= n_groups:  # past this request's last group (the grid covers the longest request)
        return
    g = tl.arange(0, BLOCK_M)
    gmask = g < G
    offs_d = tl.arange(0, D)
    q = tl.load(
        Q + b * sq_b + (kvh * G + g)[:, None] * sq_h + offs_d[None, :], mask=gmask[:, None], other=0.0
    )
    row_lim = tl.where(gmask, seq, 0)
    pool = tl.load(POOL + b).to(tl.int64)
    base = (b * tl.num_programs(1) + kvh) * max_groups
    j1 = tl.minimum((g0 + gpp) * GROUP, n_chunks)  # past the program's last chunk
    m, l_sum, acc = _fresh(BLOCK_M, D)
    if INTERP:
        j = g0 * GROUP
        while j < j1:
            m, l_sum, acc = _decode_step(
                q, R2T, pool, stride_r, j, j1, seq, K, V, sk_t, sk_h, sv_t, sv_h, kvh, row_lim, qk_scale,
                m, l_sum, acc, MID, MM, ML, base, g, gmask, G, BLOCK_M, C, D, GROUP, INTERP,
            )  # fmt: skip
            j += 1
    else:
        for j in range(g0 * GROUP, j1):
            m, l_sum, acc = _decode_step(
                q, R2T, pool, stride_r, j, j1, seq, K, V, sk_t, sk_h, sv_t, sv_h, kvh, row_lim, qk_scale,
                m, l_sum, acc, MID, MM, ML, base, g, gmask, G, BLOCK_M, C, D, GROUP, INTERP,
            )  # fmt: skip


@triton.jit
def _load_partial(MID, MM, ML, off, mask, offs_d, D: tl.constexpr):
    """Group partials (m, l, acc) at rows ``off`` (a group's ``(base + j) * G + g``), columns ``offs_d``
    of acc; masked rows read (-inf, 0, 0)."""
    m = tl.load(MM + off, mask=mask, other=float("-inf"))
    l_sum = tl.load(ML + off, mask=mask, other=0.0)
    acc = tl.load(MID + off[:, None] * D + offs_d[None, :], mask=mask[:, None], other=0.0)
    return m, l_sum, acc


@triton.jit
def _combine_step(MID, MM, ML, off, gmask, offs_d, M, L, A, D: tl.constexpr):
    """Decode stage 2: load one group's partial and fold it in (the extend's fold)."""
    m, l_sum, acc = _load_partial(MID, MM, ML, off, gmask, offs_d, D)
    return _combine(M, L, A, m, l_sum, acc)


@triton.jit
def _prefetched_steps(
    MID, MM, ML, base, j, n_groups, g, gmask, offs_d, M, L, A, buf,
    G: tl.constexpr, D: tl.constexpr, P: tl.constexpr, BOUNDED: tl.constexpr,
):  # fmt: skip
    """Groups j .. j + P - 1 folded in order from ``buf`` (their partials, a tuple of P loaded during
    the previous block); after group j + i's fold, group j + i + P's load (past the request: masked,
    no traffic) into the registers that fold has read. A block's loads are used by the next block:
    about P steps of the chain between a load and its use (ptxas may group a block's loads towards
    its end, after the folds' last reads of their registers). The fold is ``_combine``: the same ops
    in the same order as the plain loop. Without BOUNDED the caller knows groups j + P .. j + 2P - 1
    exist (no per-group bound check: fewer instructions per step of the chain)."""
    nxt = ()
    for i in tl.static_range(P):
        m, l_sum, acc = buf[i]
        M, L, A = _combine(M, L, A, m, l_sum, acc)
        jn = j + P + i
        mask = gmask & (jn < n_groups) if BOUNDED else gmask
        nxt = nxt + (_load_partial(MID, MM, ML, (base + jn) * G + g, mask, offs_d, D),)
    return M, L, A, nxt


@triton.jit
def _decode_combine_kernel(
    MID, MM, ML, max_groups,
    SEQ, OUT, so_b, so_h,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPAN: tl.constexpr, GR: tl.constexpr,
    DS: tl.constexpr, PREFETCH: tl.constexpr, STAGES: tl.constexpr, UNROLL: tl.constexpr,
    PDL: tl.constexpr, INTERP: tl.constexpr, OUT_BF16_INTERP: tl.constexpr,
):  # fmt: skip
    """Decode stage 2: one program per (kv head, request, slice) folds the G heads' group partials in
    order. A slice is GR of the GP rows and DS of the D columns (launch options: every slice runs the
    same fold on its rows and columns; M and L are recomputed alike by the programs of a row). With
    PREFETCH = 0 the loads go through Triton's pipeliner (``STAGES``, ``UNROLL``); with PREFETCH = P
    they are issued P groups ahead into registers (``_prefetched_steps``). PDL: launched as a
    programmatic dependent of the partials kernel: wait for it to finish before reading partials."""
    kvh = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    g = tl.arange(0, GR)
    offs_d = tl.arange(0, DS)
    if GR < GP or DS < D:
        s = tl.program_id(2)
        g += (s // (D // DS)) * GR
        offs_d += (s % (D // DS)) * DS
    gmask = g < G
    seq = tl.load(SEQ + b).to(tl.int32)
    n_groups = (seq + SPAN - 1) // SPAN
    base = (b * tl.num_programs(0) + kvh) * max_groups
    if PDL:
        gdc_wait()  # the partials kernel has finished and its stores are visible
    M = tl.full([GR], float("-inf"), tl.float32)
    L = tl.zeros([GR], tl.float32)
    A = tl.zeros([GR, DS], tl.float32)
    if PREFETCH > 0:
        buf = ()
        for i in tl.static_range(PREFETCH):
            buf = buf + (_load_partial(MID, MM, ML, (base + i) * G + g, gmask & (i < n_groups), offs_d, D),)
        n_full = n_groups // PREFETCH * PREFETCH
        # blocks whose next block is whole (no bound checks), then the last whole block (checked)
        n_safe = tl.maximum(n_full - PREFETCH, 0)
        if INTERP:
            j = 0
            while j < n_safe:
                M, L, A, buf = _prefetched_steps(MID, MM, ML, base, j, n_groups, g, gmask, offs_d, M, L, A,
                                                 buf, G, D, PREFETCH, False)  # fmt: skip
                j += PREFETCH
        else:
            for j in tl.range(0, n_safe, PREFETCH, num_stages=1):
                M, L, A, buf = _prefetched_steps(MID, MM, ML, base, j, n_groups, g, gmask, offs_d, M, L, A,
                                                 buf, G, D, PREFETCH, False)  # fmt: skip
        if n_safe < n_full:
            M, L, A, buf = _prefetched_steps(MID, MM, ML, base, n_safe, n_groups, g, gmask, offs_d, M, L, A,
                                             buf, G, D, PREFETCH, True)  # fmt: skip
        for i in tl.static_range(PREFETCH - 1):  # the last n_groups - n_full groups, already loaded
            if n_full + i < n_groups:
                m, l_sum, acc = buf[i]
                M, L, A = _combine(M, L, A, m, l_sum, acc)
    elif INTERP:
        j = 0
        while j < n_groups:
            M, L, A = _combine_step(MID, MM, ML, (base + j) * G + g, gmask, offs_d, M, L, A, D)
            j += 1
    else:
        for j in tl.range(0, n_groups, num_stages=STAGES, loop_unroll_factor=UNROLL):
            M, L, A = _combine_step(MID, MM, ML, (base + j) * G + g, gmask, offs_d, M, L, A, D)
    o = _finish(A, L)
    _store_rows(OUT + b * so_b + (kvh * G + g)[:, None] * so_h + offs_d[None, :], o, gmask[:, None],
                OUT_BF16_INTERP)  # fmt: skip


@triton.jit
def _segments_kernel(LENS, PREFIX, POOLS, S, SEG, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    """SEG [5, S] int32 from per-request (rows, position of the first row, pool row): first row,
    rows, pool row, first position, cumulative tile count (one program: prefix sums in blocks)."""
    row_carry = 0
    tile_carry = 0
    s0 = 0
    while s0 < S:
        offs = s0 + tl.arange(0, BLOCK)
        mask = offs < S
        n = tl.load(LENS + offs, mask=mask, other=0).to(tl.int32)
        tiles = (n + BLOCK_M - 1) // BLOCK_M
        rows_end = tl.cumsum(n, 0) + row_carry
        tiles_end = tl.cumsum(tiles, 0) + tile_carry
        tl.store(SEG + offs, rows_end - n, mask=mask)
        tl.store(SEG + S + offs, n, mask=mask)
        tl.store(SEG + 2 * S + offs, tl.load(POOLS + offs, mask=mask, other=0).to(tl.int32), mask=mask)
        tl.store(SEG + 3 * S + offs, tl.load(PREFIX + offs, mask=mask, other=0).to(tl.int32), mask=mask)
        tl.store(SEG + 4 * S + offs, tiles_end, mask=mask)
        row_carry += tl.sum(n, 0)
        tile_carry += tl.sum(tiles, 0)
        s0 += BLOCK


# ====================================================================================================
# Launchers
# ====================================================================================================
def _qk_scale(scale: float) -> float:
    """fp32(scale * log2(e)): the one fp32 scalar both kernels multiply the scores by."""
    return float(torch.tensor(float(scale) * _LOG2E, dtype=torch.float32))


def _checked(q, k_buffer, v_buffer, chunk, group, out, num_warps):
    if not (q.is_cuda or _interpreting()):
        raise NotImplementedError(
            "paged_attention_mma runs on CUDA tensors (or under TRITON_INTERPRET=1); the CPU definition "
            "is parity.ops.paged_attention"
        )
    if q.dtype not in _SUPPORTED:
        raise NotImplementedError(
            f"paged_attention_mma: {q.dtype} inputs (bf16 or fp16 only: the tensor-core dots take "
            "16-bit operands; fp32 attention is parity.ops.paged_attention)"
        )
    hq, hkv, d = _check(q, k_buffer, v_buffer, chunk, kernel=False)
    if not 16 <= d <= 256 or not 16 <= chunk <= 128:
        raise NotImplementedError(f"paged_attention_mma: head_dim {d}, chunk {chunk} (16 .. 256, 16 .. 128)")
    if not 1 <= group <= 64:
        raise NotImplementedError(f"paged_attention_mma: {group} chunks per group (1 .. 64)")
    if hq // hkv > BLOCK_M:
        raise NotImplementedError(f"paged_attention_mma: {hq // hkv} query heads per kv head (<= {BLOCK_M})")
    if num_warps not in (None, MMA_NUM_WARPS):
        raise ValueError(
            f"num_warps is part of the definition (the MMA instruction sequence): {MMA_NUM_WARPS}"
        )
    if out is not None:
        if out.dtype not in (q.dtype, torch.float32) or out.shape != q.shape or out.stride(-1) != 1:
            raise ValueError(
                f"out must be {tuple(q.shape)} of {q.dtype} or float32 with a unit last stride: "
                f"{tuple(out.shape)} {out.dtype}"
            )
    return hq, hkv, d


def _launch_extend(
    q, k_buffer, v_buffer, req_to_token, seg, n_tiles, row_pos, scale, out, chunk, group, num_stages
):
    """Run the extend kernel over segments ``seg`` ([5, S] int32) and at most ``n_tiles`` tiles."""
    hq, hkv, d = q.shape[1], k_buffer.shape[1], q.shape[2]
    if n_tiles == 0 or q.shape[0] == 0:
        return out
    interp = _interpreting()
    _extend_kernel[(n_tiles, hq)](
        q, q.stride(0), q.stride(1),
        k_buffer, k_buffer.stride(0), k_buffer.stride(1), v_buffer, v_buffer.stride(0), v_buffer.stride(1),
        req_to_token, req_to_token.stride(0),
        seg, seg.shape[1], row_pos if row_pos is not None else seg, n_tiles,
        out, out.stride(0), out.stride(1),
        _qk_scale(scale),
        G=hq // hkv, D=d, C=chunk, GROUP=group, BLOCK_M=BLOCK_M, SEARCH=SEARCH_BLOCK,
        HAS_ROW_POS=row_pos is not None,
        INTERP=interp, OUT_BF16_INTERP=interp and out.dtype == torch.bfloat16,
        num_warps=MMA_NUM_WARPS, num_stages=num_stages or EXTEND_NUM_STAGES, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _segments(lens: torch.Tensor, first_pos: torch.Tensor, pools: torch.Tensor) -> torch.Tensor:
    s = lens.shape[0]
    seg = torch.empty((5, s), dtype=torch.int32, device=lens.device)
    if s:
        _segments_kernel[(1,)](lens, first_pos, pools, s, seg, BLOCK=256, BLOCK_M=BLOCK_M)
    return seg


def paged_attention_rows(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    row_pool: torch.Tensor,
    row_pos: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    chunk: int = CONTRACT_CHUNK,
    group: int = CONTRACT_GROUP,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The extend kernel on explicit rows: row i is query ``q[i]`` ([N, Hq, D]) at position
    ``row_pos[i]`` of the request whose KV slots are ``req_to_token[row_pool[i], :]``; it attends to
    positions ``0 .. row_pos[i]``. Returns [N, Hq, D]. Consecutive rows of one pool row share tiles
    (best when their positions are consecutive, as in an extend). Finding those runs costs one host
    sync: :func:`paged_attention_extend` and :func:`full_sequence_attention` have none.
    ``heads_per_program`` is accepted for API compatibility and ignored (a tile is one head)."""
    del heads_per_program
    _checked(q, k_buffer, v_buffer, chunk, group, out, num_warps)
    n = q.shape[0]
    if out is None:
        out = _empty(q.shape, dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    dev = q.device
    pool = row_pool.to(dev).long()
    new = torch.ones(n, dtype=torch.bool, device=dev)
    new[1:] = pool[1:] != pool[:-1]
    starts = torch.nonzero(new).squeeze(1)  # host sync
    lens = torch.diff(starts, append=torch.tensor([n], device=dev))
    seg = _segments(lens, torch.zeros_like(lens), pool[starts])
    n_tiles = int(seg[4, -1])
    return _launch_extend(
        _inner_unit(q), k_buffer, v_buffer, _inner_unit(req_to_token), seg, n_tiles,
        row_pos.to(dev).contiguous(), scale, out, chunk, group, num_stages,
    )  # fmt: skip


def paged_attention_extend(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    extend_prefix_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    chunk: int = CONTRACT_CHUNK,
    group: int = CONTRACT_GROUP,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """SGLang's extend batch: ``q`` [T, Hq, D] packs each request's new rows after its cached prefix
    (the new rows' KV already written to the buffers). Returns [T, Hq, D]. No host sync (the grid is
    ``T // 64 + B`` tiles, an upper bound; spare programs exit)."""
    del heads_per_program
    _checked(q, k_buffer, v_buffer, chunk, group, out, num_warps)
    if out is None:
        out = _empty(q.shape, dtype=q.dtype, device=q.device)
    dev = q.device
    seg = _segments(
        extend_seq_lens.to(dev).contiguous(), extend_prefix_lens.to(dev).contiguous(),
        req_pool_indices.to(dev).contiguous(),
    )  # fmt: skip
    n_tiles = q.shape[0] // BLOCK_M + extend_seq_lens.shape[0]
    return _launch_extend(
        _inner_unit(q), k_buffer, v_buffer, _inner_unit(req_to_token), seg, n_tiles, None, scale, out,
        chunk, group, num_stages,
    )  # fmt: skip


def _groups_per_program(work_groups: int, device: torch.device) -> int:
    """Groups per decode program (a launch option): the work in one wave of resident programs where it
    fits (``DECODE_PROGRAMS_PER_SM`` per SM), longer programs (up to ``DECODE_MAX_GROUPS_PER_PROGRAM``)
    where it does not: fewer, longer pipelines won the sweep over short ones at every size."""
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    return max(1, min(DECODE_MAX_GROUPS_PER_PROGRAM, -(-work_groups // (sms * DECODE_PROGRAMS_PER_SM))))


def paged_attention_decode(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    chunk: int = CONTRACT_CHUNK,
    group: int = CONTRACT_GROUP,
    max_chunks: int | None = None,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    groups_per_program: int | None = None,
    num_stages: int | None = None,
    pdl: bool | None = None,
    fold: FoldLaunch | None = None,
) -> torch.Tensor:
    """One query row per request (``q`` [B, Hq, D]) at position ``seq_lens[b] - 1`` (its own KV already
    written). Split-KV over fixed groups of fixed chunks, then a fold in group order. ``max_chunks``
    bounds ``ceil(max(seq_lens) / chunk)`` (computed with a host sync when None; give it from
    ``seq_lens_cpu``, or from the context length under CUDA-graph capture). ``groups_per_program`` and
    ``num_stages`` (the partials), ``pdl`` (the fold as a programmatic dependent launch: sm_90+;
    None: ``DECODE_PDL`` where the GPU has it) and ``fold`` (:class:`FoldLaunch`; None: its defaults,
    the slices capped at the shape's) are launch options: the bits do not depend on them."""
    del heads_per_program
    hq, hkv, d = _checked(q, k_buffer, v_buffer, chunk, group, out, num_warps)
    combine = _combine_config(hq // hkv, d, fold)
    bsz = q.shape[0]
    if out is None:
        out = _empty(q.shape, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    if max_chunks is None:
        max_chunks = -(-int(seq_lens.max()) // chunk)
    max_groups = -(-max(1, max_chunks) // group)
    g = hq // hkv
    q = _inner_unit(q)
    req_to_token = _inner_unit(req_to_token)
    seq_lens = seq_lens.to(q.device).contiguous()
    # group partials (through _empty too: poisoned in tests, so reading an unwritten one would show)
    mid = _empty((bsz, hkv, max_groups, g, d), dtype=torch.float32, device=q.device)
    mm = _empty((bsz, hkv, max_groups, g), dtype=torch.float32, device=q.device)
    ml = _empty((bsz, hkv, max_groups, g), dtype=torch.float32, device=q.device)
    gpp = groups_per_program or _groups_per_program(bsz * hkv * max_groups, q.device)
    pdl = _decode_pdl(pdl, q.device)
    interp = _interpreting()
    _decode_partials_kernel[(-(-max_groups // gpp), hkv, bsz)](
        q, q.stride(0), q.stride(1),
        k_buffer, k_buffer.stride(0), k_buffer.stride(1), v_buffer, v_buffer.stride(0), v_buffer.stride(1),
        req_to_token, req_to_token.stride(0), req_pool_indices.to(q.device).contiguous(), seq_lens,
        mid, mm, ml, max_groups, gpp,
        _qk_scale(scale),
        G=g, D=d, C=chunk, GROUP=group, BLOCK_M=BLOCK_M, PDL=pdl, INTERP=interp,
        num_warps=MMA_NUM_WARPS, num_stages=num_stages or DECODE_NUM_STAGES, enable_fp_fusion=False,
    )  # fmt: skip
    return _launch_combine(mid, mm, ml, seq_lens, out, chunk * group, combine, pdl)


def _decode_pdl(option: bool | None, device: torch.device) -> bool:
    """Whether the decode fold is launched as a programmatic dependent of the partials kernel: asked
    for (or ``DECODE_PDL``) and possible (a CUDA GPU of compute capability 9.0 or newer)."""
    want = DECODE_PDL if option is None else option
    able = device.type == "cuda" and not _interpreting() and device_properties(device).major >= 9
    if option and not able:
        raise ValueError("pdl: programmatic dependent launch needs a CUDA GPU of compute capability >= 9.0")
    return want and able


def _combine_config(g: int, d: int, fold: FoldLaunch | None) -> dict:
    """The decode fold's launch for G query heads per kv head and head dim D: ``fold`` validated (None:
    ``FoldLaunch()`` with its slices capped at the shape's) as the grid's slices per (kv head,
    request), the kernel's launch constexprs and warps."""
    gp = triton.next_power_of_2(g)
    if fold is None:
        default = FoldLaunch()
        fold = dataclasses.replace(
            default, d_slices=min(default.d_slices, d), row_slices=min(default.row_slices, gp)
        )
    for name, value, most in (
        ("d_slices", fold.d_slices, d), ("row_slices", fold.row_slices, gp), ("num_warps", fold.num_warps, 16)
    ):  # fmt: skip
        if value < 1 or value > most or value & (value - 1):
            raise ValueError(f"fold {name} {value}: a power of two in 1 .. {most}")
    if not 0 <= fold.prefetch <= 64:
        raise ValueError(f"fold prefetch {fold.prefetch}: 0 (the pipelined loop) .. 64 groups ahead")
    if fold.num_stages < 1 or fold.unroll < 1:
        raise ValueError(f"fold num_stages {fold.num_stages}, unroll {fold.unroll}: at least 1")
    return dict(
        slices=fold.d_slices * fold.row_slices,
        GP=gp,
        GR=gp // fold.row_slices,
        DS=d // fold.d_slices,
        PREFETCH=fold.prefetch,
        STAGES=fold.num_stages,
        UNROLL=fold.unroll,
        num_warps=fold.num_warps,
    )


def _launch_combine(mid, mm, ml, seq_lens, out, span, config: dict, pdl: bool) -> torch.Tensor:
    """The decode fold of group partials ``mid`` [B, Hkv, max_groups, G, D] / ``mm``, ``ml`` [B, Hkv,
    max_groups, G] (``span`` keys per group) into ``out`` [B, Hkv * G, D], launched as ``config``
    (``_combine_config``); with ``pdl`` as a programmatic dependent of the kernel before it on the
    stream (the partials)."""
    bsz, hkv, max_groups, g, d = mid.shape
    cfg = dict(config)
    interp = _interpreting()
    _decode_combine_kernel[(hkv, bsz, cfg.pop("slices"))](
        mid, mm, ml, max_groups,
        seq_lens, out, out.stride(0), out.stride(1),
        G=g, D=d, SPAN=span, PDL=pdl, INTERP=interp, OUT_BF16_INTERP=interp and out.dtype == torch.bfloat16,
        launch_pdl=pdl, enable_fp_fusion=False, **cfg,
    )  # fmt: skip
    return out


# ====================================================================================================
# The trainer's full sequence (HF AttentionInterface), with a backward
# ====================================================================================================
def _full_sequence_forward(query, key, value, scale, chunk, group, out_dtype=None):
    bsz, hq, t, d = query.shape
    s = key.shape[2]
    q_rows, k_buf, v_buf, req_to_token, _, _ = _full_sequence_rows(query, key, value)
    _checked(q_rows, k_buf, v_buf, chunk, group, None, None)
    dev = query.device
    seg = _segments(
        torch.full((bsz,), t, dtype=torch.int32, device=dev),
        torch.full((bsz,), s - t, dtype=torch.int32, device=dev),
        torch.arange(bsz, dtype=torch.int32, device=dev),
    )
    out = _empty(q_rows.shape, dtype=out_dtype or q_rows.dtype, device=dev)
    _launch_extend(
        q_rows, k_buf, v_buf, req_to_token, seg, bsz * -(-t // BLOCK_M), None, scale, out, chunk, group, None
    )
    return out.view(bsz, t, hq, d)


class _FullSequenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale, chunk, group):
        out = _full_sequence_forward(query, key, value, scale, chunk, group)
        ctx.save_for_backward(query, key, value)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Gradients are not part of the definition: recompute through a standard differentiable path.
        query, key, value = ctx.saved_tensors
        with torch.enable_grad():
            qd, kd, vd = (x.detach().requires_grad_(True) for x in (query, key, value))
            y = _attention_fp32(qd, kd, vd, ctx.scale).transpose(1, 2)  # [B, T, Hq, D]
            gq, gk, gv = torch.autograd.grad(y, (qd, kd, vd), grad_out.float())
        return gq.to(query.dtype), gk.to(key.dtype), gv.to(value.dtype), None, None, None


def full_sequence_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    chunk: int = CONTRACT_CHUNK,
    group: int = CONTRACT_GROUP,
) -> torch.Tensor:
    """Causal attention of whole sequences: query [B, Hq, T, D], key/value [B, Hkv, S, D] (S >= T: the
    query rows are the last T positions) -> [B, T, Hq, D] (HF's attention-output layout). Row t is
    bitwise the server's decode or extend row at position S - T + t (this module's kernels).
    Differentiable: the backward recomputes the attention in fp32 autograd (gradients are not part of
    the definition)."""
    return _FullSequenceAttention.apply(query, key, value, float(scale), chunk, group)


__all__ = [
    "BLOCK_M",
    "CONTRACT_CHUNK",
    "CONTRACT_GROUP",
    "FOLD_CANDIDATES",
    "FoldLaunch",
    "MMA_NUM_WARPS",
    "extend_rows",
    "full_sequence_attention",
    "paged_attention_decode",
    "paged_attention_extend",
    "paged_attention_rows",
]
