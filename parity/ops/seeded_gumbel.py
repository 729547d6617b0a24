"""Seeded Gumbel-max sampling -- SGLang's ``multinomial_with_seed`` -- with every row split across
programs, the same token ids.

The problem
-----------
The server samples every request from its own seed (the ``per_request_seeds`` patch), so SGLang's
pytorch sampler draws through ``sglang.srt.layers.sampler.multinomial_with_seed``: for row ``r`` and
column ``c``, uniform noise ``u = murmur3_32(seed_r, position_r, c) / (2**32 - 1)`` in float64, Gumbel
noise ``g = -log(-max(log(u), -DBL_MAX))``, and the token ``argmax_c(float64(logprob[r, c]) + g)``.
SGLang compiles it (``torch.compile``) into one reduction kernel with one program per row: at one
request a single program streams all 151936 columns of a Qwen vocabulary through two float64 logs
each -- 155 us per decode step on an H200, 6 % of a Qwen3-0.6B decode step, where plain SGLang's
unseeded ``torch.multinomial`` costs a few microseconds.

The op
------
The same formula, elementwise, in chunks of ``CHUNK`` columns: program ``(r, j)`` hashes, draws and
perturbs chunk ``j`` of row ``r`` and keeps its maximum and the first column holding it; a second
kernel, one program per row, takes the maximum over the chunks and the first chunk holding it. A
maximum is exact (no rounding), so splitting the row changes nothing: the token is the row's first
maximal column, as ``torch.argmax`` returns it, NaN counted greater than every number (the first NaN
wins: ``-inf`` logprob plus ``+inf`` noise, at ``u == 1``). Each element's value is the formula's own,
operation for operation in float64 (IEEE division ``div_rn``; ``log`` is libdevice's, the function
torch's and Inductor's float64 ``log`` call on the GPU), so the ids are SGLang's.

Trade-off: a second launch and a ``[rows, chunks]`` float64 scratch (149 chunks per 151936-column row)
against a row-long serial loop; the float64 arithmetic is kept as SGLang wrote it (its note: float32
Gumbel noise is numerically unsafe), so the work per element is the same, spread over every SM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.ops.murmur import murmur_hash32_torch

CHUNK = 1024  # columns per program of the first kernel (a launch choice: the ids do not depend on it)
_DBL_MAX = torch.finfo(torch.float64).max
_UINT32_MAX = torch.iinfo(torch.uint32).max


def seeded_gumbel_argmax_reference(
    logprobs: torch.Tensor, seed: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """SGLang's ``multinomial_with_seed`` in plain PyTorch (its body without ``torch.compile``, the hash
    from :func:`murmur_hash32_torch`): int64 ``[rows, 1]``."""
    cols = torch.arange(logprobs.shape[1], device=logprobs.device)
    hashed = murmur_hash32_torch(seed, positions, cols)
    x = hashed.to(torch.float64) / _UINT32_MAX
    x.log_().clamp_(min=-_DBL_MAX).neg_()
    x.log_().neg_()
    x.add_(logprobs.to(torch.float64))
    return torch.argmax(x, dim=1, keepdim=True)


@triton.jit
def _rotl32(x, r: tl.constexpr):
    return (x << r) | (x >> (32 - r))  # uint32: the left shift drops the high bits


@triton.jit
def _murmur3_mix(h, k):
    """MurmurHash3's 32-bit block step; all uint32, products wrap modulo 2**32."""
    k = k * tl.full(k.shape, 0xCC9E2D51, tl.uint32)
    k = _rotl32(k, 15)
    k = k * tl.full(k.shape, 0x1B873593, tl.uint32)
    h = h ^ k
    h = _rotl32(h, 13)
    return h * tl.full(h.shape, 5, tl.uint32) + tl.full(h.shape, 0xE6546B64, tl.uint32)


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * tl.full(h.shape, 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full(h.shape, 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def _first_max(values, index, valid, BIG: tl.constexpr):
    """(the maximum of ``values`` where ``valid``, the first index holding it), NaN greater than every
    number; ``torch.argmax``'s order. All-invalid lanes never win (index BIG)."""
    is_nan = (values != values) & valid
    first_nan = tl.min(tl.where(is_nan, index, BIG), axis=0)
    numbers = tl.where(valid & ~is_nan, values, float("-inf"))
    top = tl.max(numbers, axis=0)
    first_top = tl.min(tl.where(valid & (numbers == top), index, BIG), axis=0)
    has_nan = first_nan < BIG
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, first_nan, first_top)


@triton.jit
def _chunk_max_kernel(
    LOGP, slp, SEED, POS, PART_V, PART_I, n_cols, n_chunks,
    CHUNK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = cols < n_cols
    seed = tl.load(SEED + row).to(tl.uint64, bitcast=True)
    # (seed low, seed high, position, column): 16 bytes, as SGLang's murmur_hash32_kernel hashes them
    h = tl.zeros([CHUNK], tl.uint32)
    h = _murmur3_mix(h, (seed & 0xFFFFFFFF).to(tl.uint32) + tl.zeros([CHUNK], tl.uint32))
    h = _murmur3_mix(h, (seed >> 32).to(tl.uint32) + tl.zeros([CHUNK], tl.uint32))
    h = _murmur3_mix(h, tl.load(POS + row).to(tl.uint32) + tl.zeros([CHUNK], tl.uint32))
    h = _murmur3_mix(h, cols.to(tl.uint32))
    h = _fmix32(h ^ 16)
    # u in [0, 1]: the uint32 is exact in float64; one correctly rounded division (div.rn.f64)
    u = h.to(tl.float64) / 4294967295.0
    e = -tl.maximum(tl.log(u), -1.7976931348623157e308)  # -log(u) >= 0 (log 0 = -inf -> DBL_MAX)
    gumbel = -tl.log(e)  # e = -0.0 at u = 1: +inf
    lp = tl.load(LOGP + row * slp + cols, mask=valid, other=0.0).to(tl.float64)  # widening: exact
    v, i = _first_max(lp + gumbel, cols, valid, 2147483647)
    tl.store(PART_V + row * n_chunks + chunk, v)
    tl.store(PART_I + row * n_chunks + chunk, i)


@triton.jit
def _row_max_kernel(PART_V, PART_I, OUT, n_chunks, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_C)
    valid = j < n_chunks
    v = tl.load(PART_V + row * n_chunks + j, mask=valid, other=float("-inf"))
    i = tl.load(PART_I + row * n_chunks + j, mask=valid, other=0)
    # chunks in column order: the first maximal chunk holds the row's first maximal column
    _, first = _first_max(v, j, valid, 2147483647)
    tl.store(OUT + row, tl.sum(tl.where(j == first, i, 0), axis=0).to(tl.int64))


_empty = torch.empty  # tests poison outputs through this


def seeded_gumbel_argmax(logprobs: torch.Tensor, seed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """SGLang's ``multinomial_with_seed(logprobs, seed, positions)``: int64 ``[rows, 1]`` token ids.

    ``logprobs``: ``[rows, V]`` floating point (unit stride along V); ``seed``: int64 ``[rows]`` (bits
    of a uint64, as SGLang's ``seed.to(torch.uint64)`` keeps them); ``positions``: integer ``[rows]``."""
    if logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise TypeError(f"seeded_gumbel_argmax: logprobs must be a 2-D float tensor, got {logprobs.dtype} "
                        f"{tuple(logprobs.shape)}")  # fmt: skip
    rows, n_cols = logprobs.shape
    if seed.shape != (rows,) or positions.shape != (rows,):
        raise ValueError(f"seeded_gumbel_argmax: seed and positions must be [{rows}], got "
                         f"{tuple(seed.shape)} and {tuple(positions.shape)}")  # fmt: skip
    if seed.dtype != torch.int64 or positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seeded_gumbel_argmax: int64 seeds and int32/int64 positions, got {seed.dtype} "
                        f"and {positions.dtype}")  # fmt: skip
    if n_cols == 0:
        raise ValueError("seeded_gumbel_argmax: no columns to sample from")
    if not (seed.device == positions.device == logprobs.device):
        raise ValueError("seeded_gumbel_argmax: logprobs, seed and positions on different devices")
    if logprobs.stride(1) != 1:
        logprobs = logprobs.contiguous()
    out = _empty((rows, 1), dtype=torch.int64, device=logprobs.device)
    if rows == 0:
        return out
    n_chunks = triton.cdiv(n_cols, CHUNK)
    part_v = _empty((rows, n_chunks), dtype=torch.float64, device=logprobs.device)
    part_i = _empty((rows, n_chunks), dtype=torch.int32, device=logprobs.device)
    _chunk_max_kernel[(rows, n_chunks)](
        logprobs, logprobs.stride(0), seed.contiguous(), positions.contiguous(), part_v, part_i,
        n_cols, n_chunks, CHUNK=CHUNK,
    )  # fmt: skip
    _row_max_kernel[(rows,)](part_v, part_i, out, n_chunks, BLOCK_C=triton.next_power_of_2(n_chunks))
    return out
