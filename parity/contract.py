"""The numerics contract: one implementation of every op whose result must match bit for bit.

Both sides call these functions: the SGLang plugin (``server_patches.table``) from inside SGLang's
layers, and the trainer (``parity.trainer.prepare_model``) from inside HF transformers' modules.
One code path, not two that happen to agree.

Each op is written so that a token's result cannot depend on what else is computed with it
(batch composition, decode vs extend, chunked prefill, prefix-cache hits):

- Elementwise ops and per-row reductions over the last dimension (``mean``, ``softmax``,
  ``log_softmax``) compute each output from the same inputs in the same order whatever the number
  of rows. Transcendentals are the exception on CPU: PyTorch evaluates a contiguous tensor with a
  vectorized (SLEEF) loop and its last ``numel % (2 * vector width)`` elements with the scalar libm
  function, which may differ by an ulp; the same value can then round differently depending on its
  position in the tensor. ``silu_and_mul`` therefore evaluates SiLU in fixed-size, padded slices so
  that every element takes the vectorized path.
- bf16 ``F.linear`` on the CPU computes each output row independently of how many rows there are
  and each output column independently of how many columns (merged qkv / gate_up equal the split
  projections). That is a property of the BLAS, not of this code: tests/test_contract_ops.py
  checks it on every machine that runs the suite.
- Attention is computed one query row at a time, each row with tensors of the same shapes whether it
  comes from a decode step, an extend chunk or the trainer's full sequence (``attention``).

The contract (dtypes follow HF transformers' bf16 modules):
- RMSNorm: fp32 normalisation, cast to the input dtype, then multiply by the weight in that dtype;
  with a residual, the residual add happens first in the input dtype (bf16) and feeds both outputs.
- RoPE: inv_freq and cos/sin computed in fp32 exactly as HF does, stored once as a table indexed
  by position, cast to the activation dtype; rotation ``x * cos + rotate_half(x) * sin`` in bf16.
- MLP: ``silu(gate) * up`` in bf16; projections are plain bf16 ``F.linear``.
- Attention: fp32 scores ``sum(q * k) * scale``, causal, fp32 softmax, fp32 ``sum(p * v)``,
  rounded once to bf16.
- Logprobs: ``log_softmax(logits.float() / temperature)`` in fp32 (``parity.logprobs``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# SiLU slice length: a multiple of 64 elements (no scalar tail for any vector width up to 512 bit
# and 2x unrolling) and below PyTorch's parallel grain (32768), so no thread splits a slice.
SILU_SLICE = 16384


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``*RMSNorm``: normalise in fp32, cast back to ``x.dtype``, then scale by ``weight``."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's ``residual = residual + x; normed = norm(residual)``, the add in ``x.dtype``."""
    summed = residual + x
    return rms_norm(summed, weight, eps), summed


def rope_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """HF's default-RoPE inverse frequencies, fp32, on the CPU."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dtype=torch.float32) / rotary_dim
    return 1.0 / (base**exponent)


def rope_table(rotary_dim: int, base: float, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` of shape [max_position, rotary_dim // 2], row p for position p.

    ``freqs = p * inv_freq`` is one fp32 multiply per element, as in HF's outer product; cos/sin are
    evaluated once, here, for every position, so both sides index the very same values.
    """
    inv_freq = rope_inv_freq(rotary_dim, base)
    positions = torch.arange(max_position, dtype=torch.int64).to(torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation of ``x`` [..., rotary_dim] by per-token ``cos``/``sin`` [..., rotary_dim/2].

    ``cos``/``sin`` must already be broadcastable to ``x``'s halves and in ``x.dtype``. Equivalent to
    HF's ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`` element for element (negation is exact).
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu(x: torch.Tensor) -> torch.Tensor:
    """``F.silu`` evaluated so that every element takes the same (vectorized) code path."""
    flat = x.reshape(-1)
    n = flat.numel()
    padded = -(-n // 64) * 64
    if padded != n:
        flat = F.pad(flat, (0, padded - n))
    out = torch.cat([F.silu(chunk) for chunk in flat.split(SILU_SLICE)]) if padded else flat
    return out[:n].view(x.shape)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return silu(gate) * up


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_position: int, scale: float
) -> torch.Tensor:
    """Causal attention of query rows at positions ``first_position, first_position + 1, ...``.

    ``q``: [Hq, Lq, D]; ``k``, ``v``: [Hkv, Lk, D] holding positions ``0 .. Lk - 1`` (Hq a multiple of
    Hkv, grouped-query heads share ``Hq // Hkv`` consecutive query heads); row i attends to keys
    ``0 .. first_position + i``. Returns [Hq, Lq, D] in ``q.dtype``.

    Each row is computed alone, on tensors whose shapes depend only on its position: a decode step,
    an extend chunk after a cached prefix and the trainer's full sequence produce the same bits.
    """
    hq, lq, _ = q.shape
    hkv, lk, _ = k.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    if first_position + lq > lk:
        raise ValueError(f"rows up to position {first_position + lq - 1} but only {lk} keys")
    group = hq // hkv
    kf = k.to(torch.float32).repeat_interleave(group, dim=0)
    vf = v.to(torch.float32).repeat_interleave(group, dim=0)
    out = torch.empty_like(q)
    for i in range(lq):
        n = first_position + i + 1
        qi = q[:, i : i + 1, :].to(torch.float32)
        scores = (qi * kf[:, :n, :]).sum(-1) * scale  # [Hq, n]
        probs = torch.softmax(scores, dim=-1)
        out[:, i, :] = (probs[:, :, None] * vf[:, :n, :]).sum(1).to(q.dtype)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Projections and the lm_head: plain ``F.linear`` in the weight's dtype."""
    return F.linear(x, weight, bias)
