"""Prepare an HF transformers causal LM to compute under truepolicy's numerics contract.

``prepare_model(model)`` routes the model's ops through ``parity.contract`` — the same functions the
SGLang plugin calls inside the server — so the trainer's forward and the server's rollouts compute
every token the same way:

- attention: registered as ``"truepolicy"`` through transformers' ``AttentionInterface`` (and its
  mask through ``AttentionMaskInterface``) and selected with ``set_attn_implementation``;
- ``*RMSNorm`` modules: ``contract.rms_norm``.

RoPE, the SiLU-gated MLP, embeddings and the bf16 projections (merged or split) need no change:
HF and SGLang compute them bit for bit alike (tests/test_contract_ops.py). Padded batches and
dropout are outside the contract and raise instead of silently computing something else.
"""

from __future__ import annotations

import types

import torch

from parity import contract
from parity.ops import DEFAULT_GPU_ATTENTION

ATTENTION_NAME = "truepolicy"


class UnsupportedModelError(ValueError):
    pass


def _check_causal_mask(mask: torch.Tensor | None, q_len: int, k_len: int) -> None:
    if mask is None:
        return
    rows = torch.arange(k_len - q_len, k_len)[:, None]
    allowed = torch.arange(k_len)[None, :] <= rows
    m = mask.to("cpu")
    got = m if m.dtype == torch.bool else m == 0
    if not bool((got == allowed).all()):
        raise UnsupportedModelError(
            "truepolicy attention computes unpadded causal attention only; run sequences unpadded"
        )


def truepolicy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers ``AttentionInterface`` entry: query [B, Hq, T, D], key/value [B, Hkv, S, D]."""
    if dropout:
        raise UnsupportedModelError("truepolicy attention has no dropout")
    if not getattr(module, "is_causal", True):
        raise UnsupportedModelError("truepolicy attention is causal only")
    q_len, k_len = query.shape[2], key.shape[2]
    _check_causal_mask(attention_mask, q_len, k_len)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.stack(
        [contract.attention(query[b], key[b], value[b], k_len - q_len, scale) for b in range(query.shape[0])]
    )
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, truepolicy_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _rms_norm_forward(self, hidden_states):
    return contract.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def prepare_model(
    model: torch.nn.Module,
    tp_size: int = 1,
    server_device: str = "cpu",
    gpu_attention: str = DEFAULT_GPU_ATTENTION,
) -> torch.nn.Module:
    """Route ``model``'s numerics through ``parity.contract`` (in place); return the model.

    ``server_device``: where the SGLang server runs. ``"cpu"``: the CPU contract (this module).
    ``"cuda"``: the GPU contract (``parity.gpu_contract``: the paged-attention and batch-invariant
    matmul kernels the server's GPU patches run); the two contracts give different bits.
    ``gpu_attention`` ("mma", the default, or "exact"): the GPU attention kernel family, as the
    server's ``truepolicy server --gpu-attention`` (different bits: they must match).

    ``tp_size`` > 1: the server runs tensor-parallel; the trainer then computes the row-parallel
    projections as that many partial sums reduced in rank order (``parity.tp``), as the server does.
    Qwen3-MoE sparse blocks compute the MoE contract (``parity.moe``); other MoE models and the router
    auxiliary loss are refused before anything is changed.
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if server_device == "cuda":
        from parity import gpu_contract

        return gpu_contract.prepare_model(model, tp_size=tp_size, attention=gpu_attention)
    if server_device != "cpu":
        raise ValueError(f"server_device must be 'cpu' or 'cuda', got {server_device!r}")
    from parity.moe import prepare_moe_blocks

    prepare_moe_blocks(model)
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_forward, module)
    if tp_size > 1:
        from parity.tp import emulate_tensor_parallel

        emulate_tensor_parallel(model, tp_size)
    return model
