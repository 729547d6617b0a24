"""Op-level tests of the MoE contract (``parity.moe``) for Qwen3-MoE: SGLang's real MoE layers with the
plugin's ``MOE_PATCHES`` against HF transformers' ``Qwen3MoeSparseMoeBlock`` prepared by
``parity.prepare_model``, bit for bit, each with its negative control; near-tie routing; the
backward against finite differences and a float64 reference; what is refused.

SGLang's ``Qwen3MoeSparseMoeBlock`` is built in this process (no engine) through ``sglang_in_process``
with a one-rank parallel context; its layers run as in ``forward_normal`` (router ``gate``, ``topk``,
the experts' dispatcher and MoE method), minus the tensor-parallel group context of
``FusedMoE.forward_impl``, which needs an initialised process group and changes no numbers on one
rank.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from parity import moe
from parity.tiny_models import tiny_config
from parity.trainer import UnsupportedModelError, prepare_model
from server_patches import moe_patches
from server_patches.moe_patches import MOE_PATCHES
from tests.helpers import describe_mismatch, nan_empty

BF16 = torch.bfloat16


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    assert torch.equal(got, want), describe_mismatch(got, want)


def count_differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.double() != b.double()).sum())


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))


@contextlib.contextmanager
def moe_patches_applied():
    """The plugin's MoE patches, applied through SGLang's HookRegistry for the block, then reverted."""
    for patch in MOE_PATCHES:
        patch.apply()
    try:
        yield
    finally:
        for patch in MOE_PATCHES:
            patch.revert()


def hf_block(gen: torch.Generator, config=None):
    """HF's Qwen3-MoE sparse block (bf16) with random weights; ``config`` defaults to the tiny model's."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    block = Qwen3MoeSparseMoeBlock(config or tiny_config("qwen3_moe")).to(BF16)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return block


def prepared(block):
    """The trainer's view of one block: ``prepare_model``'s MoE step (a bare block has no attention)."""
    holder = torch.nn.Module()
    holder.config = block.experts.config
    holder.block = block
    assert moe.prepare_moe_blocks(holder) == 1
    return block


def sglang_block(hf):
    """SGLang's Qwen3MoeSparseMoeBlock holding ``hf``'s weights (router, fused [gate; up], down)."""
    from sglang.srt.model_loader.utils import set_default_torch_dtype
    from sglang.srt.models.qwen3_moe import Qwen3MoeSparseMoeBlock
    from sglang.srt.runtime_context import get_parallel

    parallel = dict(moe_tp_size=1, moe_tp_rank=0, moe_ep_size=1, moe_ep_rank=0)
    with get_parallel().override(**parallel), set_default_torch_dtype(BF16):
        block = Qwen3MoeSparseMoeBlock(layer_id=0, config=hf.experts.config)
    with torch.no_grad():
        block.gate.weight.copy_(hf.gate.weight)
        block.experts.w13_weight.copy_(hf.experts.gate_up_proj)
        block.experts.w2_weight.copy_(hf.experts.down_proj)
    return block


def sglang_forward(block, x: torch.Tensor) -> torch.Tensor:
    """``forward_normal`` on one rank: router matmul, TopK, dispatch, the experts' MoE method."""
    router_logits, _ = block.gate(x)
    topk_output = block.topk(x, router_logits)
    dispatched = block.experts.dispatcher.dispatch(hidden_states=x, topk_output=topk_output)
    return block.experts.run_moe_core(dispatch_output=dispatched).hidden_states


def sglang_topk_ids(block, x: torch.Tensor) -> torch.Tensor:
    router_logits, _ = block.gate(x)
    return block.topk(x, router_logits).topk_ids.long()


# --- routing + experts + combine: patched SGLang == trainer, in any batch ---------------------------


