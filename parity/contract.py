"""The numerics contract: one implementation of every op where SGLang and the trainer diverge.

Both sides call these functions: the SGLang plugin (``server_patches.table``) from inside SGLang's
layers, and the trainer (``parity.trainer.prepare_model``) from inside HF transformers' modules.
One code path, not two that happen to agree. docs/parity.md lists every source of divergence, the
op here that removes it, and the ops that need nothing because both engines already compute the
same bits (shown by tests/test_contract_ops.py on the machine that runs the suite).

Each op is written so that a token's result cannot depend on what else is computed with it (batch
composition, decode vs extend, chunked prefill, prefix-cache hits):

- RMSNorm (HF's order): normalise in fp32, cast to the input dtype, then multiply by the weight in
  that dtype; with a residual, the residual add happens first in the input dtype (bf16) and the
  rounded sum feeds both outputs. A per-row reduction over the last dimension: row-invariant.
- Attention: fp32 scores ``sum(q * k) * scale``, causal, fp32 softmax, fp32 ``sum(p * v)``, rounded
  once to bf16 -- computed one query row at a time, each row on tensors whose shapes depend only on
  its position, so a decode step, an extend chunk after a cached prefix and the trainer's full
  sequence produce the same bits.
- Logprobs: ``log_softmax(logits.float() / temperature)`` in fp32 (``parity.logprobs``).
"""

from __future__ import annotations

import torch


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
