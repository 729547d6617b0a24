"""Per-token log-probabilities as the trainer computes them: the reference every parity check uses.

The formula (the contract's last step, shared with the server's sampler patch):
``log_softmax(logits.float() / temperature)`` in fp32 over the full vocabulary, gathered at the
token ids. Logits come out of the lm_head in the model dtype (bf16); the upcast to fp32 is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def logprobs_matrix(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """fp32 ``log_softmax(logits.float() / temperature)`` over the last (vocabulary) dimension.

    ``temperature``: a float or an fp32 tensor broadcastable to ``[..., 1]``. A float is rounded to
    fp32 first, like SGLang's per-request fp32 temperatures, so the division happens in fp32.
    """
    if not isinstance(temperature, torch.Tensor):
        temperature = torch.tensor(temperature, dtype=torch.float32)
    return torch.log_softmax(logits.float() / temperature.to(logits.device), dim=-1)


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """fp32 logprob of ``token_ids[i]`` under row ``i`` of ``logits`` scaled by ``1/temperature``."""
    return logprobs_matrix(logits, temperature).gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


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