def test_experts_patch_equals_the_trainer_block(sglang_in_process, gen):
    hf = hf_block(gen)
    sgl = sglang_block(hf)
    tokens = 96
    x = (2 * torch.randn(tokens, hf.gate.hidden_dim, generator=gen)).to(BF16)
    with torch.no_grad():
        original = hf(x[None])[0]  # HF's own block: bf16 weights, bf16 index_add_ combine
        trainer = prepared(hf)(x[None])[0]  # the trainer's view of a 96-token sequence
        with moe_patches_applied():
            whole = sglang_forward(sgl, x)
            chunks = torch.cat([sglang_forward(sgl, c) for c in x.split(16)])  # chunked prefill
            alone = torch.cat([sglang_forward(sgl, x[i : i + 1]) for i in range(tokens)])  # decode steps
            perm = torch.randperm(tokens, generator=gen)
            shuffled = torch.empty_like(x)
            shuffled[perm] = sglang_forward(sgl, x[perm])  # the tokens among other requests'
    for got in (whole, chunks, alone, shuffled):
        assert_bitwise(got, trainer)
    # Negative control: HF's own block (bf16 weights and accumulation) differs from the contract.
    differing = count_differing(original, trainer)
    assert differing > 0, describe_mismatch(original, trainer)


def test_route_renormalises_as_qwen3_does(gen):
    """Away from ties, the contract's top-2 experts and weights are HF's router's before HF rounds the
    weights to bf16: fp32 softmax, top-k, division by the top-k sum."""
    logits = (3 * torch.randn(500, 8, generator=gen)).to(BF16)
    weights, ids = moe.route(logits, 2, renormalize=True)
    unnormalised, _ = moe.route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, dtype=torch.float32, dim=-1)
    top3, top3_ids = torch.topk(probs, 3, dim=-1)
    untied = (top3[:, 0] != top3[:, 1]) & (top3[:, 1] != top3[:, 2])  # bf16 logits tie often
    assert int(untied.sum()) > 400
    top, top_ids = top3[untied, :2], top3_ids[untied, :2]
    assert torch.equal(ids[untied], top_ids)
    assert_bitwise(unnormalised[untied], top)
    assert_bitwise(weights[untied], top / top.sum(dim=-1, keepdim=True))
    # Negative control: the weights HF's router hands to its experts are rounded to bf16.
    assert count_differing(weights, weights.to(BF16).float()) > 0


# --- near-ties: both sides pick the same experts ----------------------------------------------------


def test_topk_patch_breaks_ties_like_the_trainer(sglang_in_process, gen):
    """Router rows 1, 3 and 5 are identical, so those experts' logits tie exactly for every token; a
    large norm puts them in the top-2 for about half the tokens. Both sides must pick experts 1 and 3
    there (ties to the lower index), and compute the same bits."""
    hf = hf_block(gen)
    with torch.no_grad():
        shared = 4 * torch.randn(hf.gate.hidden_dim, generator=gen)
        for e in (1, 3, 5):
            hf.gate.weight[e] = shared.to(BF16)
    sgl = sglang_block(hf)
    x = (2 * torch.randn(64, hf.gate.hidden_dim, generator=gen)).to(BF16)
    tied_on_top = F.linear(x, hf.gate.weight).float().argmax(-1) == 1  # argmax: first of the ties
    assert int(tied_on_top.sum()) >= 8
    with torch.no_grad():
        trainer = prepared(hf)(x[None])[0]
        _, trainer_ids = moe.route(F.linear(x, hf.gate.weight), 2, renormalize=True)
        with moe_patches_applied():
            server = sglang_forward(sgl, x)
            server_ids = sglang_topk_ids(sgl, x)
        own_server = sglang_forward(sgl, x)
        own_ids = sglang_topk_ids(sgl, x)
    assert torch.equal(trainer_ids[tied_on_top], torch.tensor([[1, 3]]).expand(int(tied_on_top.sum()), 2))
    assert torch.equal(server_ids, trainer_ids)
    assert_bitwise(server, trainer)
    # Negative control: SGLang's own torch.topk picks other tied experts, so the outputs differ.
    other_choice = int((own_ids != trainer_ids).any(-1).sum())
    assert other_choice > 0, "torch.topk happened to break every tie like the contract"
    assert count_differing(own_server, trainer) > 0


