"""The GPU MoE contract (``parity.ops.moe_experts``, ``MOE_GPU_PATCHES``, ``parity.gpu_contract``) on a
CUDA device (skipped without one).

- a token's MoE output is bitwise the same alone, among 1..512 random other tokens, in any order, and
  among hundreds of near-copies that fill its own experts (several tiles each), for both
  implementations (grouped Triton kernel and per-expert loop), which agree bit for bit;
- SGLang's real Qwen3-MoE block on the GPU, with the plugin's GPU patches, computes the trainer's
  block bitwise (whole batch, 16-token chunks, one token at a time, shuffled); unpatched it differs;
- near-tie routing: both sides pick the same experts (ties to the lower index);
- negative control: the plain per-expert loop with cuBLAS ``F.linear`` depends on the batch;
- gradients of the GPU block against a float64 reference (a bound: not part of the contract);
- a Qwen3-MoE decode loop over HF's KV cache == one full forward, bitwise, under the GPU contract.

SGLang's layers run in this process as in ``Qwen3MoeSparseMoeBlock.forward_normal`` on one rank
(router ``gate``, ``select_experts`` as ``TopK.forward_cuda`` calls it, the dispatcher,
``FusedMoE.run_moe_core``), minus the symmetric-memory and tensor-parallel group contexts, which need
an initialised process group and change no numbers on one rank.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from parity import moe
from parity.ops import batch_invariant_matmul as bim
from parity.ops import moe_experts as me
from parity.tiny_models import build_tiny_model, load_hf_model, tiny_config
from server_patches.gpu_patches import GPU_PATCHES
from server_patches.moe_patches import MOE_GPU_PATCHES
from tests.helpers import assert_same_bits, count_differing, nan_empty

pytestmark = pytest.mark.gpu

DEV = "cuda"
BF16 = torch.bfloat16
# Qwen3-30B-A3B's MoE layer
HIDDEN, EXPERTS, TOP_K, INTER = 2048, 128, 8, 768


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(me, "_empty", nan_empty)
    monkeypatch.setattr(bim, "_empty", nan_empty)


def layer_weights(seed: int, hidden=HIDDEN, experts=EXPERTS, inter=INTER):
    g = torch.Generator(device=DEV).manual_seed(seed)
    router = (torch.randn(experts, hidden, generator=g, device=DEV) * hidden**-0.5).to(BF16)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g, device=DEV) * hidden**-0.5).to(BF16)
    w2 = (torch.randn(experts, hidden, inter, generator=g, device=DEV) * inter**-0.5).to(BF16)
    return router, w13, w2


def block(x, weights, impl=None):
    with torch.no_grad():
        return me.sparse_moe_block(x, *weights, TOP_K, True, impl=impl)


# --- batch invariance -------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", me.IMPLS)
def test_a_token_does_not_depend_on_its_batch(poison, impl):
    weights = layer_weights(0)
    g = torch.Generator(device=DEV).manual_seed(1)
    pool = torch.randn(4096, HIDDEN, generator=g, device=DEV).to(BF16)
    probes = pool[:8]
    alone = torch.cat([block(p[None], weights, impl) for p in probes])
    assert not torch.isnan(alone.float()).any(), "unwritten (poisoned) outputs"
    for n in (1, 2, 3, 7, 16, 64, 129, 512):
        others = pool[8 + torch.randperm(4088, generator=g, device=DEV)[:n]]
        batch = torch.cat([others, probes])
        perm = torch.randperm(n + 8, generator=g, device=DEV)
        out = torch.empty_like(batch)
        out[perm] = block(batch[perm], weights, impl)  # the probes at random places among the others
        assert_same_bits(out[n:], alone, f"{impl}: 8 tokens among {n} others, shuffled")
    assert_same_bits(block(pool, weights, impl)[:8], alone, f"{impl}: 8 tokens among 4088 others")
    # the probe's own experts crowded: 300 near-copies route (mostly) where it does, so its experts get
    # several 64-row tiles and the probe sits in the middle of one
    for i in range(2):
        crowd = (probes[i] + 2**-6 * torch.randn(300, HIDDEN, generator=g, device=DEV)).to(BF16)
        batch = torch.cat([crowd[:150], probes[i : i + 1], crowd[150:]])
        _, ids = moe.route(me.router_linear(batch, weights[0]), TOP_K, True)
        shared = (ids[:, :, None] == ids[150][None, None, :]).any(1).sum(0)
        assert int(shared.min()) > 64, f"the crowd should fill the probe's experts: {shared.tolist()}"
        assert_same_bits(block(batch, weights, impl)[150:151], alone[i : i + 1], f"{impl}: crowded experts")


def test_grouped_kernel_equals_the_per_expert_loop(poison):
    """The two implementations of the contract give the same bits (the grouped kernel runs the
    batch-invariant kernel's K loop with its tiles). Should this ever fail on a GPU, the grouped
    kernel (DEFAULT_IMPL, what server and trainer both run) is the contract and the loop is not."""
    weights = layer_weights(2)
    g = torch.Generator(device=DEV).manual_seed(3)
    for tokens in (1, 5, 64, 1000, 4096):
        x = torch.randn(tokens, HIDDEN, generator=g, device=DEV).to(BF16)
        assert_same_bits(block(x, weights, "grouped"), block(x, weights, "loop"), f"{tokens} tokens")


def test_negative_control_the_cublas_expert_loop_depends_on_the_batch():
    """Why the op exists: ``parity.moe.experts`` (the CPU contract: per-expert ``F.linear``) on the GPU
    gives a token other bits alone than in a batch of 4096 (cuBLAS picks its kernel by rows). Measured
    on an H200: at Qwen3-30B-A3B's shapes (hidden 2048, moe_intermediate 768) cuBLAS happened to give
    the same bits for 1 and ~256 rows per expert; larger experts are checked here."""
    total = 0
    for hidden, inter in ((4096, 1536), (7168, 2048)):
        router, w13, w2 = layer_weights(4, hidden=hidden, experts=16, inter=inter)
        g = torch.Generator(device=DEV).manual_seed(5)
        x = torch.randn(4096, hidden, generator=g, device=DEV).to(BF16)
        with torch.no_grad():
            weights, ids = moe.route(me.router_linear(x, router), TOP_K, True)
            full = moe.experts(x, weights, ids, w13, w2)
            alone = torch.cat(
                [moe.experts(x[i : i + 1], weights[i : i + 1], ids[i : i + 1], w13, w2) for i in range(16)]
            )
        differing = count_differing(alone, full[:16])
        print(f"cuBLAS expert loop, hidden {hidden} inter {inter}: {differing} of {alone.numel()} elements "
              "differ alone vs in 4096 tokens")  # fmt: skip
        total += differing
    assert total > 0


# --- server (patched SGLang) == trainer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sglang_cuda(model_cache):
    """SGLang's layers in this process on the GPU (no engine): global server args for a CUDA server."""
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    path = build_tiny_model("qwen3_moe", cache_dir=model_cache)
    set_global_server_args_for_scheduler(
        ServerArgs(model_path=str(path), device="cuda", skip_tokenizer_init=True)
    )


@contextlib.contextmanager
def gpu_moe_patches_applied():
    """The plugin's router-matmul and MoE GPU patches, applied through SGLang's HookRegistry, then
    reverted."""
    patches = [p for p in GPU_PATCHES if p.name == "linear_batch_invariant"] + list(MOE_GPU_PATCHES)
    for patch in patches:
        patch.apply()
    try:
        yield
    finally:
        for patch in patches:
            patch.revert()


def moe_config(**overrides):
    return tiny_config("qwen3_moe", overrides or None)


def hf_block(seed: int, config):
    """HF's Qwen3-MoE sparse block (bf16, on the GPU) with random weights, routed through the GPU
    contract as ``parity.gpu_contract.prepare_model`` does."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from parity.gpu_contract import prepare_moe_blocks_cuda

    torch.manual_seed(seed)
    block = Qwen3MoeSparseMoeBlock(config).to(BF16).to(DEV)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn_like(param, dtype=torch.float32) * param.shape[-1] ** -0.5)
    holder = torch.nn.Module()
    holder.block = block
    assert prepare_moe_blocks_cuda(holder) == 1
    return block


def sglang_block(hf):
    """SGLang's Qwen3MoeSparseMoeBlock on the GPU holding ``hf``'s weights."""
    from sglang.srt.model_loader.utils import set_default_torch_dtype
    from sglang.srt.models.qwen3_moe import Qwen3MoeSparseMoeBlock
    from sglang.srt.runtime_context import get_parallel

    parallel = dict(moe_tp_size=1, moe_tp_rank=0, moe_ep_size=1, moe_ep_rank=0)
    with get_parallel().override(**parallel), set_default_torch_dtype(BF16), torch.device(DEV):
        block = Qwen3MoeSparseMoeBlock(layer_id=0, config=hf.experts.config)
    with torch.no_grad():
        block.gate.weight.copy_(hf.gate.weight)
        block.experts.w13_weight.copy_(hf.experts.gate_up_proj)
        block.experts.w2_weight.copy_(hf.experts.down_proj)
    return block


def sglang_topk(block, x):
    from sglang.srt.layers.moe.topk import select_experts

    router_logits, _ = block.gate(x)
    config = block.topk.topk_config
    config.torch_native = False  # as TopK.forward_cuda sets it
    return select_experts(hidden_states=x, router_logits=router_logits, topk_config=config, layer_id=0)


def sglang_forward(block, x):
    """``forward_normal`` on one rank: router matmul, the CUDA top-k, dispatch, the MoE core."""
    with torch.no_grad():
        topk_output = sglang_topk(block, x)
        dispatched = block.experts.dispatcher.dispatch(hidden_states=x, topk_output=topk_output)
        return block.experts.run_moe_core(dispatch_output=dispatched).hidden_states


def test_server_hooks_equal_the_trainer_block(sglang_cuda):
    config = moe_config(hidden_size=1024, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8)
    hf = hf_block(0, config)
    sgl = sglang_block(hf)
    tokens = 300
    g = torch.Generator(device=DEV).manual_seed(6)
    x = torch.randn(tokens, config.hidden_size, generator=g, device=DEV).to(BF16)
    with torch.no_grad():
        trainer = hf(x[None])[0]  # the trainer's view of a 300-token sequence
    own = sglang_forward(sgl, x.clone())  # SGLang's own top-k and fused_experts (in place: a copy)
    with gpu_moe_patches_applied():
        whole = sglang_forward(sgl, x)
        chunks = torch.cat([sglang_forward(sgl, c) for c in x.split(16)])  # chunked prefill
        alone = torch.cat([sglang_forward(sgl, x[i : i + 1]) for i in range(64)])  # decode steps
        perm = torch.randperm(tokens, generator=g, device=DEV)
        shuffled = torch.empty_like(x)
        shuffled[perm] = sglang_forward(sgl, x[perm])  # among other requests' tokens
    assert_same_bits(whole, trainer, "patched SGLang, whole batch")
    assert_same_bits(chunks, trainer, "patched SGLang, 16-token chunks")
    assert_same_bits(alone, trainer[:64], "patched SGLang, one token at a time")
    assert_same_bits(shuffled, trainer, "patched SGLang, shuffled")
    # Negative control: SGLang's own GPU MoE (topk_softmax + Triton fused_experts, bf16 combine) differs.
    differing = count_differing(own, trainer)
    print(f"unpatched SGLang GPU MoE vs trainer: {differing} of {own.numel()} differ")
    assert differing > 0


def test_near_ties_route_alike_on_both_sides(sglang_cuda):
    """Router rows 1, 3 and 5 identical: those experts' logits tie exactly for every token, and a
    large norm puts them on top for about half the tokens. Both sides pick experts 1 and 3 there."""
    config = moe_config()  # 8 experts, top-2
    hf = hf_block(1, config)
    g = torch.Generator(device=DEV).manual_seed(7)
    with torch.no_grad():
        shared = 4 * torch.randn(config.hidden_size, generator=g, device=DEV)
        for e in (1, 3, 5):
            hf.gate.weight[e] = shared.to(BF16)
    sgl = sglang_block(hf)
    x = (2 * torch.randn(256, config.hidden_size, generator=g, device=DEV)).to(BF16)
    with torch.no_grad():
        logits = me.router_linear(x, hf.gate.weight)
        tied_on_top = logits.float().argmax(-1) == 1  # argmax: the first of the ties
        assert int(tied_on_top.sum()) >= 16
        _, trainer_ids = moe.route(logits, 2, renormalize=True)
        trainer = hf(x[None])[0]
        own_ids = sglang_topk(sgl, x).topk_ids.long()
        with gpu_moe_patches_applied():
            server_ids = sglang_topk(sgl, x).topk_ids.long()
            server = sglang_forward(sgl, x)
    want = torch.tensor([[1, 3]], device=DEV).expand(int(tied_on_top.sum()), 2)
    assert torch.equal(trainer_ids[tied_on_top], want)
    assert torch.equal(server_ids, trainer_ids)
    assert_same_bits(server, trainer, "patched SGLang with tied router rows")
    other = int((own_ids != trainer_ids).any(-1).sum())
    print(f"SGLang's own CUDA top-k chose other tied experts for {other} of {len(x)} tokens")
    # hand-made rows: exact ties to the lower index, one bf16 ulp apart the value wins
    ulp = 2.0**-7
    rows = torch.tensor(
        [
            [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.5, 0.0, 0.0, 0.0, 1.5, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0],
            [0.0] * 8,
            [0.0, 0.0, 1.0, 0.0, 0.0, 1.0 + ulp, 0.0, 0.0],
        ],
        device=DEV,
    ).to(BF16)
    from server_patches import moe_patches

    _, hook_ids = moe_patches.fused_topk(rows, rows, 2, True)
    assert hook_ids.dtype == torch.int32
    assert torch.equal(hook_ids.long().cpu(), torch.tensor([[1, 3], [2, 6], [7, 0], [0, 1], [5, 2]]))


# --- backward -----------------------------------------------------------------------------------------


def test_gpu_block_gradients_match_a_float64_reference():
    """Gradients of the GPU contract block (grouped kernel forward, F.linear's backward) to the input,
    router, w13 and w2 against the float64 reference of tests/test_moe_contract.py at the same
    routing: within 2% (relative, Frobenius); a router without gradient fails the same bound."""
    from tests.test_moe_contract import _float64_reference, _relative_error

    hidden, experts, top_k, inter, tokens = 256, 16, 4, 128, 512
    router, w13, w2 = (t.requires_grad_() for t in layer_weights(8, hidden, experts, inter))
    g = torch.Generator(device=DEV).manual_seed(9)
    x = torch.randn(tokens, hidden, generator=g, device=DEV).to(BF16).requires_grad_()
    upstream = torch.randn(tokens, hidden, generator=g, device=DEV)
    out = me.sparse_moe_block(x, router, w13, w2, top_k, True)
    (out.float() * upstream).sum().backward()
    params = (router, w13, w2)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, *params)]
    _, ids = moe.route(me.router_linear(x.detach(), router.detach()), top_k, True)
    ref = _float64_reference(*ref_inputs, ids, top_k)
    (ref * upstream.double()).sum().backward()
    for name, got, want in zip(("input", "router", "w13", "w2"), (x, *params), ref_inputs, strict=True):
        err = _relative_error(got.grad, want.grad)
        print(f"{name}: relative gradient error {err:.2e}")
        assert err < 0.02, (name, err)
    # Negative control: a router that gets no gradient (weights detached before the experts) fails.
    assert _relative_error(torch.zeros_like(router), ref_inputs[1].grad) >= 0.99


# --- end to end on the trainer side -------------------------------------------------------------------


def _decode_loop_vs_full(model, ids, prompt):
    with torch.no_grad():
        full = model(input_ids=ids).logits[0]
        out = model(input_ids=ids[:, :prompt], use_cache=True)
        rows, cache = [out.logits[0]], out.past_key_values
        for t in range(prompt, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            rows.append(out.logits[0])
    return torch.cat(rows), full


def test_qwen3_moe_decode_loop_equals_one_full_forward(model_cache):
    """A Qwen3-MoE (4 layers, hidden 1024, 64 experts, top-8) under ``prepare_model(device="cuda")``:
    a 32-token prefill then 96 one-token steps over HF's KV cache give logits (and logprobs) bitwise
    those of one full forward. Negative control: the same checkpoint in plain HF drifts."""
    from parity.gpu_contract import prepare_model
    from parity.logprobs import token_logprobs

    overrides = dict(
        hidden_size=1024, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
    )  # fmt: skip
    path = build_tiny_model("qwen3_moe", cache_dir=model_cache, overrides=overrides)
    model = prepare_model(load_hf_model(path, device=DEV), device="cuda")
    ids = torch.randint(3, 1024, (1, 32 + 96), generator=torch.Generator().manual_seed(0)).to(DEV)
    loop, full = _decode_loop_vs_full(model, ids, 32)
    assert_same_bits(loop, full, "logits: decode loop vs full forward (GPU MoE contract)")
    tok = ids[0, 1:]
    assert_same_bits(token_logprobs(loop[:-1], tok, 1.0), token_logprobs(full[:-1], tok, 1.0), "logprobs")
    # Negative control: the same checkpoint in plain HF (SDPA attention, cuBLAS linears, HF's MoE loop)
    # drifts. (At this size the cuBLAS expert loop alone happens to give the same bits for 1 and ~16
    # rows per expert; the per-expert control is
    # test_negative_control_the_cublas_expert_loop_depends_on_the_batch.)
    plain = load_hf_model(path, device=DEV)
    loop, full = _decode_loop_vs_full(plain, ids, 32)
    drift = count_differing(loop, full)
    print(f"plain HF Qwen3-MoE: {drift} of {loop.numel()} logits differ between decode loop and full forward")
    assert drift > 0
