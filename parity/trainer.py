"""Prepare an HF transformers causal LM to compute under truepolicy's numerics contract.

``prepare_model(model)`` routes the model's ops through ``parity.contract`` — the same functions the
SGLang plugin calls inside the server — so the trainer's forward and the server's rollouts compute
every token the same way:

- attention: registered as ``"truepolicy"`` through transformers' ``AttentionInterface`` (and its
  mask through ``AttentionMaskInterface``) and selected with ``set_attn_implementation``;
- ``*RMSNorm`` modules: ``contract.rms_norm``;
- ``*RotaryEmbedding`` (default RoPE only): cos/sin rows of ``contract.rope_table``; the modeling
  module's ``apply_rotary_pos_emb`` becomes ``contract.apply_rope``;
- ``*MLP`` (SiLU-gated): ``down_proj(contract.silu_and_mul(gate_proj(x), up_proj(x)))``.

Anything the contract does not cover (another RoPE type, another activation, padded batches)
raises instead of silently computing something else.
"""

from __future__ import annotations

import sys
import types

import torch

from parity import contract

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


def _mlp_forward(self, x):
    return self.down_proj(contract.silu_and_mul(self.gate_proj(x), self.up_proj(x)))


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.rope_theta)


def _make_rope_forward(cos_table: torch.Tensor, sin_table: torch.Tensor):
    def forward(self, x, position_ids):
        pos = position_ids.to("cpu")
        cos = cos_table[pos].to(device=x.device, dtype=x.dtype)
        sin = sin_table[pos].to(device=x.device, dtype=x.dtype)
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    return forward


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Drop-in for HF's ``apply_rotary_pos_emb`` that calls ``contract.apply_rope``."""
    half = cos.shape[-1] // 2
    c = cos[..., :half].unsqueeze(unsqueeze_dim)
    s = sin[..., :half].unsqueeze(unsqueeze_dim)
    return contract.apply_rope(q, c, s), contract.apply_rope(k, c, s)


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Route ``model``'s numerics through ``parity.contract`` (in place); return the model."""
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"activation {config.hidden_act!r} is not in the contract")
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif name.endswith("MLP") and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_mlp_forward, module)
        elif name.endswith("RotaryEmbedding"):
            if getattr(module, "rope_type", "default") != "default":
                raise UnsupportedModelError(f"RoPE type {module.rope_type!r} is not in the contract")
            rotary_dim = module.inv_freq.shape[0] * 2
            cos, sin = contract.rope_table(rotary_dim, _rope_theta(config), config.max_position_embeddings)
            module.forward = types.MethodType(_make_rope_forward(cos, sin), module)
            modeling = sys.modules[type(module).__module__]
            modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
    return model