def test_route_near_ties_rank_by_value_then_index():
    """Hand-made rows: exact ties go to the lower expert index; one bf16 ulp apart, value wins."""
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    rows = torch.tensor(
        [
            [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0],  # three tied on top -> 1, 3
            [0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 1.5, 0.0],  # two tied on top -> 2, 6
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0],  # one on top, seven tied below -> 7, 0
            [0.0] * 8,  # all tied -> 0, 1
            [0.0, 0.0, 1.0, 0.0, 0.0, 1.0 + ulp, 0.0, 0.0],  # near tie: 5 is one ulp above 2 -> 5, 2
        ]
    ).to(BF16)
    want = torch.tensor([[1, 3], [2, 6], [7, 0], [0, 1], [5, 2]])
    _, ids = moe.route(rows, 2, renormalize=True)
    assert torch.equal(ids, want)
    # The SGLang hook returns exactly the contract's routing.
    _, hook_ids = moe_patches.fused_topk_native(torch.zeros(5, 4), rows, 2, True)
    assert torch.equal(hook_ids, want)
    # Negative control: torch.topk (SGLang's and HF's top-k) breaks some of these ties otherwise.
    _, topk_ids = torch.topk(torch.softmax(rows, dtype=torch.float32, dim=-1), 2, dim=-1)
    assert not torch.equal(topk_ids, want)


# --- backward ------------------------------------------------------------------------------------


def test_moe_backward_matches_finite_differences(gen):
    """float64 ``gradcheck`` of the whole contract block (router matmul included) with respect to the
    input, the router weight and both expert weight tensors, renormalised and not."""
    tokens, hidden, inter, experts = 6, 8, 4, 4
    args = [
        torch.randn(tokens, hidden, generator=gen, dtype=torch.float64),
        torch.randn(experts, hidden, generator=gen, dtype=torch.float64),
        torch.randn(experts, 2 * inter, hidden, generator=gen, dtype=torch.float64),
        torch.randn(experts, hidden, inter, generator=gen, dtype=torch.float64),
    ]
    for renormalize in (True, False):

        def block(x, router, w13, w2, renormalize=renormalize):
            return moe.sparse_moe(x, F.linear(x, router), w13, w2, 2, renormalize)

        assert torch.autograd.gradcheck(block, [a.clone().requires_grad_() for a in args])


def _float64_reference(x, router, w13, w2, ids, top_k):
    """An independent dense float64 Qwen3-MoE block: every token through its routed experts, weights
    renormalised; the expert choice ``ids`` (a discrete decision, not differentiated) is given."""
    probs = torch.softmax(x @ router.T, dim=-1)
    weights = probs.gather(1, ids)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for j in range(top_k):
        gate_up = torch.einsum("th,toh->to", x, w13[ids[:, j]])
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.einsum("ti,thi->th", F.silu(gate) * up, w2[ids[:, j]])
        out = out + weights[:, j, None] * y
    return out


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def test_trainer_block_gradients_match_a_float64_reference(gen):
    """The prepared bf16 block's gradients to the router, both expert tensors and the input, against
    the float64 reference at the same (bf16-valued) weights and routing. bf16 and float64 gradients
    are different numbers, so this correctness check has a bound (2% relative, Frobenius); the
    negative control shows the bound catches a router that gets no gradient."""
    hf = prepared(hf_block(gen))
    tokens = 64
    x = (2 * torch.randn(1, tokens, hf.gate.hidden_dim, generator=gen)).to(BF16).requires_grad_()
    upstream = torch.randn(1, tokens, hf.gate.hidden_dim, generator=gen)
    (hf(x).float() * upstream).sum().backward()
    params = (hf.gate.weight, hf.experts.gate_up_proj, hf.experts.down_proj)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x[0], *params)]
    _, ids = moe.route(F.linear(x[0].detach(), hf.gate.weight.detach()), hf.gate.top_k, True)
    ref = _float64_reference(*ref_inputs, ids, hf.gate.top_k)
    (ref * upstream[0].double()).sum().backward()
    for name, got, want in zip(("input", "router", "w13", "w2"), (x, *params), ref_inputs, strict=True):
        grad = got.grad[0] if name == "input" else got.grad
        assert _relative_error(grad, want.grad) < 0.02, (name, _relative_error(grad, want.grad))
    # Negative control: the same check fails for a block whose router gets no gradient.
    router = hf.gate.weight.detach().requires_grad_()
    weights, ids = moe.route(F.linear(x[0].detach(), router), hf.gate.top_k, True)
    out = moe.experts(x[0].detach(), weights.detach(), ids, *params[1:])
    (out.float() * upstream[0]).sum().backward()
    missing = torch.zeros_like(router) if router.grad is None else router.grad
    assert _relative_error(missing, ref_inputs[1].grad) >= 0.99


