"""The trainer side of the GPU contract: an HF transformers model computing what the patched SGLang
triton backend computes (``server_patches.gpu_patches``), bit for bit.

On a GPU the server's attention is ``parity.ops.paged_attention_mma`` (fixed-size KV chunks on tensor
cores; ``--gpu-attention exact``: ``parity.ops.paged_attention``) and its projections and lm_head are
``parity.ops.batch_invariant_matmul``. ``prepare_model(model, device="cuda")`` makes the trainer use
the same kernels:

- attention: registered as ``"truepolicy_paged_mma"`` (or ``"truepolicy_paged"``) through
  transformers' ``AttentionInterface``: every sequence of the batch is laid out as a paged cache and
  its rows go through the extend kernel -- the kernel the server runs for prefill, whose rows are
  bitwise its decode rows (a one-row step over HF's KV cache, without autograd, runs the server's
  split-KV decode kernel instead: the same bits). Differentiable (the backward recomputes in fp32;
  gradients are not part of the contract).
- every ``nn.Linear`` (q/k/v/o, gate/up/down, lm_head): :func:`batch_invariant_linear`, whose rows do
  not depend on how many tokens the trainer runs at once (the server runs 1..N).
- ``*RMSNorm`` (also Qwen3's q/k norms): ``parity.ops.rms_norm_pairwise.rms_norm`` -- HF's casts with
  the variance summed by a fixed pairwise tree, the norm of the server's ``rmsnorm_cuda`` patch and of
  the fused TP all-reduce + RMSNorm kernel (the Triton kernel on CUDA, its plain-PyTorch reference on
  the CPU: the same bits). Differentiable.
- Qwen3-MoE sparse blocks (checked and refused as on the CPU by ``parity.moe.prepare_moe_blocks``):
  :func:`qwen3_moe_block_forward_cuda`, the MoE contract with the router matmul and every expert
  projection through the batch-invariant kernel (``parity.ops.moe_experts``), what the server's
  ``linear_batch_invariant``, ``moe_topk_cuda`` and ``moe_experts_cuda`` patches compute.
  Differentiable (F.linear's backward for the kernel's matmuls).

``device="cpu"`` selects the same attention (the plain-PyTorch reference: the same bits as the
kernel) and leaves the linear layers to ``F.linear`` (row-invariant in bf16 on the CPU): a way to run
the GPU contract's attention without a GPU. The CPU *server* (torch_native backend) computes the CPU
contract (``parity.contract.attention``), not this one: pair ``device`` with the server's device.

``parity.prepare_model(model, server_device="cuda")`` calls :func:`prepare_model`. ``tp_size > 1``: the
row-parallel layers (``o_proj``, ``down_proj``) compute as on a TP server (``parity.tp``): each rank's
partial product over its contiguous K shard by the batch-invariant kernel (the server's patched
linear on that shard), summed in fp32 in rank order and rounded once -- for two ranks exactly what
NCCL's (or SGLang's custom) bf16 all-reduce of two partials computes (measured on 2x H200,
issue 11). Three or more ranks need the server to all-reduce in rank order too (not patched on GPU).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from parity import moe, trainer
from parity.ops import DEFAULT_GPU_ATTENTION, gpu_attention_kernels, moe_experts, rms_norm_pairwise
from parity.ops.batch_invariant_matmul import batch_invariant_linear
from parity.ops.paged_attention import _full_sequence_rows
from parity.tp import emulate_tensor_parallel

# transformers' names for the attention kernel families (parity.ops.gpu_attention_kernels: the modules
# the server's hooks run too).
ATTENTION_NAMES = {"exact": "truepolicy_paged", "mma": "truepolicy_paged_mma"}


def _attention_interface(kernels):
    """A transformers ``AttentionInterface`` entry running the ``kernels`` family."""

    def interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """query [B, Hq, T, D], key/value [B, Hkv, S, D] (S >= T, the query rows being the last T
        positions); returns ([B, T, Hq, D], None)."""
        if dropout:
            raise trainer.UnsupportedModelError("truepolicy attention has no dropout")
        if not getattr(module, "is_causal", True):
            raise trainer.UnsupportedModelError("truepolicy attention is causal only")
        q_len, k_len = query.shape[2], key.shape[2]
        trainer._check_causal_mask(attention_mask, q_len, k_len)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if q_len == 1 and not torch.is_grad_enabled():
            # a decode step over HF's KV cache: the server's split-KV decode kernel (bitwise the extend row)
            bsz, hq, _, d = query.shape
            q_rows, k_buf, v_buf, req_to_token, row_pool, _ = _full_sequence_rows(query, key, value)
            seq_lens = torch.full((bsz,), k_len, dtype=torch.long, device=query.device)
            max_chunks = -(-k_len // kernels.CONTRACT_CHUNK)
            out = kernels.paged_attention_decode(
                q_rows, k_buf, v_buf, req_to_token, row_pool, seq_lens, scale, max_chunks=max_chunks
            )
            return out.view(bsz, 1, hq, d), None
        return kernels.full_sequence_attention(query, key, value, scale, kernels.CONTRACT_CHUNK), None

    return interface


def register_attention(kind: str) -> str:
    """Register the ``kind`` attention with transformers; returns its implementation name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    interface = _attention_interface(gpu_attention_kernels(kind))  # refuses an unknown kind
    name = ATTENTION_NAMES[kind]
    AttentionInterface.register(name, interface)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _rms_norm_forward(self, hidden_states):
    return rms_norm_pairwise.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _linear_forward(self, x):
    return batch_invariant_linear(x, self.weight, self.bias)


