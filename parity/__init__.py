"""The trainer side of truepolicy's numerics contract (HF transformers)."""

from parity.logprobs import compute_logprobs, logprobs_matrix, token_logprobs
from parity.trainer import prepare_model

__all__ = ["compute_logprobs", "logprobs_matrix", "prepare_model", "token_logprobs"]
