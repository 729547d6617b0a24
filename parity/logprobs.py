"""Per-token log-probabilities as the trainer computes them: the reference every parity check uses.

The formula is the contract's logprob (``parity/ops/policy_loss.py``, module docstring): the logits
upcast to fp32 (exact), divided by the temperature rounded to fp32, then a log-softmax whose every
rounding is defined (fixed 2048-lane online sum, the contract's ``exp`` and ``log``). The server's
sampler patch, these trainer-side functions and the fused loss kernel all compute it, so the PPO
ratio at the rollout step is exactly 1.0. ``torch.log_softmax`` cannot be the contract: its CPU and
CUDA kernels reduce in different orders and differ in the last bits (see that docstring).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from parity.ops.policy_loss import _use_triton, fused_logprobs, logprobs_matrix_reference


def _per_temperature(
    fn: Callable[..., torch.Tensor],
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    *args: torch.Tensor,
) -> torch.Tensor:
    """``fn(rows, *args, t)`` per distinct temperature: the contract takes one fp32 scalar per call.

    ``temperature``: a float, or an fp32 tensor broadcastable to ``[..., 1]`` (one per row, like
    SGLang's ``sampling_info.temperatures``). Rows are independent, so grouping them changes no bit.
    """
    if not isinstance(temperature, torch.Tensor):
        return fn(logits, *args, float(temperature))
    lead = logits.shape[:-1]
    per_row = temperature.to(torch.float32).expand(*lead, 1).reshape(-1).cpu()
    rows = logits.reshape(-1, logits.shape[-1])
    flat_args = [a.reshape(-1, *a.shape[len(lead) :]) for a in args]
    out = None
    for t in torch.unique(per_row).tolist():
        idx = (per_row == t).nonzero()[:, 0].to(logits.device)
        part = fn(rows[idx], *[a[idx] for a in flat_args], t)
        if out is None:
            out = part.new_empty((rows.shape[0], *part.shape[1:]))
        out[idx] = part
    return out.view(*lead, *out.shape[1:])


def logprobs_matrix(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """The contract's fp32 logprob of every vocabulary entry under ``logits / temperature``."""
    return _per_temperature(logprobs_matrix_reference, logits, temperature)


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """The contract's fp32 logprob of ``token_ids[i]`` under row ``i`` of ``logits / temperature``.

    Bitwise ``logprobs_matrix(...).gather(token_ids)`` without the full matrix (Triton on CUDA).
    """
    return _per_temperature(fused_logprobs, logits, temperature, token_ids.long())


def sampled_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperatures: torch.Tensor
) -> torch.Tensor:
    """The server sampler's :func:`token_logprobs`: bitwise the same values, for ids it drew itself.

    ``temperatures``: fp32, one per row (SGLang's ``[B, 1]``). On CUDA one kernel launch that reads
    each row's temperature on the device: the host never waits for the GPU (a sampler that waits stalls
    SGLang's overlap of scheduling with the forward). An id outside ``[0, V)`` (a sampler bug) gives
    NaN, never a clamped value. Elsewhere the rows are grouped by temperature on the host.
    """
    ids = token_ids.long()
    if _use_triton(logits):
        per_row = temperatures.to(torch.float32).expand(*logits.shape[:-1], 1).reshape(-1)
        return fused_logprobs(logits, ids, per_row, check_ids=False)
    return _per_temperature(functools.partial(fused_logprobs, check_ids=False), logits, temperatures, ids)


@torch.no_grad()
def compute_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """fp32 logprobs of ``sequences[i][starts[i]:]`` given their prefixes, under an HF causal LM.

    Each sequence runs alone (batch of one, no padding), like a trainer forward over one sample.
    Returns one fp32 tensor of ``len(sequences[i]) - starts[i]`` values per sequence.
    """
    if len(sequences) != len(starts):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} start indices")
    device = next(model.parameters()).device
    out = []
    for seq, start in zip(sequences, starts, strict=True):
        if not 1 <= start <= len(seq):
            raise ValueError(f"start {start} out of range for a sequence of {len(seq)} tokens")
        ids = torch.tensor([list(seq)], dtype=torch.long, device=device)
        logits = model(input_ids=ids).logits[0]
        out.append(token_logprobs(logits[start - 1 : len(seq) - 1], ids[0, start:], temperature).cpu())
    return out
