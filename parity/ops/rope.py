"""HF's rotary embedding (neox style, full rotary) in one Triton kernel, bitwise HF's op-by-op result.

The problem
-----------
HF (the trainer) applies RoPE as a chain of tensor ops: ``freqs = inv_freq x positions`` in fp32,
``cos``/``sin`` of ``cat(freqs, freqs)`` cast to the activations' dtype, then ``x * cos +
rotate_half(x) * sin`` in that dtype, every product and the sum rounded. sgl_kernel's fused RoPE
rotates in fp32 and rounds once: other bits. The server's ``rope_cuda`` patch first ran HF's chain
op for op: ~17 small kernels per layer. In a decode step at small batch those kernels cost their
launch latency, not their bytes: with CUDA graphs on an H200, Qwen3-0.6B's shapes (28 layers) decoded
one request at 3.3 ms per step with the plugin against 2.0 ms without it
(``benchmarks/bench_server_throughput.py``). By kernel count (not a profile), RoPE's were most of
the ~20 kernels per layer the plugin adds over SGLang's fused ones (SiLU-and-mul added one and the
q/k norms three, until ``parity.ops.silu_and_mul`` and ``parity.ops.qk_norm`` made each one kernel).

The op
------
1. :func:`cos_sin_table`: cos and sin at every position below ``max_positions`` by HF's own ops (the
   fp32 product ``position * inv_freq``, torch's ``cos``/``sin`` on the same device, the cast), built
   once per (module, device, dtype). Elementwise ops do not depend on the tensor's shape, so row
   ``p`` is bitwise what HF computes for position ``p``. Only the first half of the columns is kept:
   HF's cos of ``cat(freqs, freqs)`` repeats it.
2. :func:`apply_rope`: one kernel for q and k. A program takes one token and q or k (all its heads):
   it gathers its position's table row and computes, for each pair ``(x1, x2)`` of halves,
   ``out1 = r(r(x1 c) + r(-x2 s))`` and ``out2 = r(r(x2 c) + r(x1 s))``, ``r`` the rounding to the
   activations' dtype (nearest even). The product of two bf16 or fp16 values is exact in fp32, so
   ``r`` of the fp32 product is PyTorch's rounded product; the fp32 sum of two such values rounded by
   ``r`` is PyTorch's sum. Negation is exact. Fusion is off: no fma. :func:`rope_reference` is the
   same in plain PyTorch (HF's formula on the table's cos/sin).

Trade-off: the table holds ``max_positions x head_dim`` values of the activations' dtype (cos and
sin halves): 10 MB at 40960 x 128 in bf16, per rotary module (SGLang shares one across layers). The
cos/sin stay torch's own (no Triton ``cos`` whose last bits would need proving against CUDA's).

Under ``TRITON_INTERPRET=1`` (CPU tests) Triton's fp32 -> bf16 conversion truncates, so the kernel
rounds bf16 with integer operations there (:func:`_rounded`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.ops.policy_loss import _interpreting
from parity.ops.rms_norm_pairwise import to_bf16

_SUPPORTED = (torch.bfloat16, torch.float16)

_empty = torch.empty  # the tests swap in a NaN-poisoning allocator


# --------------------------------------------------------------------------------------------------
# The table and the plain-PyTorch reference
# --------------------------------------------------------------------------------------------------
def hf_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """HF's default ``inv_freq`` as HF computes it (fp32, on the CPU, at model init)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    return 1.0 / (float(base) ** exponent)


