"""The trainer side of truepolicy's numerics contract (HF transformers)."""

from parity.logprobs import compute_logprobs, token_logprobs

__all__ = ["compute_logprobs", "token_logprobs"]
