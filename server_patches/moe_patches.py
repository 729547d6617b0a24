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
yet). CPUs with AMX (SGLang's ``sgl_kernel`` path, like the other CPU patches) are not on these code
paths: docs/parity.md, "Not covered yet".

On CUDA (``MOE_GPU_PATCHES``, part of ``server_patches.gpu_patches.GPU_PATCHES``)
---------------------------------------------------------------------------------
SGLang 0.5.15 on a GPU: the router matmul ``gate`` goes through ``UnquantizedLinearMethod.apply``
(already the batch-invariant kernel under ``linear_batch_invariant``); ``TopK.forward_cuda`` ->
``select_experts`` -> the module-level ``topk.fused_topk`` (sgl_kernel's ``topk_softmax``, or a JIT
Triton router under an env switch: ties broken by the kernel); ``FusedMoE.forward`` ->
``forward_impl`` -> ``run_moe_core`` -> ``quant_method.apply`` -> ``UnquantizedFusedMoEMethod.
forward_cuda`` -> the Triton ``fused_experts`` runner (tile configuration chosen from the number of
tokens, bf16 combine inside its kernels).

- ``moe_topk_cuda``: REPLACE ``topk.fused_topk`` with ``parity.moe.route`` (ids as int32, SGLang's
  GPU dtype), the same rule as ``moe_topk``.
- ``moe_experts_cuda``: AROUND ``FusedMoE.run_moe_core`` -- the one call every MoE method goes
  through, so a quantized or other-backend method reaching it on CUDA is refused here rather than
  silently running its own kernels (a patch of ``UnquantizedFusedMoEMethod.forward_cuda`` would
  miss them, and is bound to each method instance when SGLang builds it) -- with
  ``parity.ops.moe_experts.moe_experts``: the contract's experts and combine with the
  batch-invariant matmul. CPU tensors go to SGLang's own path (and the CPU rows above).

Refused on CUDA, besides the CPU list: quantized MoE methods, MoE runner backends other than
SGLang's Triton one (FlashInfer, DeepGEMM, triton_kernels, AITER: other weight layouts and top-k
formats), all-to-all backends (DeepEP, ...), redundant (EPLB) experts, the fused top-k + pack, a
dispatch with quantized activations, ``no_combine``, and CUDA-graph capture.
"""

from __future__ import annotations

import torch

from parity import moe
from server_patches.numerics import _outside
from server_patches.patch import Patch

_MOE = "sglang.srt.layers.moe"
_TESTS = "tests/test_moe_contract.py"
_GPU_TESTS = "tests/test_moe_gpu.py"


def fused_topk_native(
    hidden_states, gating_output, topk, renormalize, correction_bias=None, scoring_func="softmax"
):
    """REPLACE topk.fused_topk_native: ``(fp32 weights, int64 expert ids)`` from ``parity.moe.route``."""
    if correction_bias is not None or scoring_func != "softmax":
        raise _outside("moe_topk", f"routing with scoring {scoring_func!r} or a correction bias")
    return moe.route(gating_output, topk, renormalize)


def moe_forward_native(layer, x, topk_output, moe_runner_config):
    """REPLACE fused_moe_native.moe_forward_native: the routed experts through ``parity.moe.experts``."""
    _check_experts("moe_experts", layer, x, moe_runner_config)
    weights, ids, _ = topk_output
    return moe.experts(x, weights, ids, layer.w13_weight, layer.w2_weight)


def _check_experts(patch: str, layer, x, config) -> None:
    """Refuse every expert variant the contract does not define (CPU and GPU hooks alike)."""
    if (
        config.activation != "silu"
        or not config.is_gated
        or config.apply_router_weight_on_input
        or config.gemm1_alpha is not None
        or getattr(config, "gemm1_clamp_limit", None) is not None
        or config.swiglu_limit is not None
        or config.routed_scaling_factor is not None
        or config.num_fused_shared_experts
    ):
        raise _outside(patch, "an expert variant (activation, weights on input, clamped SwiGLU, ...)")
    if any(getattr(layer, name, None) is not None for name in ("w13_weight_bias", "w2_weight_bias")):
        raise _outside(patch, "expert biases")
    if layer.w13_weight.dtype != x.dtype or layer.w2_weight.dtype != x.dtype:
        raise _outside(patch, f"{layer.w13_weight.dtype} (quantized) expert weights")
    if layer.moe_tp_size > 1 or layer.moe_ep_size > 1:
        raise _outside(patch, f"MoE TP {layer.moe_tp_size} / EP {layer.moe_ep_size}")


# --- CUDA ------------------------------------------------------------------------------------------


def fused_topk(
    hidden_states,
    gating_output,
    topk,
    renormalize,
    correction_bias=None,
    scoring_func="softmax",
    packed_out=None,
    num_token_non_padded=None,
):
    """REPLACE topk.fused_topk (the GPU top-k of ``select_experts``): ``parity.moe.route``'s fp32
    weights and its expert ids as int32 (the dtype SGLang's CUDA top-k returns)."""
    if correction_bias is not None or scoring_func != "softmax":
        raise _outside("moe_topk_cuda", f"routing with scoring {scoring_func!r} or a correction bias")
    if packed_out is not None:
        raise _outside("moe_topk_cuda", "the fused top-k + FlashInfer pack (SGLANG_OPT_LORA_FUSED_TOPK_PACK)")
    weights, ids = moe.route(gating_output, topk, renormalize)
    return weights, ids.to(torch.int32)


def _check_cuda_moe(layer, dispatch_output) -> None:
    """What the GPU experts hook computes: one rank, SGLang's unquantized Triton-runner layout, a
    standard top-k from ``fused_topk`` (patched), plain bf16/fp16 activations, no CUDA graph."""
    from sglang.srt.layers.moe import get_moe_a2a_backend
    from sglang.srt.layers.moe.topk import StandardTopKOutput
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    patch = "moe_experts_cuda"
    method = layer.quant_method
    if type(method) is not UnquantizedFusedMoEMethod:
        raise _outside(patch, f"the MoE method {type(method).__name__} (quantized or wrapped experts)")
    runner = getattr(method, "runner", None)
    if (
        runner is None
        or not runner.runner_backend.is_triton()
        or getattr(method, "_aiter_runner", None) is not None
        or method.use_flashinfer_cutlass
        or method.use_flashinfer_trtllm_moe
        or method.use_triton_kernels
        or method.use_deep_gemm
    ):
        raise _outside(patch, "a MoE runner backend other than SGLang's Triton one (another weight layout)")
    if not get_moe_a2a_backend().is_none():
        raise _outside(patch, f"the MoE all-to-all backend {get_moe_a2a_backend().value!r}")
    x = dispatch_output.hidden_states
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise _outside(patch, "CUDA-graph capture (run with --disable-cuda-graph)")
    topk_output = dispatch_output.topk_output
    if type(topk_output) is not StandardTopKOutput:
        raise _outside(patch, f"a {type(topk_output).__name__} routing (only the standard top-k)")
    if dispatch_output.hidden_states_scale is not None:
        raise _outside(patch, "quantized (scaled) dispatched activations")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise _outside(patch, f"{x.dtype} activations")
    config = layer.moe_runner_config
    _check_experts(patch, layer, x, config)
    if config.no_combine:
        raise _outside(patch, "no_combine (per-slot expert outputs)")
    w13, w2 = layer.w13_weight, layer.w2_weight
    experts, hidden = w13.shape[0], x.shape[-1]
    if w13.shape[2] != hidden or w2.shape[1] != hidden or w13.shape[1] != 2 * w2.shape[2]:
        shapes = f"{tuple(w13.shape)} / {tuple(w2.shape)}"
        raise _outside(patch, f"expert weights {shapes} (not [E, 2I, H] / [E, H, I])")
    if topk_output.router_logits.shape[-1] != experts or layer.num_experts != experts:
        raise _outside(patch, "redundant (EPLB) or padded experts")


def fused_moe_run_core(original, self, dispatch_output):
    """AROUND FusedMoE.run_moe_core: on CUDA, the contract's experts (``parity.ops.moe_experts``)
    instead of the layer's MoE method; other devices run SGLang's own path."""
    from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput

    from parity.ops.moe_experts import moe_experts

    x = dispatch_output.hidden_states
    if not x.is_cuda:
        return original(self, dispatch_output)
    _check_cuda_moe(self, dispatch_output)
    topk = dispatch_output.topk_output
    out = moe_experts(x, topk.topk_weights, topk.topk_ids, self.w13_weight, self.w2_weight)
    return StandardCombineInput(hidden_states=out)


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


MOE_GPU_PATCHES: tuple[Patch, ...] = (
    Patch(
        name="moe_topk_cuda",
        target=f"{_MOE}.topk.fused_topk",
        diverges=(
            "SGLang's CUDA top-k (sgl_kernel topk_softmax, or its JIT Triton router) breaks ties between "
            "equal router probabilities its own way; the contract sends ties to the lower expert index."
        ),
        proof=f"{_GPU_TESTS}::test_near_ties_route_alike_on_both_sides",
        drop_when="SGLang's CUDA top-k breaks ties to the lower expert index",
        hook=fused_topk,
        hook_type="REPLACE",
        expected_params=(
            "hidden_states", "gating_output", "topk", "renormalize", "correction_bias", "scoring_func",
            "packed_out", "num_token_non_padded",
        ),
    ),
    Patch(
        name="moe_experts_cuda",
        target=f"{_MOE}.fused_moe_triton.layer.FusedMoE.run_moe_core",
        diverges=(
            "SGLang's Triton fused_experts picks its tile configuration (and so each token's sum order) "
            "from the number of tokens, and combines the slots in bf16 inside its down-projection: a "
            "token's output depends on the batch, and differs from the trainer's."
        ),
        proof=f"{_GPU_TESTS}::test_server_hooks_equal_the_trainer_block",
        drop_when="SGLang's GPU MoE is batch-invariant and combines in fp32 slot order",
        hook=fused_moe_run_core,
        hook_type="AROUND",
        expected_params=("self", "dispatch_output"),
    ),
)  # fmt: skip
