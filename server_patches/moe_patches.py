"""Mixture-of-experts patches: SGLang's CPU MoE path computes the contract of ``parity.moe``.

What SGLang 0.5.15 runs for a Qwen3-MoE layer on the CPU engine (no AMX; ``Qwen3MoeSparseMoeBlock.
forward_normal``): the router matmul ``gate`` (``ReplicatedLinear``: a bf16 ``F.linear``, the same
as HF's router matmul), then ``TopK.forward_native`` -> ``select_experts`` -> the module-level
``fused_topk_native`` (bound to ``fused_topk_torch_native``: fp32 softmax, ``torch.topk``), then
``FusedMoE`` -> ``StandardDispatcher`` (identity on one rank) -> ``UnquantizedFusedMoEMethod.
forward_native`` (the same function as its ``forward_cpu``) -> ``fused_moe_native.moe_forward_native``
(per-expert matmuls, fp32 combine).

- ``moe_topk``: REPLACE ``topk.fused_topk_native`` -- the name ``select_experts`` looks up, so the
  patch goes on that binding, not on ``fused_topk_torch_native`` -- with ``parity.moe.route``
  (stable top-k: ties to the lower expert index). Everything around it in ``select_experts``
  (expert-location transforms, routed-experts capture, the distribution recorder) stays SGLang's.
- ``moe_experts``: REPLACE ``fused_moe_native.moe_forward_native`` (imported by
  ``forward_cpu`` at call time, so the patched module attribute is what runs) with
  ``parity.moe.experts``: the contract's per-expert math and fp32 slot-order combine.

Outside the contract, refused with ``NotImplementedError`` at the first forward: scoring functions
other than softmax, correction biases, activations other than SiLU, quantized experts (SGLang's
mxfp4 CPU path also calls ``moe_forward_native``), expert biases, weights applied
on the input, GPT-OSS-style clamped SwiGLU, routed scaling factors, fused shared experts, and MoE
tensor / expert parallelism (a rank's weights would be a shard: the trainer does not emulate that
yet). CPUs with AMX (SGLang's ``sgl_kernel`` path, like the other CPU patches) and the GPU's fused
MoE kernels are not on these code paths: docs/parity.md, "Not covered yet".
"""

from __future__ import annotations

from parity import moe
from server_patches.numerics import _outside
from server_patches.patch import Patch

_MOE = "sglang.srt.layers.moe"
_TESTS = "tests/test_moe_contract.py"


def fused_topk_native(
    hidden_states, gating_output, topk, renormalize, correction_bias=None, scoring_func="softmax"
):
    """REPLACE topk.fused_topk_native: ``(fp32 weights, int64 expert ids)`` from ``parity.moe.route``."""
    if correction_bias is not None or scoring_func != "softmax":
        raise _outside("moe_topk", f"routing with scoring {scoring_func!r} or a correction bias")
    return moe.route(gating_output, topk, renormalize)


def moe_forward_native(layer, x, topk_output, moe_runner_config):
    """REPLACE fused_moe_native.moe_forward_native: the routed experts through ``parity.moe.experts``."""
    config = moe_runner_config
    if (
        config.activation != "silu"
        or not config.is_gated
        or config.apply_router_weight_on_input
        or config.gemm1_alpha is not None
        or config.swiglu_limit is not None
        or config.routed_scaling_factor is not None
        or config.num_fused_shared_experts
    ):
        raise _outside("moe_experts", "an expert variant (activation, weights on input, clamped SwiGLU, ...)")
    if any(getattr(layer, name, None) is not None for name in ("w13_weight_bias", "w2_weight_bias")):
        raise _outside("moe_experts", "expert biases")
    if layer.w13_weight.dtype != x.dtype or layer.w2_weight.dtype != x.dtype:
        raise _outside("moe_experts", f"{layer.w13_weight.dtype} (quantized) expert weights")
    if layer.moe_tp_size > 1 or layer.moe_ep_size > 1:
        raise _outside("moe_experts", f"MoE TP {layer.moe_tp_size} / EP {layer.moe_ep_size}")
    weights, ids, _ = topk_output
    return moe.experts(x, weights, ids, layer.w13_weight, layer.w2_weight)


MOE_PATCHES: tuple[Patch, ...] = (
    Patch(
        name="moe_topk",
        target=f"{_MOE}.topk.fused_topk_native",
        diverges=(
            "torch.topk returns tied router probabilities in an order that depends on the rest of the row "
            "(unspecified), so a tie can route a token to other experts than the contract's stable rule "
            "(ties to the lower expert index), which the trainer follows."
        ),
        proof=f"{_TESTS}::test_topk_patch_breaks_ties_like_the_trainer",
        drop_when="SGLang's top-k breaks ties to the lower expert index",
        hook=fused_topk_native,
        hook_type="REPLACE",
        expected_params=(
            "hidden_states", "gating_output", "topk", "renormalize", "correction_bias", "scoring_func",
        ),
    ),
    Patch(
        name="moe_experts",
        target=f"{_MOE}.fused_moe_native.moe_forward_native",
        diverges=(
            "SGLang's experts loop sums the fp32 slot products with torch's .sum(dim=1), whose order torch "
            "does not specify (slot order on the CPUs measured, so away from ties it already gives the "
            "contract's bits); the server now runs the shared code, parity.moe.experts (fp32 slot-order "
            "combine, one rounding), whatever torch's reduction order."
        ),
        proof=f"{_TESTS}::test_experts_patch_equals_the_trainer_block",
        drop_when="SGLang specifies a slot-order fp32 combine",
        hook=moe_forward_native,
        hook_type="REPLACE",
        expected_params=("layer", "x", "topk_output", "moe_runner_config"),
    ),
)  # fmt: skip