# --- what is refused ------------------------------------------------------------------------------


def test_router_aux_loss_is_refused(gen):
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen3_moe")
    config.num_hidden_layers = 1
    model = AutoModelForCausalLM.from_config(config, dtype=BF16)
    model.config.output_router_logits = True
    with pytest.raises(UnsupportedModelError, match="output_router_logits"):
        prepare_model(model)
    model.config.output_router_logits = False
    prepare_model(model)
    ids = torch.randint(3, config.vocab_size, (1, 5), generator=gen)
    with torch.no_grad():
        model(input_ids=ids)  # the contract's forward runs
        with pytest.raises(UnsupportedModelError, match="output_router_logits"):
            model(input_ids=ids, output_router_logits=True)


def test_other_moe_architectures_are_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="qwen2_moe"):
        prepare_model(AutoModelForCausalLM.from_config(config))


def test_server_hooks_refuse_outside_the_contract(sglang_in_process):
    import types

    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

    logits = torch.zeros(3, 8)
    with pytest.raises(NotImplementedError, match="moe_topk"):
        moe_patches.fused_topk_native(logits, logits, 2, True, scoring_func="sigmoid")
    with pytest.raises(NotImplementedError, match="moe_topk"):
        moe_patches.fused_topk_native(logits, logits, 2, True, correction_bias=torch.zeros(8))
    w13, w2 = torch.zeros(8, 8, 4, dtype=BF16), torch.zeros(8, 4, 4, dtype=BF16)
    layer = types.SimpleNamespace(w13_weight=w13, w2_weight=w2, moe_tp_size=1, moe_ep_size=1)
    topk_output = (torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int64), logits)
    x = torch.zeros(3, 4, dtype=BF16)
    refused = [
        (layer, MoeRunnerConfig(activation="gelu")),
        (layer, MoeRunnerConfig(routed_scaling_factor=2.5)),
        (types.SimpleNamespace(**{**vars(layer), "moe_tp_size": 2}), MoeRunnerConfig()),
        (types.SimpleNamespace(**{**vars(layer), "w13_weight_bias": torch.zeros(8, 8)}), MoeRunnerConfig()),
        (types.SimpleNamespace(**{**vars(layer), "w13_weight": w13.to(torch.uint8)}), MoeRunnerConfig()),
    ]
    for bad_layer, config in refused:
        with pytest.raises(NotImplementedError, match="moe_experts"):
            moe_patches.moe_forward_native(bad_layer, x, topk_output, config)
    assert moe_patches.moe_forward_native(layer, x, topk_output, MoeRunnerConfig()).shape == x.shape


# --- the GPU form of the contract (parity.ops.moe_experts, MOE_GPU_PATCHES), checked on the CPU ------


