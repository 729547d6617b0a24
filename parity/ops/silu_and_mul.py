"""HF's SiLU-and-mul, ``act_fn(gate) * up``, as one kernel, bitwise HF's op-by-op result.

The problem
-----------
The gated MLP of Qwen2/Qwen3 (and Llama) computes ``F.silu(gate) * up`` in the activations' dtype:
two roundings (silu's result, then the product). sgl_kernel's fused ``silu_and_mul`` multiplies in
fp32 and rounds once: other bits. So the server's ``silu_and_mul_cuda`` patch ran HF's formula op by
op -- two kernels per layer (silu on the gate half, then the product), and the silu result's round
trip through memory.

The op
------
A 16-bit float has 65536 values, so ``F.silu`` of a bf16/fp16 gate is a function of its bit pattern:
:func:`silu_table` evaluates torch's own ``F.silu`` once on all 65536 patterns, on the device that will
use the table. An elementwise op does not depend on the tensor's shape or layout (every element runs
the same scalar formula), so ``table[bits(g)]`` is bitwise what ``F.silu`` returns for ``g`` anywhere on
that device -- whatever ``expf`` and division torch's kernel uses, nothing here re-derives it. The
kernel then forms ``float(silu) * float(up)``, exact in fp32 (two 8-bit -- or 11-bit -- significands
multiply into at most 22 bits), and rounds it once to nearest-even: what torch's 16-bit multiply does.

Trade-off: the table lookup is a gather from 128 KiB (cached in L1/L2 after the first touches) where
a computed silu would be arithmetic; in exchange the bits are torch's by construction on any device,
including the CPU under the Triton interpreter, and one kernel replaces two (at decode, where a step
is a chain of small kernels, the count is the time; at prefill the silu tensor's write and read are
saved). fp32 activations have no table: the patch keeps HF's formula op by op for them.

Under ``TRITON_INTERPRET=1`` Triton's bf16 conversions are not IEEE's (fp32 -> bf16 truncates, and
bf16 subnormals are lost both ways), so the kernel converts bf16 by bit operations: to fp32 by a shift
(on the GPU too: it is exact), back by ``rms_norm_pairwise.to_bf16``'s integer round-to-nearest-even
(interpreter only; the GPU uses ``cvt.rn``); numpy's fp16 conversions are IEEE's already.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from parity.ops.batch_invariant_matmul import _interpreting
from parity.ops.rms_norm_pairwise import to_bf16

TABLE_DTYPES = (torch.bfloat16, torch.float16)
BLOCK = 1024  # columns per program (any width: a launch choice, not part of the bits)
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def silu_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``F.silu`` of every 16-bit pattern of ``dtype`` (index = the pattern as an unsigned integer),
    evaluated by torch on ``device``: [65536] of ``dtype``."""
    if dtype not in TABLE_DTYPES:
        raise TypeError(f"silu_table: bf16 or fp16, got {dtype}")
    patterns = torch.arange(65536, dtype=torch.int32, device=device).to(torch.int16)  # 32768.. wrap: bits
    return F.silu(patterns.view(dtype))


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """HF's formula on ``x = [gate | up]`` (last dim 2d): ``F.silu(gate) * up`` in x's dtype."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@triton.jit
def _to_f32(bits, DTYPE: tl.constexpr):
    """16-bit patterns (int16) of DTYPE -> their fp32 values, exactly. bf16 is the top half of an fp32,
    so a shift is the conversion (and the only one Triton's interpreter gets right for bf16
    subnormals)."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (a constexpr comparison inside Triton)
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)  # the sign-extended half drops out
    else:
        return bits.to(DTYPE, bitcast=True).to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(
    XB, sx,  # int16 bits of x = [gate | up], [rows, 2 D] (row stride sx, unit column stride)
    TABLE,  # int16 bits of silu_table, [65536]
    OUT,  # [rows, D] contiguous, of DTYPE
    D,
    DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, EXACT_RNE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride may exceed 2**31
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    gate = tl.load(XB + row * sx + cols, mask=mask, other=0)
    up = tl.load(XB + row * sx + D + cols, mask=mask, other=0)
    index = gate.to(tl.int32) & 0xFFFF  # the pattern as an unsigned index (sign-extended, then masked)
    act = tl.load(TABLE + index, mask=mask, other=0)  # F.silu(gate): torch's bits
    product = _to_f32(act, DTYPE) * _to_f32(up, DTYPE)  # exact in fp32, then one rounding
    if DTYPE == tl.bfloat16:  # noqa: SIM300
        out = to_bf16(product, EXACT_RNE)
    else:
        out = product.to(DTYPE)
    tl.store(OUT + row * D + cols, out, mask=mask)


_empty = torch.empty  # the tests swap in a NaN-poisoning allocator


def silu_and_mul(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The kernel: ``F.silu(gate) * up`` for ``x = [..., 2 d]`` (bf16 or fp16, unit column stride; rows
    may be strided) with ``table = silu_table(x.dtype, x.device)``; a new contiguous ``[..., d]``,
    bitwise :func:`silu_and_mul_reference` on the table's device."""
    if x.dtype not in TABLE_DTYPES or table.dtype != x.dtype or table.shape != (65536,):
        raise TypeError(f"silu_and_mul: x bf16/fp16 and its [65536] table, got {x.dtype}, {table.dtype}")
    if x.shape[-1] % 2 or x.device != table.device:
        raise ValueError(f"silu_and_mul: x's last dim must be even and on the table's device, got {x.shape}")
    d = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])  # a view for [tokens, 2 d] (a copy only for other layouts)
    if rows.shape[-1] and rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = _empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if rows.shape[0] and d:
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, BLOCK))](
            rows.view(torch.int16), rows.stride(0), table.view(torch.int16), out, d,
            DTYPE=_TL_DTYPES[x.dtype], BLOCK_D=BLOCK, EXACT_RNE=_interpreting(), num_warps=4,
        )  # fmt: skip
    return out
