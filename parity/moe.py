"""The mixture-of-experts contract (Qwen3-MoE): routing, expert math and combine, one implementation.

The problem
-----------
A sparse MoE block computes, per token, ``sum_j w_j * expert_{i_j}(x)`` over its top-k experts
``i_j`` with router weights ``w_j``. The two engines compute it differently:

- HF transformers 5.12.1 (``Qwen3MoeTopKRouter`` + ``Qwen3MoeExperts``): fp32 softmax of the bf16
  router logits, ``torch.topk`` (ties: whichever index the kernel returns), renormalised weights
  rounded to **bf16**, each expert's output multiplied by its bf16 weight **in bf16**, then
  ``index_add_`` into a **bf16** accumulator expert by expert: a token's output is rounded once per
  expert it visits, in expert-index order.
- SGLang 0.5.15 on CPU (``TopK.forward_native`` -> ``fused_topk_torch_native``; experts
  ``moe_forward_native``): the same softmax and ``torch.topk``, fp32 weights, per-expert bf16
  matmuls on the gathered rows, and an fp32 weighted sum over the token's slots rounded once.

So the outputs differ by bf16 rounding of the combine on every token, and routing itself can differ
where two experts' probabilities tie (``torch.topk`` promises nothing about which one wins).

The contract
------------
Both sides call :func:`sparse_moe` (the plugin from inside SGLang's layers, the trainer from inside
HF's ``Qwen3MoeSparseMoeBlock``):

1. :func:`route`: fp32 softmax of the router logits (the upcast of the bf16 logits is exact), then a
   **stable** descending sort: equal probabilities keep ascending expert order, so ties go to the
   lower expert index. The first ``top_k`` are the token's slots 0..k-1. With ``norm_topk_prob``
   (Qwen3) the weights are divided by their sum, added in slot order in fp32.
2. :func:`expert_mlp`: per expert, on the rows routed to it (gathered in ascending expert order):
   ``F.linear(x, w13[e])`` in the model dtype, split into gate and up, ``silu(gate) * up`` in the
   model dtype, ``F.linear(., w2[e])`` in the model dtype -- HF's and SGLang's own expert math.
3. :func:`combine`: in fp32, slot by slot in slot order, ``acc = w_0 * y_0``, ``acc = acc + w_j * y_j``;
   the bf16 expert outputs upcast exactly; one rounding to the model dtype at the end.

Why it is batch-invariant: the softmax, the sort and the combine are per-row; the elementwise fp32
products and sums are correctly rounded whichever (SIMD or scalar) path computes them; ``silu`` of
bf16 values and bf16 products are path-independent (tests/test_contract_ops.py); the per-expert bf16
``F.linear`` rows do not depend on how many other rows go to the same expert (measured on the
machine that runs tests/test_moe_contract.py). A token's output therefore depends only on the token.

Trade-off: a Python loop over the experts (fine for the CPU runtime; a GPU needs a grouped-GEMM
kernel that keeps the same per-row math and combine order) and a [tokens, k, hidden] buffer of
expert outputs; the fp32 combine costs one extra upcast per slot and is more accurate than HF's bf16
accumulation. The contract keeps the top-k weights in fp32 (SGLang's choice), not rounded to bf16.

Backward: every step is a differentiable PyTorch op, so autograd is the backward. The top-k
selection is piecewise constant: the router gets its gradient through the selected probabilities
(softmax, sort values, renormalisation), as in HF; each expert's weights get gradients from the rows
routed to it only. Checked against finite differences and a float64 reference in
tests/test_moe_contract.py.

Accumulation dtype: ``promote_types(dtype, float32)``, i.e. fp32 for bf16/fp16/fp32 models and
float64 for a float64 reference run of the same code.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from parity.trainer import UnsupportedModelError


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, float64 for float64 (the reference run of the same code)."""
    return torch.promote_types(dtype, torch.float32)


def _sum_in_slot_order(values: torch.Tensor) -> torch.Tensor:
    """``values[:, 0] + values[:, 1] + ...`` left to right: a fixed addition order for any k."""
    total = values[:, 0]
    for j in range(1, values.shape[1]):
        total = total + values[:, j]
    return total


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: ``(weights, expert ids)``, both [tokens, top_k], slot 0 the most probable.

    Probabilities are the fp32 softmax of the logits; ranking is a stable descending sort, so equal
    probabilities go to the lower expert index first. With ``renormalize`` (Qwen3's
    ``norm_topk_prob``) the top-k probabilities are divided by their sum (added in slot order).
    """
    num_experts = router_logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k {top_k} out of range for {num_experts} experts")
    # The upcast of bf16 logits to fp32 is exact; the softmax runs in fp32 (per row).
    probs = torch.softmax(router_logits.to(accumulation_dtype(router_logits.dtype)), dim=-1)
    ranked, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = ranked[:, :top_k], ids[:, :top_k]
    if renormalize:
        # fp32 division by the slot-order fp32 sum: one rounding per weight.
        weights = weights / _sum_in_slot_order(weights)[:, None]
    return weights, ids


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's SiLU-gated MLP on its rows, in ``x.dtype``: ``w13`` is [2I, H] (gate rows first,
    then up rows, as HF's ``gate_up_proj`` and SGLang's ``w13_weight``), ``w2`` is [H, I]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def combine(weights: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[:, j] * expert_out[:, j]`` in the weights' (fp32) dtype, slot 0 first, rounded
    once to ``expert_out.dtype``. ``weights``: [T, k]; ``expert_out``: [T, k, H]."""
    acc_dtype = weights.dtype
    # Upcasting the bf16 expert outputs is exact; each product and sum is one fp32 rounding.
    acc = weights[:, 0, None] * expert_out[:, 0].to(acc_dtype)
    for j in range(1, weights.shape[1]):
        acc = acc + weights[:, j, None] * expert_out[:, j].to(acc_dtype)
    return acc.to(expert_out.dtype)


