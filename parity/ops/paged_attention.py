"""Causal attention over SGLang's paged KV cache whose every row has one definition: decode == extend
== the trainer's full sequence, bit for bit, on the GPU (Triton), under the Triton interpreter and in
plain PyTorch (:func:`paged_attention_reference`).

The problem
-----------
A token's attention output must not depend on how the server happened to compute it. SGLang's triton
backend computes a decode row (one query over the paged KV cache) with a split-KV kernel whose number
of splits depends on the batch and the GPU (``get_num_kv_splits``), and an extend row (prefill, after a
cached prefix) with another kernel that walks the KV in blocks of another size, with ``tl.dot`` on
tensor cores; the trainer attends over the whole sequence with SDPA/flash. Four reduction orders, four
answers: logprobs drift (max 0.027 measured on an H100 between HF decode and HF full forward).
SGLang's deterministic mode fixes the decode split size but keeps tensor-core dots, which no
plain-PyTorch code can reproduce, and the trainer still runs something else.

The contract (what every implementation computes)
-------------------------------------------------
For a query row at position ``p`` of a request (keys ``0 .. p``), query head ``h`` with kv head
``h // G`` (grouped-query attention, ``G = Hq / Hkv``), head dim ``D`` (a power of two: 64, 128, ...),
``scale`` rounded to fp32, and ``C = CONTRACT_CHUNK`` (64):

1. The keys are cut into chunks of a **fixed size** ``C``: chunk ``j`` holds positions
   ``jC .. jC + C - 1``; the row uses chunks ``0 .. p // C`` (the last one partial, lanes ``> p``
   invalid). Chunk boundaries depend on positions only: never on the batch, the split count, the
   number of query rows or the GPU.
2. Per chunk, in fp32 (inputs upcast exactly from bf16/fp16/fp32):

   - ``prod[n, d] = q[d] * k[n, d]`` (exact for bf16 and fp16 inputs: 8 + 8 or 11 + 11 significant
     bits fit in fp32's 24);
   - ``s[n] = tree_D(prod[n, :]) * scale``, where ``tree_N(x)`` is the pairwise tree
     ``x'[i] = x[2i] + x[2i+1]`` applied ``log2 N`` times (a fixed order, not a hardware reduction);
     invalid lanes ``s = -inf``;
   - ``m = max_n s[n] + 0.0`` (max is exact; ``+ 0.0`` turns ``-0.0`` into ``+0.0`` so that the sign
     of a zero max cannot depend on the order of a max reduction);
   - ``e[n] = exp_c(s[n] - m)`` on valid lanes, exactly ``+0.0`` on invalid ones. ``exp_c`` is the
     logprob contract's exp (``parity.ops.policy_loss``: fma, multiply, add and bit operations only,
     argument clamped at -86), because ``tl.exp`` (``ex2.approx`` on the GPU, numpy under the
     interpreter) and ``torch.exp`` (libdevice, SLEEF) all differ in the last bits;
   - ``l = tree_C(e)``; ``acc[d] = tree_C(e[n] * v[n, d])`` (the product rounded to fp32; invalid
     lanes exactly ``+0.0``, whatever their V holds).

3. The chunk partials ``(m_j, l_j, acc_j)`` are combined in increasing ``j``, starting from
   ``(M, L, A) = (-inf, 0, 0)``: ``M' = max(M, m_j) + 0.0``, ``a = exp_c(M - M')``,
   ``b = exp_c(m_j - M')``, ``L = L * a + l_j * b``, ``A = A * a + acc_j * b`` (each product rounded,
   then the sum: never a fused multiply-add), ``M = M'``. ``exp_c(0) == 1`` exactly, so a chunk that
   does not raise the max leaves the earlier sums untouched.
4. ``out = A / L`` (IEEE division, correctly rounded), rounded once to the output dtype (nearest even).

A decode row computes the partials of its chunks in parallel (one program per chunk: split-KV
parallelism at any context length, the split *count* follows from the length) and combines them in a
second kernel; an extend row (and the trainer's full sequence, which is an extend with no prefix)
computes the same partials one after the other in one program and combines them on the fly. Both call
the same Triton functions on the same values, so the bits agree by construction, at any batch
composition. Tensor cores are not used: their internal accumulation is not IEEE and not reproducible
by PyTorch, and an MMA tile that mixes rows of different lengths would not be needed anyway.

Bitwise guarantees (tests/test_paged_attention_interpreter.py, tests/test_paged_attention_gpu.py):
kernel (GPU) == kernel (interpreter) == :func:`paged_attention_reference` (CPU or GPU) for finite
inputs; decode row == extend row == :func:`full_sequence_attention` at the same position. Inputs with
NaN/inf, or products below fp32's normal range (|q k| < 2^-126: subnormal handling may differ), are
outside the contract. Not the same bits as SDPA / flash attention (no implementation order can be).

Trade-offs
----------
* fp32 CUDA-core arithmetic (no tensor cores, no fma contraction: the kernels compile with
  ``enable_fp_fusion=False``): per key and query head, D multiplies and D - 1 adds for the score and
  as many for ``e * v``. Decode is memory-bound at GQA groups up to ~8 (an H100 issues ~33 T fp32
  instructions/s against ~1.7 T bf16 KV elements/s of HBM), so split-KV decode can run near copy
  bandwidth. Prefill attention is compute-bound and this is ~10x slower than flash attention on tensor
  cores: the price of a definition a CPU reproduces. It matters only when attention dominates the
  prefill (long prompts); the linear layers are unchanged (``batch_invariant_matmul``).
* ``C = 64``: a [C, D] tile of K and V per program (registers: 8192 fp32 values at D = 128). Smaller
  C gives more decode parallelism at short context and more partials (D + 2 fp32 per chunk and query
  head, written and read once: ~6% of the KV bytes at G = 4, C = 64); larger C the opposite. C is part
  of the contract (it changes the bits); the launch options (heads per program, warps) never do.
* The trees are written as reshapes to a trailing (or middle) axis of size 2 summed with ``tl.sum``:
  a sum of two values is one addition, commutative and exact-order, on every backend.
* The interpreter (numpy) rounds fp32 -> bf16 by truncation-and-half-up and computes ``tl.fma`` with
  two roundings: under ``TRITON_INTERPRET=1`` the kernels round the output to bf16 in integer
  arithmetic and use the exact fp64 emulation of fma (as ``policy_loss`` does). fp16 outputs run on
  the GPU (native ``cvt.rn``) and in the reference only.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from parity.ops import policy_loss as _pl
from parity.ops.policy_loss import _exp_neg_t, _fma_mode, _interpreting

CONTRACT_CHUNK = 64  # keys per chunk (part of the contract: changes the bits)
CONTRACT_FMA = True  # exp_c with fused multiply-add (the logprob contract's exp)

# Launch options (never change the bits): query heads of one kv group per program, warps.
DEFAULT_HEADS_PER_PROGRAM = 4
DECODE_NUM_WARPS = 4
EXTEND_NUM_WARPS = 4

# The logprob contract's exp constants (parity.ops.policy_loss), as constexprs of this module.
LOG2E: tl.constexpr = _pl.LOG2E
MAGIC: tl.constexpr = _pl.MAGIC
T_MIN: tl.constexpr = _pl.T_MIN
P0: tl.constexpr = _pl.P0
P1: tl.constexpr = _pl.P1
P2: tl.constexpr = _pl.P2
P3: tl.constexpr = _pl.P3
P4: tl.constexpr = _pl.P4
P5: tl.constexpr = _pl.P5

# Output allocator (tests swap it for one that poisons, to check that every element is written).
_empty = torch.empty

_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)


# ====================================================================================================
# Triton: the contract's per-row arithmetic (shared by the decode and extend kernels)
# ====================================================================================================
@triton.jit
def _exp_neg(t, FMA: tl.constexpr):
    """``policy_loss._exp_neg`` (the contract's exp_c of ``max(t, -86)``), written as one function:
    the same seven fma (native on the GPU, emulated exactly in fp64 under the interpreter, where every
    nested @triton.jit call costs milliseconds), the same bits (checked against ``_exp_neg_t``)."""
    t = tl.maximum(t, T_MIN, propagate_nan=tl.PropagateNan.ALL)
    log2e = tl.full(t.shape, LOG2E, tl.float32)
    z = t
    nk = t
    f = t
    p = tl.full(t.shape, P5, tl.float32)
    for i in tl.static_range(7):
        # step 0: z = fma(t, log2e, MAGIC); 1: f = fma(t, log2e, -k); 2..6: Horner p = fma(p, f, P4..P0)
        if i == 0:
            a = t
            b = log2e
            c = tl.full(t.shape, MAGIC, tl.float32)
        elif i == 1:
            a = t
            b = log2e
            c = nk
        else:
            a = p
            b = f
            if i == 2:
                c = tl.full(t.shape, P4, tl.float32)
            elif i == 3:
                c = tl.full(t.shape, P3, tl.float32)
            elif i == 4:
                c = tl.full(t.shape, P2, tl.float32)
            elif i == 5:
                c = tl.full(t.shape, P1, tl.float32)
            else:
                c = tl.full(t.shape, P0, tl.float32)
        if FMA == 1:
            r = tl.fma(a, b, c)
        elif FMA == 2:
            # a * b is exact in fp64; TwoSum gives s + e == a*b + c exactly; rounding s to odd, then
            # to nearest fp32, rounds a*b + c once (Boldo-Melquiond)
            pd = a.to(tl.float64) * b.to(tl.float64)
            cd = c.to(tl.float64)
            sd = pd + cd
            bp = sd - pd
            e = (pd - (sd - bp)) + (cd - bp)
            sb = sd.to(tl.int64, bitcast=True)
            fix = (e != 0.0) & ((sb & 1) == 0) & (tl.abs(sd) < float("inf"))
            up = (e > 0.0) == (sd > 0.0)
            sb = tl.where(fix, tl.where(up, sb + 1, sb - 1), sb)
            r = sb.to(tl.float64, bitcast=True).to(tl.float32)
        else:
            r = a * b + c  # two roundings (the fma-free variant; kernels compile without contraction)
        if i == 0:
            z = r  # bits 0x4B400000 + k: t log2e rounded to the integer k
            nk = MAGIC - z  # exact: -k
        elif i == 1:
            f = r  # t log2e - k, |f| <= 1/2
        else:
            p = r  # 2^f
    # adding k << 23 to p's bits multiplies it by 2^k exactly (normal range: t >= -86)
    return ((z.to(tl.int32, bitcast=True) << 23) + p.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def _tree_d(x, R: tl.constexpr, C: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr):
    """[R, C, D] -> [R, C]: x'[.., i] = x[.., 2i] + x[.., 2i+1], LOG2_D levels (one add per pair)."""
    for i in tl.static_range(LOG2_D):
        x = tl.sum(tl.reshape(x, [R, C, D >> (i + 1), 2]), 3)
    return tl.reshape(x, [R, C])


@triton.jit
def _tree_c(x, R: tl.constexpr, C: tl.constexpr, D: tl.constexpr, LOG2_C: tl.constexpr):
    """[R, C, D] -> [R, D]: the same pairwise tree over the key lanes (axis 1)."""
    for i in tl.static_range(LOG2_C):
        x = tl.sum(tl.reshape(x, [R, C >> (i + 1), 2, D]), 2)
    return tl.reshape(x, [R, D])


@triton.jit
def _tree_c2(x, R: tl.constexpr, C: tl.constexpr, LOG2_C: tl.constexpr):
    """[R, C] -> [R]: the pairwise tree over the key lanes."""
    for i in tl.static_range(LOG2_C):
        x = tl.sum(tl.reshape(x, [R, C >> (i + 1), 2]), 2)
    return tl.reshape(x, [R])


@triton.jit
def _chunk_partial(
    q, k, v, valid, scale,
    R: tl.constexpr, C: tl.constexpr, D: tl.constexpr, LOG2_C: tl.constexpr, LOG2_D: tl.constexpr,
    FMA: tl.constexpr,
):  # fmt: skip
    """(m, l, acc) of one chunk for R query rows: q [R, D], k, v [C, D] (fp32), valid [1 or R, C]."""
    prod = q[:, None, :] * k[None, :, :]  # exact for bf16/fp16 inputs
    s = _tree_d(prod, R, C, D, LOG2_D) * scale
    s = tl.where(valid, s, float("-inf"))
    m = tl.max(s, 1) + 0.0  # exact; + 0.0: the sign of a zero max never depends on the reduction
    e = tl.where(valid, _exp_neg(s - m[:, None], FMA), 0.0)
    l_sum = _tree_c2(e, R, C, LOG2_C)
    # invalid lanes contribute exactly +0.0 (an extend row's lanes past its position hold real V)
    pv = tl.where(valid[:, :, None], e[:, :, None] * v[None, :, :], 0.0)
    acc = _tree_c(pv, R, C, D, LOG2_C)
    return m, l_sum, acc


@triton.jit
def _combine(M, L, A, m, l_sum, acc, FMA: tl.constexpr):
    """Fold one chunk's partial into the running (M, L, A); products rounded before the adds."""
    m_new = tl.maximum(M, m) + 0.0
    # a = exp_c(M - m_new) (exp_c(-86) when M = -inf, against L = A = 0), b = exp_c(m - m_new): one
    # elementwise exp over both (joined on a trailing axis of 2, split after)
    a, b = tl.split(_exp_neg(tl.join(M - m_new, m - m_new), FMA))
    L = L * a + l_sum * b
    A = A * a[:, None] + acc * b[:, None]
    return m_new, L, A


@triton.jit
def _store_rows(ptrs, o, mask, OUT_BF16_INTERP: tl.constexpr):
    """Round fp32 ``o`` once to the output dtype (nearest even) and store."""
    if OUT_BF16_INTERP:
        # The interpreter's fp32 -> bf16 cast does not round to nearest even: do it on the bits.
        bits = o.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # RNE on the magnitude; carries into the exponent
        r = tl.where(o != o, 0x7FC0, r)  # NaN stays NaN
        tl.store(ptrs, r.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, o.to(ptrs.dtype.element_ty), mask=mask)  # cvt.rn (identity for fp32)


@triton.jit
def _load_chunk(
    R2T, pool, stride_r, j, lim, K, V, sk_t, sk_h, sv_t, sv_h, kvh, C: tl.constexpr, D: tl.constexpr
):
    """K and V of chunk j (positions jC ..) as fp32 [C, D]; lanes at positions >= lim read 0."""
    pos = j * C + tl.arange(0, C)
    inb = pos < lim
    slot = tl.load(R2T + pool * stride_r + pos, mask=inb, other=0).to(tl.int64)
    offs_d = tl.arange(0, D)
    k = tl.load(K + slot[:, None] * sk_t + kvh * sk_h + offs_d[None, :], mask=inb[:, None], other=0.0)
    v = tl.load(V + slot[:, None] * sv_t + kvh * sv_h + offs_d[None, :], mask=inb[:, None], other=0.0)
    return k.to(tl.float32), v.to(tl.float32), inb  # exact upcasts


@triton.jit
def _combine_step(MID, MM, ML, base, hmask, M, L, A, D: tl.constexpr, FMA: tl.constexpr):
    """Decode stage 2: load one chunk's partial (written by stage 1) and fold it in."""
    offs_d = tl.arange(0, D)
    m = tl.load(MM + base, mask=hmask, other=0.0)
    l_sum = tl.load(ML + base, mask=hmask, other=1.0)
    acc = tl.load(MID + (base * D)[:, None] + offs_d[None, :], mask=hmask[:, None], other=0.0)
    return _combine(M, L, A, m, l_sum, acc, FMA)


@triton.jit
def _extend_step(
    q, R2T, pool, stride_r, j, p, K, V, sk_t, sk_h, sv_t, sv_h, kvh, scale, M, L, A,
    HB: tl.constexpr, C: tl.constexpr, D: tl.constexpr, LOG2_C: tl.constexpr, LOG2_D: tl.constexpr,
    FMA: tl.constexpr,
):  # fmt: skip
    """Extend: chunk j's partial of the row at position p (the same functions as decode's stage 1),
    folded in at once (the same function as decode's stage 2)."""
    k, v, inb = _load_chunk(R2T, pool, stride_r, j, p + 1, K, V, sk_t, sk_h, sv_t, sv_h, kvh, C, D)
    m, l_sum, acc = _chunk_partial(q, k, v, inb[None, :], scale, HB, C, D, LOG2_C, LOG2_D, FMA)
    return _combine(M, L, A, m, l_sum, acc, FMA)


# ====================================================================================================
# Triton: kernels
# ====================================================================================================
@triton.jit
def _decode_partials_kernel(
    Q, sq_b, sq_h,
    K, sk_t, sk_h, V, sv_t, sv_h,
    R2T, stride_r, POOL, SEQ,
    MID, MM, ML, sm_b, sm_h, sm_j,
    scale,
    G: tl.constexpr, HB: tl.constexpr, NSUB: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
    LOG2_C: tl.constexpr, LOG2_D: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    """Stage 1 of decode: one program per (chunk, kv head x head block, request)."""
    j = tl.program_id(0)
    kvh = tl.program_id(1) // NSUB
    sub = tl.program_id(1) % NSUB
    b = tl.program_id(2).to(tl.int64)
    seq = tl.load(SEQ + b)
    if j * C >= seq:  # past this request's last chunk (the grid covers the longest request)
        return
    g = sub * HB + tl.arange(0, HB)
    hmask = g < G
    h = kvh * G + g
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None], other=0.0)
    pool = tl.load(POOL + b).to(tl.int64)
    k, v, inb = _load_chunk(R2T, pool, stride_r, j, seq, K, V, sk_t, sk_h, sv_t, sv_h, kvh, C, D)
    m, l_sum, acc = _chunk_partial(q.to(tl.float32), k, v, inb[None, :], scale, HB, C, D, LOG2_C, LOG2_D, FMA)
    base = b * sm_b + h * sm_h + j * sm_j
    tl.store(MID + (base * D)[:, None] + offs_d[None, :], acc, mask=hmask[:, None])
    tl.store(MM + base, m, mask=hmask)
    tl.store(ML + base, l_sum, mask=hmask)