def qwen3_moe_block_forward_cuda(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Qwen3MoeSparseMoeBlock.forward`` under the GPU MoE contract: the router matmul by the
    batch-invariant kernel, ``parity.moe.route``, ``parity.ops.moe_experts.moe_experts``."""
    moe._refuse_router_logit_capture()
    batch, seq, hidden_size = hidden_states.shape
    out = moe_experts.sparse_moe_block(
        hidden_states.reshape(-1, hidden_size), self.gate.weight, self.experts.gate_up_proj,
        self.experts.down_proj, self.gate.top_k, self.gate.norm_topk_prob,
    )  # fmt: skip
    return out.reshape(batch, seq, hidden_size)


def prepare_moe_blocks_cuda(model: torch.nn.Module) -> int:
    """Route the Qwen3-MoE blocks (already checked and bound to the CPU contract by
    ``parity.moe.prepare_moe_blocks``) through :func:`qwen3_moe_block_forward_cuda`; return how many."""
    blocks = [m for m in model.modules() if type(m).__name__ == moe.QWEN3_MOE_BLOCK]
    for block in blocks:
        block.forward = types.MethodType(qwen3_moe_block_forward_cuda, block)
    return len(blocks)


def prepare_model(
    model: torch.nn.Module, tp_size: int = 1, device: str = "cuda", attention: str | None = None
) -> torch.nn.Module:
    """Route ``model`` through the GPU contract (in place); return the model. See the module docstring.

    ``attention``: the kernel family (``parity.ops.GPU_ATTENTION_KINDS``), the server's
    ``--gpu-attention``; default ``parity.ops.DEFAULT_GPU_ATTENTION`` ("mma") on CUDA and "exact" on
    the CPU (the tensor-core kernels have no CPU path but the Triton interpreter)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if attention is None:
        attention = DEFAULT_GPU_ATTENTION if device == "cuda" else "exact"
    if device == "cuda" and tp_size > 2:
        raise trainer.UnsupportedModelError(
            f"tp_size {tp_size} on the GPU: the server's all-reduce of 3+ partials is not in rank order"
        )
    trainer.prepare_model(model)  # the CPU contract's checks, MoE binding (attention, norms replaced next)
    model.set_attn_implementation(register_attention(attention))
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_forward, module)
    if device == "cuda":
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = types.MethodType(_linear_forward, module)
        prepare_moe_blocks_cuda(model)
    if tp_size > 1:  # row-parallel layers: per-rank partials by the server's matmul, rank-order sum
        emulate_tensor_parallel(model, tp_size, batch_invariant_linear if device == "cuda" else F.linear)
    return model