def _random_layer(gen, tokens, hidden, experts, inter, dtype=BF16):
    x = (2 * torch.randn(tokens, hidden, generator=gen)).to(dtype)
    router = (0.2 * torch.randn(experts, hidden, generator=gen)).to(dtype)
    w13 = (0.2 * torch.randn(experts, 2 * inter, hidden, generator=gen)).to(dtype)
    w2 = (0.2 * torch.randn(experts, hidden, inter, generator=gen)).to(dtype)
    return x, router, w13, w2


def test_gpu_experts_op_on_the_cpu_is_the_cpu_contract(gen):
    """Off the kernel path (CPU tensors, no interpreter) ``parity.ops.moe_experts`` is
    ``parity.moe`` bit for bit (both implementations), and its gradients are autograd's of
    ``parity.moe`` within bf16 rounding."""
    from parity.ops import moe_experts as me

    x, router, w13, w2 = _random_layer(gen, 96, 128, 8, 64)
    params = [t.requires_grad_() for t in (x, router, w13, w2)]
    upstream = torch.randn(96, 128, generator=gen)
    want = moe.sparse_moe(x, F.linear(x, router), w13, w2, 2, True)
    want_grads = torch.autograd.grad((want.float() * upstream).sum(), params)
    for impl in me.IMPLS:
        got = me.sparse_moe_block(x, router, w13, w2, 2, True, impl=impl)
        assert_bitwise(got, want)
        grads = torch.autograd.grad((got.float() * upstream).sum(), params)
        for name, g, w in zip(("input", "router", "w13", "w2"), grads, want_grads, strict=True):
            assert _relative_error(g, w.double()) < 1e-2, (impl, name)
    for tokens in (0, 1, 5):  # no tokens (an idle rank), one, a few
        sub = me.sparse_moe_block(x[:tokens], router, w13, w2, 2, True)
        assert_bitwise(sub, want[:tokens])


def test_gpu_experts_op_backward_matches_finite_differences(gen):
    """float64 ``gradcheck`` of the GPU block's custom backward (the expert projections'
    ``autograd.Function``, the router's), on the CPU."""
    from parity.ops import moe_experts as me

    args = [
        torch.randn(7, 8, generator=gen, dtype=torch.float64),
        torch.randn(5, 8, generator=gen, dtype=torch.float64),
        torch.randn(5, 8, 8, generator=gen, dtype=torch.float64),
        torch.randn(5, 8, 4, generator=gen, dtype=torch.float64),
    ]
    for renormalize in (True, False):

        def block(x, router, w13, w2, renormalize=renormalize):
            return me.sparse_moe_block(x, router, w13, w2, 2, renormalize)

        assert torch.autograd.gradcheck(block, [a.clone().requires_grad_() for a in args])


def test_gpu_patch_targets_exist_with_the_expected_signatures(sglang_in_process):
    """``MOE_GPU_PATCHES`` apply to the installed SGLang (the GPU modules' Python source is importable
    on the CPU), sit in ``GPU_PATCHES``, and hook the functions the GPU path calls."""
    import inspect

    from sglang.srt.layers.moe import topk
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    from server_patches.gpu_patches import GPU_PATCHES
    from server_patches.moe_patches import MOE_GPU_PATCHES

    for patch in MOE_GPU_PATCHES:
        patch.check()
        assert patch in GPU_PATCHES
        assert patch.proof.startswith("tests/test_moe_gpu.py::")
    # the GPU path: TopK.forward_cuda -> select_experts -> fused_topk (the module global);
    # FusedMoE.forward_impl -> run_moe_core -> quant_method.apply -> forward_cuda
    assert "select_experts(" in inspect.getsource(topk.TopK.forward_cuda)
    assert "fused_topk(" in inspect.getsource(topk.select_experts)
    assert "self.run_moe_core(" in inspect.getsource(FusedMoE.forward_impl)
    assert "quant_method.apply(" in inspect.getsource(FusedMoE.run_moe_core)
    assert "forward_cuda" in UnquantizedFusedMoEMethod.__dict__
    # a target that is not there is refused with the patch's name
    from server_patches.patch import Patch
    from server_patches.targets import PatchTargetError

    missing = Patch(**{**vars(MOE_GPU_PATCHES[1]), "target": f"{FusedMoE.__module__}.FusedMoE.run_moe_kore"})
    with pytest.raises(PatchTargetError, match="moe_experts_cuda"):
        missing.check()
    renamed = Patch(**{**vars(MOE_GPU_PATCHES[0]), "expected_params": ("hidden_states", "gating_output")})
    with pytest.raises(PatchTargetError, match="signature changed"):
        renamed.check()