def cos_sin_table(
    inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` [max_positions, head_dim / 2] in ``dtype``: HF's values at every position, by
    HF's ops on ``device`` (``freqs = float(position) * inv_freq``, one rounding; ``cos``/``sin`` in
    fp32; the cast)."""
    positions = torch.arange(max_positions, dtype=torch.int64, device=device)
    freqs = positions.to(torch.float)[:, None] * inv_freq.to(device)[None, :]
    return freqs.cos().to(dtype).contiguous(), freqs.sin().to(dtype).contiguous()


def rope_reference(
    positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` in ``x``'s dtype for ``x`` [tokens, heads * head_dim]
    at ``positions`` [tokens], cos/sin from :func:`cos_sin_table`."""
    c = torch.cat((cos[positions], cos[positions]), dim=-1)[:, None, :]
    s = torch.cat((sin[positions], sin[positions]), dim=-1)[:, None, :]
    h = x.reshape(positions.shape[0], x.shape[-1] // head_dim, head_dim)
    x1, x2 = h[..., : head_dim // 2], h[..., head_dim // 2 :]
    return ((h * c) + (torch.cat((-x2, x1), dim=-1) * s)).reshape(x.shape)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
@triton.jit
def _rounded(x, DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` (nearest even), returned as fp32 (exact). On the GPU the
    conversion (cvt.rn); under the interpreter bf16 by the norm kernel's integer rounding (its
    conversion truncates)."""
    if DTYPE.is_bf16():
        return to_bf16(x, INTERP).to(tl.float32)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rotate(X, sx, OUT, H, t, c, s, offs_h, offs_d, HALF: tl.constexpr, INTERP: tl.constexpr):
    """Token t's H heads of X (row stride ``sx``, heads contiguous) rotated into OUT (contiguous)."""
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < HALF)
    src = X + t * sx + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dtype: tl.constexpr = x1.dtype
    a1 = x1.to(tl.float32)  # exact upcasts
    a2 = x2.to(tl.float32)
    # HF: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
    o1 = _rounded(_rounded(a1 * c, dtype, INTERP) + _rounded(-a2 * s, dtype, INTERP), dtype, INTERP)
    o2 = _rounded(_rounded(a2 * c, dtype, INTERP) + _rounded(a1 * s, dtype, INTERP), dtype, INTERP)
    dst = OUT + t * H * (2 * HALF) + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(dst, o1.to(dtype), mask=mask)  # exact: o1 holds a value of the dtype
    tl.store(dst + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    POS, Q, sq, K, sk, COS, SIN, OQ, OK, HQ, HK,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """One program per (token, q or k): the token's position's cos/sin row, then all its heads."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HALF
    c = tl.load(COS + pos * HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + pos * HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    offs_h = tl.arange(0, BLOCK_H)
    if tl.program_id(1) == 0:
        _rotate(Q, sq, OQ, HQ, t, c, s, offs_h, offs_d, HALF, INTERP)
    else:
        _rotate(K, sk, OK, HK, t, c, s, offs_h, offs_d, HALF, INTERP)


def _heads(x: torch.Tensor, tokens: int, head_dim: int, name: str) -> tuple[int, int]:
    """(heads, row stride) of ``x`` [tokens, heads * head_dim] whose heads are contiguous in a row."""
    if x.dim() != 2 or x.shape[0] != tokens or x.shape[1] % head_dim:
        raise ValueError(f"apply_rope: {name} {tuple(x.shape)}, want [{tokens}, heads * {head_dim}]")
    if x.shape[1] and x.stride(1) != 1:
        raise ValueError(f"apply_rope: {name} must be contiguous within a row (stride {x.stride()})")
    return x.shape[1] // head_dim, x.stride(0)


def apply_rope(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's rotary embedding of ``query`` [tokens, Hq * D] and ``key`` [tokens, Hk * D] (bf16/fp16;
    rows may be strided views, heads contiguous) at ``positions`` [tokens] (each below the table's
    length: not checked on the device), with cos/sin [positions, D / 2] of :func:`cos_sin_table`.
    Returns new contiguous tensors, bitwise :func:`rope_reference` of each."""
    half = cos.shape[-1]
    head_dim = 2 * half
    tokens = positions.numel()
    if (
        query.dtype not in _SUPPORTED
        or key.dtype != query.dtype
        or (cos.dtype, sin.dtype) != (query.dtype,) * 2
    ):
        raise TypeError(
            f"apply_rope: query {query.dtype}, key {key.dtype}, cos {cos.dtype}, sin {sin.dtype}: one of "
            f"{_SUPPORTED} for all"
        )
    if cos.dim() != 2 or sin.shape != cos.shape or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError(
            f"apply_rope: cos {tuple(cos.shape)}, sin {tuple(sin.shape)}: contiguous [positions, D / 2]"
        )
    hq, sq = _heads(query, tokens, head_dim, "query")
    hk, sk = _heads(key, tokens, head_dim, "key")
    out_q = _empty(query.shape, dtype=query.dtype, device=query.device)
    out_k = _empty(key.shape, dtype=key.dtype, device=key.device)
    if tokens:
        _rope_kernel[(tokens, 2)](
            positions.contiguous(), query, sq, key, sk, cos, sin, out_q, out_k, hq, hk,
            HALF=half, BLOCK_D=triton.next_power_of_2(half), BLOCK_H=triton.next_power_of_2(max(hq, hk, 1)),
            INTERP=_interpreting(), enable_fp_fusion=False,
        )  # fmt: skip
    return out_q, out_k


__all__ = ["apply_rope", "cos_sin_table", "hf_inv_freq", "rope_reference"]
