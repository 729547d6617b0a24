"""Tensor-parallel patches: the all-reduce in front of a norm computes the contract's bits.

Two places where SGLang 0.5.15's TP all-reduce departs from the contract (parity/tp.py,
parity/ops/fused_allreduce_rmsnorm.py): the sum of the ranks' partials in fp32 in rank order, rounded
once to bf16, then the residual added in bf16, then the RMSNorm.

- ``allreduce_rmsnorm_unfused``: ``layernorm._forward_with_allreduce_fusion`` (behind
  ``RMSNorm.forward_with_allreduce_fusion`` / ``GemmaRMSNorm``'s) runs flashinfer's or AITER's fused
  all-reduce + residual + RMSNorm when ``--flashinfer-allreduce-fusion-backend`` / AITER fusion is
  on -- auto-enabled on SM90/SM100 at TP > 1 for the MoE architectures of
  ``arg_groups/overrides.py::_FLASHINFER_ALLREDUCE_FUSION_ARCHS`` (Qwen3-MoE among them). Those
  kernels add the residual inside the fused reduction (AITER's before rounding: PR 2586) and norm
  in their own order. The patch routes every such call through the exact unfused path: the group's
  plain ``all_reduce`` (the same group the fused kernel reduces over), then the norm module's own
  ``forward`` (which the ``rmsnorm`` patch routes through ``contract.add_rms_norm``). Never reached
  on the CPU (neither fusion exists there); tested in-process with a gloo group.
- ``cpu_all_reduce_rank_order``: on CPU tensors SGLang all-reduces with gloo's ring (or, on AMX
  CPUs, its shared-memory kernel). For 2 ranks gloo's result is exactly the rank-order fp32 sum; for
  3 or more its addition order and bf16 roundings depend on each element's offset in the flat
  buffer, i.e. on the token's position in the batch (measured: tests/test_tp_gloo.py). The patch
  all-gathers the ranks' tensors and sums them in rank order in fp32, rounding once
  (``parity.tp.rank_order_sum``): batch-invariant, identical on all ranks, what the trainer's
  ``parity.tp.emulate_tensor_parallel`` computes. Floating-point CPU tensors only; everything else
  (and GPU tensors) goes to SGLang's own all-reduce.
"""

from __future__ import annotations

import torch

from server_patches.patch import Patch

_LAYERNORM = "sglang.srt.layers.layernorm"
_GROUP = "sglang.srt.distributed.parallel_state.GroupCoordinator"


def _fusion_group(use_attn_tp_group: bool):
    """The group SGLang's fused kernels reduce over (flashinfer_comm_fusion / layernorm)."""
    from sglang.srt.distributed.parallel_state import get_attn_tp_group, get_moe_ep_group, get_moe_tp_group
    from sglang.srt.runtime_context import get_parallel

    if use_attn_tp_group:
        return get_attn_tp_group()
    return get_moe_ep_group() if get_parallel().moe_ep_size > 1 else get_moe_tp_group()


def allreduce_then_norm(norm_module, x, residual, post_residual_addition, weight, use_attn_tp_group=True):
    """REPLACE layernorm._forward_with_allreduce_fusion: all-reduce, then the module's unfused norm.

    Same contract as the original: with a residual and a group of more than one rank, ``x`` is the
    rank's partial and the result is ``(norm(residual + all_reduce(x)), residual + all_reduce(x))``;
    without a residual it is the plain norm of ``x``.
    """
    if residual is not None:
        group = _fusion_group(use_attn_tp_group)
        if group.world_size > 1:
            x = group.all_reduce(x)
    return norm_module.forward(x, residual, post_residual_addition)


def all_reduce_rank_order(original, self, input_):
    """AROUND GroupCoordinator.all_reduce: CPU floating-point tensors are summed in rank order in
    fp32 and rounded once (in place, like SGLang's CPU path); anything else is SGLang's."""
    if self.world_size == 1 or not input_.is_cpu or not input_.is_floating_point():
        return original(self, input_)
    from parity.tp import rank_order_sum

    gathered = [torch.empty_like(input_) for _ in range(self.world_size)]
    torch.distributed.all_gather(gathered, input_.contiguous(), group=self.device_group)
    input_.copy_(rank_order_sum(gathered))
    return input_


TP_PATCHES: tuple[Patch, ...] = (
    Patch(
        name="allreduce_rmsnorm_unfused",
        target=f"{_LAYERNORM}._forward_with_allreduce_fusion",
        diverges=(
            "flashinfer's / AITER's fused all-reduce + residual + RMSNorm add the residual inside the "
            "fused reduction (AITER: before rounding the sum to bf16, PR 2586) and normalise in their "
            "own order; the trainer rounds the all-reduced sum to bf16, adds the residual in bf16, "
            "then applies RMSNorm."
        ),
        proof="tests/test_tp_gloo.py::test_allreduce_rmsnorm_unfused_equals_the_unfused_path",
        drop_when=(
            "SGLang's fused all-reduce + RMSNorm rounds before the residual add and norms in the "
            "contract's order"
        ),
        hook=allreduce_then_norm,
        hook_type="REPLACE",
        expected_params=(
            "norm_module", "x", "residual", "post_residual_addition", "weight", "use_attn_tp_group",
        ),
    ),
    Patch(
        name="cpu_all_reduce_rank_order",
        target=f"{_GROUP}.all_reduce",
        diverges=(
            "on CPU tensors SGLang all-reduces with gloo's ring: for 3 or more ranks each element's "
            "addition order and bf16 roundings depend on its offset in the batch's flat buffer (not "
            "batch-invariant); the contract sums the ranks' partials in fp32 in rank order, rounded once."
        ),
        proof="tests/test_tp_gloo.py::test_rank_order_patch_makes_four_rank_all_reduce_batch_invariant",
        drop_when="SGLang's CPU all-reduce sums in a fixed rank order (or runs at TP <= 2 only)",
        hook=all_reduce_rank_order,
        hook_type="AROUND",
        expected_params=("self", "input_"),
    ),
)  # fmt: skip