def test_gpu_hooks_refuse_outside_the_contract(sglang_in_process, gen):
    """The GPU hooks' refusals, on SGLang's real (CPU-built) MoE layer: its own configuration passes;
    each unsupported variant raises ``NotImplementedError`` naming the patch. CPU tensors go to
    SGLang's own path untouched."""

    from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatchOutput
    from sglang.srt.layers.moe.topk import StandardTopKOutput, StandardTopKOutputPacked

    sgl = sglang_block(hf_block(gen))
    layer = sgl.experts
    x = (2 * torch.randn(5, layer.hidden_size, generator=gen)).to(BF16)
    logits = torch.randn(5, layer.num_experts, generator=gen).to(BF16)
    weights, ids = moe_patches.fused_topk(x, logits, 2, True)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), moe.route(logits, 2, True)[1])
    topk_output = StandardTopKOutput(weights, ids, logits)
    ok = StandardDispatchOutput(hidden_states=x, hidden_states_scale=None, topk_output=topk_output)
    moe_patches._check_cuda_moe(layer, ok)  # SGLang's own Qwen3-MoE layer is inside the contract

    def refused(what, dispatch=ok, **changes):
        owners = {"layer": layer, "method": layer.quant_method, "config": layer.moe_runner_config}
        saved = []
        try:
            for path, value in changes.items():
                owner, attr = path.rsplit(".", 1) if "." in path else ("layer", path)
                saved.append((owners[owner], attr, getattr(owners[owner], attr)))
                setattr(owners[owner], attr, value)
            with pytest.raises(NotImplementedError, match=f"moe_experts_cuda.*{what}"):
                moe_patches._check_cuda_moe(layer, dispatch)
        finally:
            for owner, attr, value in reversed(saved):
                setattr(owner, attr, value)
        moe_patches._check_cuda_moe(layer, ok)  # restored

    refused("MoE method", quant_method=torch.nn.Module())  # e.g. a quantized method
    refused("runner backend", **{"method.use_flashinfer_cutlass": True})
    refused("runner backend", **{"method._aiter_runner": object()})
    refused("expert variant", **{"config.routed_scaling_factor": 2.5})
    refused("expert variant", **{"config.activation": "gelu"})
    refused("no_combine", **{"config.no_combine": True})
    refused("MoE TP", moe_ep_size=2)
    refused("quantized", w13_weight=torch.nn.Parameter(layer.w13_weight.to(torch.float8_e4m3fn), False))
    refused("redundant", num_experts=layer.num_experts + 1)
    refused("routing", dispatch=ok._replace(topk_output=StandardTopKOutputPacked(weights, ids, logits, ids)))
    refused("scaled", dispatch=ok._replace(hidden_states_scale=torch.ones(5)))
    refused("activations", dispatch=ok._replace(hidden_states=x.float()))
    with pytest.raises(NotImplementedError, match="moe_topk_cuda"):
        moe_patches.fused_topk(x, logits, 2, True, scoring_func="sigmoid")
    with pytest.raises(NotImplementedError, match="moe_topk_cuda"):
        moe_patches.fused_topk(x, logits, 2, True, correction_bias=torch.zeros(8))
    with pytest.raises(NotImplementedError, match="moe_topk_cuda"):
        moe_patches.fused_topk(x, logits, 2, True, packed_out=torch.zeros(5, 2, dtype=torch.int32))
    # CPU tensors: the hook hands the call to SGLang's own path
    seen = []
    assert moe_patches.fused_moe_run_core(lambda *a: seen.append(a) or "own", layer, ok) == "own"
    assert seen == [(layer, ok)]


