"""SGLang's seeded-sampling hash (``sglang.srt.layers.utils.hash.murmur_hash32``) in plain PyTorch.

SGLang draws Gumbel noise for seeded sampling from MurmurHash3 (32-bit) of the 16 bytes
(seed_lo, seed_hi, position, token id), computed by a Triton kernel that needs a GPU driver. This
is the same function with int64 tensor arithmetic (every product is reduced to its low 32 bits,
which wrapping int64 multiplication preserves), used on CPU tensors only.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_C1, _C2 = 0xCC9E2D51, 0x1B873593


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _M32


def _mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = (k * _C1) & _M32
    k = _rotl32(k, 15)
    k = (k * _C2) & _M32
    h = h ^ k
    h = _rotl32(h, 13)
    return (h * 5 + 0xE6546B64) & _M32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def murmur_hash32_torch(
    seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor
) -> torch.Tensor:
    """uint32 [n, m]: hash of (seed[i], positions[i], col_indices[j]), as SGLang's Triton kernel."""
    if seed.shape != positions.shape or seed.dim() != 1 or col_indices.dim() != 1:
        raise ValueError(f"expected 1-D seed/positions of one shape and 1-D columns, got {seed.shape}, "
                         f"{positions.shape}, {col_indices.shape}")  # fmt: skip
    s = seed.to(torch.int64)
    lo, hi = (s & _M32)[:, None], ((s >> 32) & _M32)[:, None]
    pos = (positions.to(torch.int64) & _M32)[:, None]
    col = (col_indices.to(torch.int64) & _M32)[None, :]
    h = torch.zeros_like(lo)
    for k in (lo, hi, pos):
        h = _mix(h, k)
    h = _mix(h.expand(-1, col.shape[1]), col.expand(h.shape[0], -1))
    return _fmix(h ^ 16).to(torch.uint32)
