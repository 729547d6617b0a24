"""Small helpers shared by tests (no fixtures here)."""

from __future__ import annotations

import torch


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by full forward passes (no KV cache): the trainer's view."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :]


def describe_mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    diff = (got.double() - want.double()).abs()
    return f"max |Δ| = {diff.max().item():.3e}, differing elements: {int((diff > 0).sum())} of {diff.numel()}"
