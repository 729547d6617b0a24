"""Tensor-parallel numerics on the trainer side: a TP=1 model that computes exactly like a TP=k server.

What changes with tensor parallelism
------------------------------------
A TP=k SGLang server splits each *row-parallel* layer (``o_proj``, ``down_proj``) along its reduction
dimension K: rank r holds the contiguous input columns ``[r K/k, (r+1) K/k)`` (for ``o_proj`` those are
the attention heads of rank r; for ``down_proj`` rank r's slice of the intermediate size, produced by
the column-parallel ``gate_up_proj``). Each rank computes its partial product with a bf16 matmul,
so the partial is **rounded to bf16**, and the ranks' partials are then summed by an all-reduce. A
TP=1 trainer reduces K in one pass and rounds once: in general different bits.

Everything else in a dense decoder is the same at any TP size: column-parallel layers (qkv,
gate/up, the vocab-parallel lm_head) compute each output column independently of how many columns a
rank holds, attention works per head, the vocab-parallel embedding adds exact zeros.

The all-reduce (measured, tests/test_tp_gloo.py)
-------------------------------------------------
SGLang on a CPU without AMX all-reduces with ``torch.distributed.all_reduce`` over gloo
(``GroupCoordinator.all_reduce``, sglang/srt/distributed/parallel_state.py:602). gloo's ring
reduce-scatter adds with ``c10::BFloat16 + c10::BFloat16``: each hop converts both operands to fp32,
adds, and rounds back to bf16. The flat buffer is cut into k chunks; chunk c is accumulated along the
ring starting at rank c-1, then c-2, ..., ending at rank c, rounding to bf16 after every hop.

- k = 2: one addition, ``bf16(fp32(p0) + fp32(p1))`` -- commutative, so the order cannot matter and it
  is exactly :func:`rank_order_sum` (fp32 accumulation in rank order, rounded once).
- k >= 3: the order (and the number of bf16 roundings) of an element depends on which chunk its
  offset falls into, i.e. on its row's position in the server's batch: gloo's all-reduce is not
  batch-invariant. No trainer can reproduce it; the server must all-reduce in a fixed order
  instead (``server_patches.tp_patches`` ``cpu_all_reduce_rank_order``: all-gather, then
  :func:`rank_order_sum`), which is also what the fused GPU kernel
  (``parity.ops.fused_allreduce_rmsnorm``) computes.

So the contract for a TP=k row-parallel layer is: per-rank bf16 partials over contiguous K chunks
(rank 0's partial carries the bias, as in SGLang's ``RowParallelLinear``), summed in fp32 in rank
order 0..k-1 and rounded once to bf16.

Use
---
``emulate_tensor_parallel(model, tp_size)`` switches (in place) every dense decoder layer's
``self_attn.o_proj`` and ``mlp.down_proj`` to that computation; ``tp_size=1`` restores the plain
``nn.Linear``. Select the server's TP size per run; combine with ``parity.prepare_model`` (either
order). Differentiable: the trainer can train through it.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Row-parallel projections of a dense decoder layer, as HF names them (Qwen2/Qwen3/Llama).
_ROW_PARALLEL = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)$")
_TP_ATTR = "_truepolicy_tp_size"
_LINEAR_ATTR = "_truepolicy_tp_linear"
Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class UnsupportedTensorParallelError(ValueError):
    pass


def rank_order_sum(partials: Sequence[torch.Tensor]) -> torch.Tensor:
    """All-reduce of the ranks' partials under the contract: fp32 accumulation in rank order, one
    rounding to the partials' dtype. For two ranks this is bit for bit gloo's bf16 all-reduce."""
    if not partials:
        raise ValueError("no partials to reduce")
    acc = partials[0].to(torch.float32)
    for p in partials[1:]:
        acc = acc + p.to(torch.float32)
    return acc.to(partials[0].dtype)


def shard_bounds(k_dim: int, tp_size: int) -> list[tuple[int, int]]:
    """The contiguous K ranges ``[start, end)`` of ranks 0..tp_size-1 (SGLang's RowParallelLinear)."""
    if tp_size < 1 or k_dim % tp_size:
        raise UnsupportedTensorParallelError(f"K = {k_dim} does not split evenly over {tp_size} ranks")
    step = k_dim // tp_size
    return [(r * step, (r + 1) * step) for r in range(tp_size)]


def row_parallel_partials(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp_size: int, linear: Linear = F.linear
) -> list[torch.Tensor]:
    """Each rank's output of a row-parallel linear: ``linear`` (the server's matmul: ``F.linear`` on
    the CPU, the batch-invariant kernel on the GPU) on its K chunk (contiguous, as the server holds
    it), rounded to the input dtype; rank 0 adds the bias."""
    return [
        linear(x[..., a:b].contiguous(), weight[:, a:b].contiguous(), bias if r == 0 else None)
        for r, (a, b) in enumerate(shard_bounds(weight.shape[1], tp_size))
    ]


def row_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp_size: int, linear: Linear = F.linear
) -> torch.Tensor:
    """``linear(x, weight, bias)`` computed the way a TP=``tp_size`` server computes it."""
    if tp_size == 1:
        return linear(x, weight, bias)
    return rank_order_sum(row_parallel_partials(x, weight, bias, tp_size, linear))