# The grouped kernel and the per-expert loop under the Triton interpreter (a child Python: the
# interpreter must be chosen before triton.jit decorates the kernels).


def _interpreter_checks():

    from parity.ops import batch_invariant_matmul as bim
    from parity.ops import moe_experts as me

    assert bim._interpreting()

    me._empty = bim._empty = nan_empty
    g = torch.Generator().manual_seed(0)
    # odd sizes: 2I = 160 (two N tiles, one partial), K = 96 and 80 (partial K blocks)
    x, router, w13, w2 = _random_layer(g, 150, 96, 4, 80)
    for impl in me.IMPLS:
        full = me.sparse_moe_block(x, router, w13, w2, 2, True, impl=impl)
        assert not torch.isnan(full.float()).any(), "unwritten (poisoned) rows"
        alone = torch.cat(
            [me.sparse_moe_block(x[i : i + 1], router, w13, w2, 2, True, impl=impl) for i in range(4)]
        )
        assert_bitwise(alone, full[:4])
        perm = torch.randperm(150, generator=g)
        shuffled = torch.empty_like(full)
        shuffled[perm] = me.sparse_moe_block(x[perm], router, w13, w2, 2, True, impl=impl)
        assert_bitwise(shuffled, full)
        if impl == "grouped":
            grouped = full
    assert_bitwise(grouped, full)  # grouped == loop
    _, ids = moe.route(me.router_linear(x, router), 2, True)
    counts = torch.bincount(ids.reshape(-1), minlength=4)
    assert int(counts.max()) > 64, counts  # some expert spans two M tiles
    # many experts, few rows: spare tiles, empty experts between busy ones
    x, router, w13, w2 = _random_layer(g, 3, 64, 40, 32)
    a = me.sparse_moe_block(x, router, w13, w2, 4, True, impl="grouped")
    assert_bitwise(a, me.sparse_moe_block(x, router, w13, w2, 4, True, impl="loop"))
    assert me.expert_layout(moe.route(me.router_linear(x, router), 4, True)[1], 40).num_tiles == 1 + 12
    # the backward through the grouped forward is the loop's
    x, router, w13, w2 = (t.requires_grad_() for t in _random_layer(g, 40, 64, 4, 32))
    upstream = torch.randn(40, 64, generator=g)
    grads = {}
    for impl in me.IMPLS:
        out = me.sparse_moe_block(x, router, w13, w2, 2, True, impl=impl)
        grads[impl] = torch.autograd.grad((out.float() * upstream).sum(), (x, router, w13, w2))
    for got, want in zip(grads["grouped"], grads["loop"], strict=True):
        assert_bitwise(got, want)
    # ... and close to autograd's through the CPU contract (F.linear): the custom backward is right
    out = moe.sparse_moe(x, F.linear(x, router), w13, w2, 2, True)
    cpu_grads = torch.autograd.grad((out.float() * upstream).sum(), (x, router, w13, w2))
    for got, want in zip(grads["grouped"], cpu_grads, strict=True):
        assert _relative_error(got, want.double()) < 2e-2
    print("moe interpreter checks passed", flush=True)


def test_grouped_kernel_equals_the_loop_under_the_triton_interpreter():
    """The grouped Triton kernel and the per-expert batch-invariant kernel under the interpreter:
    the same bits as each other, a token's bits alone == in a shuffled batch of 150 (an expert over
    two tiles, partial N and K tiles, poisoned outputs), spare tiles, and the same gradients."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    code = "from tests.test_moe_contract import _interpreter_checks; _interpreter_checks()"
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "moe interpreter checks passed" in proc.stdout