def experts(
    hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """The routed experts of every token, combined: [T, H] in ``hidden.dtype``.

    ``hidden``: [T, H]; ``weights``, ``ids``: [T, k] from :func:`route`; ``w13``: [E, 2I, H];
    ``w2``: [E, H, I]. Each expert runs once on all (token, slot) rows routed to it.
    """
    tokens, hidden_size = hidden.shape
    k = ids.shape[1]
    flat = ids.reshape(-1)
    # (token, slot) pairs grouped by expert, ascending; the stable sort keeps token order within one.
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    rows = hidden[order // k]
    outs = [expert_mlp(r, w13[e], w2[e]) for e, r in enumerate(rows.split(counts)) if r.shape[0]]
    by_expert = torch.cat(outs) if outs else hidden.new_empty((0, hidden_size))
    # Back from expert order to (token, slot) order: a gather with the inverse permutation.
    per_slot = by_expert[torch.argsort(order)].view(tokens, k, hidden_size)
    return combine(weights, per_slot)


def sparse_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> torch.Tensor:
    """The whole sparse MoE block after the router matmul: :func:`route`, then :func:`experts`."""
    weights, ids = route(router_logits, top_k, renormalize)
    return experts(hidden, weights, ids, w13, w2)


# --- trainer side: HF transformers' Qwen3-MoE block through the contract ---------------------------

QWEN3_MOE_BLOCK = "Qwen3MoeSparseMoeBlock"


def _refuse_router_logit_capture() -> None:
    """Raise if this forward records router logits (``output_router_logits=True``): see
    :func:`prepare_moe_blocks` for why the router auxiliary loss is outside the contract."""
    from transformers.utils.output_capturing import _active_collector

    collected = _active_collector.get()
    if collected is not None and "router_logits" in collected:
        raise UnsupportedModelError(
            "output_router_logits=True (the router auxiliary loss) is outside the truepolicy MoE contract"
        )


def qwen3_moe_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Qwen3MoeSparseMoeBlock.forward`` under the contract: HF's router matmul (a bf16 ``F.linear``
    with the router's weight, as ``Qwen3MoeTopKRouter`` and SGLang's ``gate`` compute it), then
    :func:`sparse_moe` with the block's own expert weights. Differentiable (autograd)."""
    _refuse_router_logit_capture()
    batch, seq, hidden_size = hidden_states.shape
    x = hidden_states.reshape(-1, hidden_size)
    router_logits = F.linear(x, self.gate.weight)
    out = sparse_moe(
        x, router_logits, self.experts.gate_up_proj, self.experts.down_proj,
        self.gate.top_k, self.gate.norm_topk_prob,
    )  # fmt: skip
    return out.reshape(batch, seq, hidden_size)


def prepare_moe_blocks(model: torch.nn.Module) -> int:
    """Route every Qwen3-MoE sparse block of ``model`` through the contract (in place); return how
    many. A model without experts is left alone (0).

    Router auxiliary losses: not supported. Qwen3-MoE computes its load-balancing loss only with
    ``output_router_logits`` (off by default, and usually off in RL fine-tuning); HF's
    ``load_balancing_loss_func`` then re-ranks the experts with its own ``torch.topk`` over a softmax
    in the logits' dtype (bf16, where probabilities distinct in fp32 tie, and ties go wherever
    ``torch.topk`` puts them), so the loss would describe other routing than the one the model ran. Refused: a
    config with ``output_router_logits=True`` here, and a forward asked for router logits raises.
    Also refused: other MoE architectures (shared experts, grouped or biased routing, ...), a
    non-SiLU expert activation, and expert layouts other than HF's fused [gate; up] without bias.
    """
    config = model.config
    if not (getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)):
        return 0
    if config.model_type != "qwen3_moe":
        raise UnsupportedModelError(
            f"mixture-of-experts architecture {config.model_type!r} is outside the contract (qwen3_moe only)"
        )
    if config.output_router_logits:
        raise UnsupportedModelError(
            "output_router_logits=True (the router auxiliary loss) is outside the truepolicy MoE contract"
        )
    if config.hidden_act != "silu":
        raise UnsupportedModelError(f"expert activation {config.hidden_act!r}: the contract is SiLU-gated")
    blocks = [m for m in model.modules() if type(m).__name__ == QWEN3_MOE_BLOCK]
    for block in blocks:
        layout = block.experts
        if layout.has_bias or layout.is_transposed or not layout.is_concatenated:
            raise UnsupportedModelError("expert weights other than HF's fused [gate; up] without bias")
    for block in blocks:
        block.forward = types.MethodType(qwen3_moe_block_forward, block)
    return len(blocks)