@triton.jit
def _decode_combine_kernel(
    MID, MM, ML, sm_b, sm_h, sm_j,
    SEQ, OUT, so_b, so_h,
    G: tl.constexpr, HB: tl.constexpr, NSUB: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
    FMA: tl.constexpr, OUT_BF16_INTERP: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """Stage 2 of decode: combine the chunk partials of a row in increasing chunk order."""
    kvh = tl.program_id(0) // NSUB
    sub = tl.program_id(0) % NSUB
    b = tl.program_id(1).to(tl.int64)
    g = sub * HB + tl.arange(0, HB)
    hmask = g < G
    h = kvh * G + g
    offs_d = tl.arange(0, D)
    seq = tl.load(SEQ + b)
    n_chunks = (seq + C - 1) // C
    M = tl.full([HB], float("-inf"), tl.float32)
    L = tl.zeros([HB], tl.float32)
    A = tl.zeros([HB, D], tl.float32)
    if INTERP:  # the interpreter cannot run range() to a loaded bound: the same steps in a while loop
        j = 0
        while j < n_chunks:
            M, L, A = _combine_step(MID, MM, ML, b * sm_b + h * sm_h + j * sm_j, hmask, M, L, A, D, FMA)
            j += 1
    else:
        for j in range(0, n_chunks):
            M, L, A = _combine_step(MID, MM, ML, b * sm_b + h * sm_h + j * sm_j, hmask, M, L, A, D, FMA)
    o = tl.math.div_rn(A, L[:, None])  # IEEE division (Triton's "/" is div.full.f32, approximate)
    _store_rows(OUT + b * so_b + h[:, None] * so_h + offs_d[None, :], o, hmask[:, None], OUT_BF16_INTERP)


@triton.jit
def _extend_kernel(
    Q, sq_t, sq_h,
    K, sk_t, sk_h, V, sv_t, sv_h,
    R2T, stride_r, ROW_POOL, ROW_POS,
    OUT, so_t, so_h,
    scale,
    G: tl.constexpr, HB: tl.constexpr, NSUB: tl.constexpr, D: tl.constexpr, C: tl.constexpr,
    LOG2_C: tl.constexpr, LOG2_D: tl.constexpr, FMA: tl.constexpr, OUT_BF16_INTERP: tl.constexpr,
    INTERP: tl.constexpr,
):  # fmt: skip
    """Extend / full sequence: one program per (query row, kv head x head block); the row's chunks
    are computed and combined one after the other, exactly as decode's two stages do."""
    i = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1) // NSUB
    sub = tl.program_id(1) % NSUB
    g = sub * HB + tl.arange(0, HB)
    hmask = g < G
    h = kvh * G + g
    offs_d = tl.arange(0, D)
    pool = tl.load(ROW_POOL + i).to(tl.int64)
    p = tl.load(ROW_POS + i)
    q = tl.load(Q + i * sq_t + h[:, None] * sq_h + offs_d[None, :], mask=hmask[:, None], other=0.0)
    q = q.to(tl.float32)
    M = tl.full([HB], float("-inf"), tl.float32)
    L = tl.zeros([HB], tl.float32)
    A = tl.zeros([HB, D], tl.float32)
    if INTERP:
        j = 0
        while j <= p // C:
            M, L, A = _extend_step(q, R2T, pool, stride_r, j, p, K, V, sk_t, sk_h, sv_t, sv_h, kvh, scale,
                                   M, L, A, HB, C, D, LOG2_C, LOG2_D, FMA)  # fmt: skip
            j += 1
    else:
        for j in range(0, p // C + 1):
            M, L, A = _extend_step(q, R2T, pool, stride_r, j, p, K, V, sk_t, sk_h, sv_t, sv_h, kvh, scale,
                                   M, L, A, HB, C, D, LOG2_C, LOG2_D, FMA)  # fmt: skip
    o = tl.math.div_rn(A, L[:, None])
    _store_rows(OUT + i * so_t + h[:, None] * so_h + offs_d[None, :], o, hmask[:, None], OUT_BF16_INTERP)


# ====================================================================================================
# Launchers
# ====================================================================================================
def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or _interpreting()


def _log2(n: int, what: str) -> int:
    if n < 2 or n & (n - 1):
        raise NotImplementedError(f"{what} = {n}: the contract's trees need a power of two >= 2")
    return n.bit_length() - 1


def _check(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, chunk: int, kernel: bool = True
) -> tuple[int, int, int]:
    """(Hq, Hkv, D) after validating dtypes and shapes."""
    if q.dtype not in _SUPPORTED or k_buffer.dtype != q.dtype or v_buffer.dtype != q.dtype:
        raise NotImplementedError(
            f"paged attention: q {q.dtype}, k {k_buffer.dtype}, v {v_buffer.dtype} (one of {_SUPPORTED})"
        )
    if k_buffer.dim() != 3 or v_buffer.shape != k_buffer.shape:
        raise ValueError(
            f"k/v buffers must be [slots, Hkv, D]: {tuple(k_buffer.shape)}, {tuple(v_buffer.shape)}"
        )
    hq, d = q.shape[-2], q.shape[-1]
    hkv = k_buffer.shape[1]
    if k_buffer.shape[2] != d or hq % hkv:
        raise ValueError(f"{hq} query heads of dim {d} against {hkv} kv heads of dim {k_buffer.shape[2]}")
    _log2(d, "head_dim")
    _log2(chunk, "chunk")
    if kernel and q.dtype == torch.float16 and _interpreting():
        raise NotImplementedError("fp16 outputs need the GPU's cvt.rn (the interpreter rounds bf16 only)")
    return hq, hkv, d


def _inner_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _heads_per_program(group: int, heads_per_program: int | None) -> tuple[int, int]:
    """(HB, NSUB): query heads per program (a power of two) and programs per kv head."""
    hb = heads_per_program or DEFAULT_HEADS_PER_PROGRAM
    hb = min(triton.next_power_of_2(hb), triton.next_power_of_2(group))
    return hb, -(-group // hb)


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
    heads_per_program: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """The extend kernel on explicit rows: row i is query ``q[i]`` ([N, Hq, D]) at position
    ``row_pos[i]`` of the request whose KV slots are ``req_to_token[row_pool[i], :]``; it attends to
    positions ``0 .. row_pos[i]`` (their KV must already be in the buffers). Returns [N, Hq, D]."""
    hq, hkv, d = _check(q, k_buffer, v_buffer, chunk)
    n = q.shape[0]
    if out is None:
        out = _empty(q.shape, dtype=q.dtype, device=q.device)
    if not _use_triton(q):
        out.copy_(
            paged_attention_reference(
                q, k_buffer, v_buffer, req_to_token, row_pool, row_pos, scale, chunk=chunk
            )
        )
        return out
    if n == 0:
        return out
    q, out = _inner_unit(q), out
    if out.stride(-1) != 1:
        raise ValueError("out must have a unit last stride")
    req_to_token = _inner_unit(req_to_token)
    hb, nsub = _heads_per_program(hq // hkv, heads_per_program)
    _extend_kernel[(n, hkv * nsub)](
        q, q.stride(0), q.stride(1),
        k_buffer, k_buffer.stride(0), k_buffer.stride(1), v_buffer, v_buffer.stride(0), v_buffer.stride(1),
        req_to_token, req_to_token.stride(0), row_pool.contiguous(), row_pos.contiguous(),
        out, out.stride(0), out.stride(1),
        float(scale),
        G=hq // hkv, HB=hb, NSUB=nsub, D=d, C=chunk,
        LOG2_C=_log2(chunk, "chunk"), LOG2_D=_log2(d, "head_dim"),
        FMA=_fma_mode(CONTRACT_FMA), OUT_BF16_INTERP=_interpreting() and q.dtype == torch.bfloat16,
        INTERP=_interpreting(), num_warps=num_warps or EXTEND_NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def extend_rows(
    req_pool_indices: torch.Tensor,
    extend_prefix_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_pool, row_pos) of SGLang's extend batch: request b's new rows sit at positions
    ``prefix_b .. prefix_b + extend_b - 1``, packed request after request (``num_tokens`` rows; given
    so that no host sync is needed)."""
    dev = extend_seq_lens.device
    lens = extend_seq_lens.long()
    req = torch.repeat_interleave(torch.arange(lens.shape[0], device=dev), lens, output_size=num_tokens)
    start = torch.cumsum(lens, 0) - lens
    pos = extend_prefix_lens.long()[req] + torch.arange(num_tokens, device=dev) - start[req]
    return req_pool_indices.long()[req], pos


def paged_attention_extend(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    extend_prefix_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    scale: float,
    **kwargs,
) -> torch.Tensor:
    """SGLang's extend batch: ``q`` [T, Hq, D] packs each request's new rows after its cached prefix
    (the new rows' KV already written to the buffers). Returns [T, Hq, D]."""
    row_pool, row_pos = extend_rows(req_pool_indices, extend_prefix_lens, extend_seq_lens, q.shape[0])
    return paged_attention_rows(q, k_buffer, v_buffer, req_to_token, row_pool, row_pos, scale, **kwargs)


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
    max_chunks: int | None = None,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """One query row per request (``q`` [B, Hq, D]) at position ``seq_lens[b] - 1`` (its own KV already
    written). Split-KV: one program per chunk of ``chunk`` keys, then a combine in chunk order.
    ``max_chunks`` bounds ``ceil(max(seq_lens) / chunk)`` (computed with a host sync when None; give it
    from ``seq_lens_cpu``, or from the context length under CUDA-graph capture)."""
    hq, hkv, d = _check(q, k_buffer, v_buffer, chunk)
    bsz = q.shape[0]
    if out is None:
        out = _empty(q.shape, dtype=q.dtype, device=q.device)
    if not _use_triton(q):
        out.copy_(
            paged_attention_reference(
                q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens.long() - 1, scale, chunk=chunk
            )
        )
        return out
    if bsz == 0:
        return out
    if max_chunks is None:
        max_chunks = -(-int(seq_lens.max()) // chunk)
    q = _inner_unit(q)
    if out.stride(-1) != 1:
        raise ValueError("out must have a unit last stride")
    req_to_token = _inner_unit(req_to_token)
    mid = torch.empty((bsz, hq, max_chunks, d), dtype=torch.float32, device=q.device)
    mm = torch.empty((bsz, hq, max_chunks), dtype=torch.float32, device=q.device)
    ml = torch.empty_like(mm)
    hb, nsub = _heads_per_program(hq // hkv, heads_per_program)
    seq_lens = seq_lens.contiguous()
    common = dict(G=hq // hkv, HB=hb, NSUB=nsub, D=d, C=chunk, FMA=_fma_mode(CONTRACT_FMA))
    _decode_partials_kernel[(max_chunks, hkv * nsub, bsz)](
        q, q.stride(0), q.stride(1),
        k_buffer, k_buffer.stride(0), k_buffer.stride(1), v_buffer, v_buffer.stride(0), v_buffer.stride(1),
        req_to_token, req_to_token.stride(0), req_pool_indices.contiguous(), seq_lens,
        mid, mm, ml, mm.stride(0), mm.stride(1), mm.stride(2),
        float(scale),
        LOG2_C=_log2(chunk, "chunk"), LOG2_D=_log2(d, "head_dim"),
        num_warps=num_warps or DECODE_NUM_WARPS, enable_fp_fusion=False, **common,
    )  # fmt: skip
    _decode_combine_kernel[(hkv * nsub, bsz)](
        mid, mm, ml, mm.stride(0), mm.stride(1), mm.stride(2),
        seq_lens, out, out.stride(0), out.stride(1),
        OUT_BF16_INTERP=_interpreting() and q.dtype == torch.bfloat16, INTERP=_interpreting(),
        num_warps=4, enable_fp_fusion=False, **common,
    )  # fmt: skip
    return out


# ====================================================================================================
# Plain PyTorch: the contract, bit for bit (any device)
# ====================================================================================================
# Only single IEEE operations (each PyTorch op is its own kernel: nothing is contracted into an fma),
# exact max/where, the contract's exp_c (policy_loss, fma emulated exactly in fp64), IEEE division.


def _tree_t(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Pairwise tree over ``dim`` (a power of two): x'[i] = x[2i] + x[2i+1] until one is left."""
    x = x.movedim(dim, -1)
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def _exp_c(t: torch.Tensor) -> torch.Tensor:
    return _exp_neg_t(t, CONTRACT_FMA)


@torch.no_grad()
def paged_attention_reference(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    row_pool: torch.Tensor,
    row_pos: torch.Tensor,
    scale: float,
    *,
    chunk: int = CONTRACT_CHUNK,
    rows_per_step: int = 256,
) -> torch.Tensor:
    """The contract (module docstring) in plain PyTorch: rows as in :func:`paged_attention_rows`.
    Bitwise the kernels' output; materialises [rows, Hq, chunk, D] fp32 per step (for tests, CPU)."""
    hq, hkv, d = _check(q, k_buffer, v_buffer, chunk, kernel=False)
    group = hq // hkv
    n = q.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dev = q.device
    scale32 = torch.tensor(float(scale), dtype=torch.float32, device=dev)  # the kernel's fp32 scalar
    lanes = torch.arange(chunk, device=dev)
    width = req_to_token.shape[1]
    for a in range(0, n, rows_per_step):
        rows = slice(a, min(n, a + rows_per_step))
        qf = q[rows].float().view(-1, hkv, group, d)  # exact upcast
        pool = row_pool[rows].long().to(dev)
        pos = row_pos[rows].long().to(dev)
        nr = qf.shape[0]
        M = torch.full((nr, hkv, group), -math.inf, dtype=torch.float32, device=dev)
        L = torch.zeros((nr, hkv, group), dtype=torch.float32, device=dev)
        A = torch.zeros((nr, hkv, group, d), dtype=torch.float32, device=dev)
        n_chunks = pos // chunk + 1
        for j in range(int(n_chunks.max()) if nr else 0):
            act = torch.nonzero(n_chunks > j).squeeze(1)
            lane_pos = j * chunk + lanes
            valid = lane_pos[None, :] <= pos[act, None]  # [n, C]
            slots = req_to_token[pool[act][:, None], lane_pos.clamp(max=width - 1)[None, :]].long()
            k = k_buffer[slots].float().permute(0, 2, 1, 3)  # [n, Hkv, C, D]
            v = v_buffer[slots].float().permute(0, 2, 1, 3)
            vmask = valid[:, None, None, :]  # [n, 1, 1, C]
            prod = qf[act][:, :, :, None, :] * k[:, :, None, :, :]  # [n, Hkv, G, C, D]
            s = _tree_t(prod, -1) * scale32
            s = torch.where(vmask, s, -math.inf)
            m = s.amax(-1) + 0.0
            e = torch.where(vmask, _exp_c(s - m[..., None]), 0.0)
            l_sum = _tree_t(e, -1)
            pv = torch.where(vmask[..., None], e[..., None] * v[:, :, None, :, :], 0.0)
            acc = _tree_t(pv, -2)  # [n, Hkv, G, D]
            # combine, in chunk order
            Ma, La, Aa = M[act], L[act], A[act]
            m_new = torch.maximum(Ma, m) + 0.0
            fa = _exp_c(Ma - m_new)
            fb = _exp_c(m - m_new)
            L[act] = La * fa + l_sum * fb
            A[act] = Aa * fa[..., None] + acc * fb[..., None]
            M[act] = m_new
        o = A / L[..., None]  # IEEE division (tensor / tensor on every device)
        out[rows] = o.view(nr, hq, d).to(q.dtype)  # one rounding, nearest even
    return out


# ====================================================================================================
# The trainer's full sequence (HF AttentionInterface), with a backward
# ====================================================================================================
def _full_sequence_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """Whole sequences as a paged cache: slot b*S + s holds key s of sequence b; query row t of
    sequence b sits at position S - T + t (T = S for a full sequence)."""
    bsz, hq, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    dev = query.device
    q_rows = query.transpose(1, 2).reshape(bsz * t, hq, d)
    k_buf = key.transpose(1, 2).reshape(bsz * s, hkv, d)
    v_buf = value.transpose(1, 2).reshape(bsz * s, hkv, d)
    req_to_token = torch.arange(bsz * s, device=dev, dtype=torch.int32).view(bsz, s)
    row_pool = torch.arange(bsz, device=dev).repeat_interleave(t)
    row_pos = (torch.arange(t, device=dev) + (s - t)).repeat(bsz)
    return q_rows, k_buf, v_buf, req_to_token, row_pool, row_pos


def _attention_fp32(query, key, value, scale):
    """A differentiable causal attention in fp32 (the backward's recomputation); rows at S-T .. S-1."""
    group = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    scores = (query.float() @ k.transpose(-1, -2)) * scale
    t, s = query.shape[2], key.shape[2]
    causal = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(diagonal=s - t)
    scores = scores.masked_fill(~causal, -math.inf)
    return torch.softmax(scores, -1) @ v  # [B, Hq, T, D]


class _FullSequenceAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, scale, chunk):
        bsz, hq, t, d = query.shape
        rows = _full_sequence_rows(query, key, value)
        out = paged_attention_rows(*rows, scale, chunk=chunk)
        ctx.save_for_backward(query, key, value)
        ctx.scale = scale
        return out.view(bsz, t, hq, d)

    @staticmethod
    def backward(ctx, grad_out):
        # Gradients are not part of the contract: recompute through a standard differentiable path.
        query, key, value = ctx.saved_tensors
        with torch.enable_grad():
            qd, kd, vd = (x.detach().requires_grad_(True) for x in (query, key, value))
            y = _attention_fp32(qd, kd, vd, ctx.scale).transpose(1, 2)  # [B, T, Hq, D]
            gq, gk, gv = torch.autograd.grad(y, (qd, kd, vd), grad_out.float())
        return gq.to(query.dtype), gk.to(key.dtype), gv.to(value.dtype), None, None


def full_sequence_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, chunk: int = CONTRACT_CHUNK
) -> torch.Tensor:
    """Causal attention of whole sequences under the contract: query [B, Hq, T, D], key/value
    [B, Hkv, S, D] (S >= T: the query rows are the last T positions) -> [B, T, Hq, D] (HF's
    attention-output layout). Row t is bitwise the server's decode or extend row at position S - T + t.
    Differentiable: the backward recomputes the attention in fp32 autograd (gradients are not part of
    the contract)."""
    return _FullSequenceAttention.apply(query, key, value, float(scale), chunk)