def _row_parallel_forward(self, x):
    tp_size, linear = getattr(self, _TP_ATTR), getattr(self, _LINEAR_ATTR)
    return row_parallel_linear(x, self.weight, self.bias, tp_size, linear)


def _check_model(model: torch.nn.Module, tp_size: int) -> None:
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    if text is None:
        return
    if getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None):
        raise UnsupportedTensorParallelError("mixture-of-experts TP is not emulated yet (issue 14)")
    heads = getattr(text, "num_attention_heads", None)
    if heads is not None and heads % tp_size:
        raise UnsupportedTensorParallelError(f"{heads} attention heads do not split over {tp_size} ranks")
    inter = getattr(text, "intermediate_size", None)
    if inter is not None and inter % tp_size:
        raise UnsupportedTensorParallelError(f"intermediate size {inter} does not split over {tp_size} ranks")


def emulate_tensor_parallel(
    model: torch.nn.Module, tp_size: int, linear: Linear = F.linear
) -> torch.nn.Module:
    """Make ``model``'s row-parallel layers compute as on a TP=``tp_size`` server (in place), each
    rank's partial product by ``linear`` (the server's per-rank matmul: ``F.linear`` on the CPU,
    ``batch_invariant_linear`` for the GPU contract).

    ``tp_size=1`` with ``F.linear`` restores the single-pass ``nn.Linear``. Returns the model.
    """
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive int, not {tp_size!r}")
    _check_model(model, tp_size)
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if _ROW_PARALLEL.search(name) and isinstance(module, torch.nn.Linear)
    ]
    if not layers:
        raise UnsupportedTensorParallelError(
            "no dense decoder row-parallel layers (layers.N.self_attn.o_proj / layers.N.mlp.down_proj) found"
        )
    for _, module in layers:
        shard_bounds(module.in_features, tp_size)  # every layer must split before any is switched
    for _, module in layers:
        if tp_size == 1 and linear is F.linear:
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_TP_ATTR, None)
            module.__dict__.pop(_LINEAR_ATTR, None)
        else:
            setattr(module, _TP_ATTR, tp_size)
            setattr(module, _LINEAR_ATTR, linear)
            module.forward = types.MethodType(_row_parallel_forward, module)
    model.__dict__[_TP_ATTR] = tp_size
    return model


def emulated_tp_size(model: torch.nn.Module) -> int:
    """The TP size ``model`` currently computes like (1 unless ``emulate_tensor_parallel`` set one)."""
    return model.__dict__.get(_TP_ATTR, 1)
