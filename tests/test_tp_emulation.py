"""The trainer's TP=k emulation (``parity.tp``) in one process: the switch, what it computes, what it
leaves alone, that it trains, and that attention is TP-agnostic (a rank's heads alone give the same
rows). The multi-process proofs against gloo are tests/test_tp_gloo.py; end to end against a TP=2
SGLang server, tests/test_tp_server.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from parity import contract
from parity.tiny_models import build_tiny_model, load_hf_model
from parity.tp import (
    UnsupportedTensorParallelError,
    emulate_tensor_parallel,
    emulated_tp_size,
    rank_order_sum,
    row_parallel_linear,
    shard_bounds,
)
from parity.trainer import prepare_model
from tests.helpers import describe_mismatch

BF16 = torch.bfloat16


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def qwen3(hf_qwen3):
    return prepare_model(copy.deepcopy(hf_qwen3))


def test_row_parallel_linear_is_rank_partials_summed_in_rank_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 256, generator=g).to(BF16)
    w = (torch.randn(64, 256, generator=g) / 16).to(BF16)
    b = torch.randn(64, generator=g).to(BF16)
    for k in (2, 4):
        parts = [F.linear(x[..., a:e].contiguous(), w[:, a:e].contiguous(), b if r == 0 else None)
                 for r, (a, e) in enumerate(shard_bounds(256, k))]  # fmt: skip
        acc = parts[0].float()
        for p in parts[1:]:
            acc = acc + p.float()
        assert torch.equal(row_parallel_linear(x, w, b, k), acc.to(BF16))
        assert torch.equal(rank_order_sum(parts), acc.to(BF16))
    assert torch.equal(row_parallel_linear(x, w, b, 1), F.linear(x, w, b))


def test_switch_patches_only_dense_row_parallel_layers_and_restores(qwen3):
    ids = [5, 9, 300, 17, 2, 44, 8, 1000, 3]
    plain = logits(qwen3, ids)
    emulate_tensor_parallel(qwen3, 2)
    try:
        assert emulated_tp_size(qwen3) == 2
        switched = sorted(n for n, m in qwen3.named_modules() if "_truepolicy_tp_size" in m.__dict__ and n)
        layers = qwen3.config.num_hidden_layers
        assert len(switched) == 2 * layers
        assert all(n.endswith(("self_attn.o_proj", "mlp.down_proj")) for n in switched)
        tp2 = logits(qwen3, ids)
        # Negative control at model level: TP=2 numerics are not TP=1's.
        assert not torch.equal(tp2, plain), "TP=2 emulation left the logits unchanged"
        emulate_tensor_parallel(qwen3, 4)
        assert not torch.equal(logits(qwen3, ids), tp2)
    finally:
        emulate_tensor_parallel(qwen3, 1)
    assert emulated_tp_size(qwen3) == 1
    assert not any(
        "forward" in m.__dict__ for n, m in qwen3.named_modules() if n.endswith(("o_proj", "down_proj"))
    )
    assert torch.equal(logits(qwen3, ids), plain)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_other_dense_architectures(model_cache, arch):
    model = prepare_model(load_hf_model(build_tiny_model(arch, cache_dir=model_cache)))
    ids = [7, 11, 13, 17, 19, 23]
    plain = logits(model, ids)
    emulate_tensor_parallel(model, 2)
    assert not torch.equal(logits(model, ids), plain)
    emulate_tensor_parallel(model, 1)
    assert torch.equal(logits(model, ids), plain)


def test_trains_through_the_emulation(qwen3):
    ids = torch.tensor([[5, 9, 300, 17, 2, 44, 8]])
    grads = {}
    for k in (1, 2):
        emulate_tensor_parallel(qwen3, k)
        qwen3.zero_grad()
        out = qwen3(input_ids=ids, labels=ids)
        out.loss.backward()
        grads[k] = {n: p.grad.detach().clone() for n, p in qwen3.named_parameters() if p.grad is not None}
    emulate_tensor_parallel(qwen3, 1)
    qwen3.zero_grad()
    assert grads[2].keys() == grads[1].keys() and grads[2]
    for name, g2 in grads[2].items():
        g1 = grads[1][name]
        assert torch.isfinite(g2.float()).all(), name
        rel = (g2.float() - g1.float()).norm() / g1.float().norm().clamp_min(1e-12)
        assert rel < 0.1, f"{name}: relative gradient difference {rel:.3f} between TP=2 and TP=1"


def test_refuses_what_it_cannot_emulate(qwen3):
    with pytest.raises(UnsupportedTensorParallelError):
        emulate_tensor_parallel(qwen3, 3)  # 4 heads, intermediate 256: no even split
    assert emulated_tp_size(qwen3) == 1  # nothing switched
    with pytest.raises(ValueError):
        emulate_tensor_parallel(qwen3, 0)
    with pytest.raises(UnsupportedTensorParallelError):
        emulate_tensor_parallel(torch.nn.Sequential(torch.nn.Linear(4, 4)), 2)


def test_attention_is_tp_agnostic():
    """Each TP rank runs ``contract.attention`` on its own heads (SGLang's attention patch): rank r
    holds query heads [r Hq/k, (r+1) Hq/k) and their KV heads. Concatenated, the ranks' outputs are
    the full-head call's, bit for bit (including a rank with one KV head, as in the tiny models)."""
    g = torch.Generator().manual_seed(3)
    for hq, hkv, k in ((4, 2, 2), (8, 2, 2), (8, 4, 4), (4, 1, 2)):
        length, first = 23, 5
        q = torch.randn(hq, length - first, 32, generator=g).to(BF16)
        kk = torch.randn(hkv, length, 32, generator=g).to(BF16)
        v = torch.randn(hkv, length, 32, generator=g).to(BF16)
        full = contract.attention(q, kk, v, first, 32**-0.5)
        parts = []
        for r in range(k):
            qh = slice(r * hq // k, (r + 1) * hq // k)
            # SGLang replicates KV heads when k > Hkv; a rank's KV heads are those its queries use.
            group = hq // hkv
            kvh = slice((r * hq // k) // group, ((r + 1) * hq // k - 1) // group + 1)
            parts.append(contract.attention(q[qh], kk[kvh], v[kvh], first, 32**-0.5))
        got = torch.cat(parts)
        assert torch.equal(got, full), describe_mismatch(got, full)


def test_prepare_model_takes_the_servers_tp_size(hf_qwen3):
    model = prepare_model(copy.deepcopy(hf_qwen3), tp_size=2)
    assert emulated_tp_size(model) == 2
    ids = [7, 11, 13, 17, 19, 23]
    twin = emulate_tensor_parallel(prepare_model(copy.deepcopy(hf_qwen3)), 2)
    assert torch.equal(logits(model, ids), logits(twin, ids))
    with pytest.raises(ValueError, match="tp_size"):
        prepare_model(copy.deepcopy(hf_qwen3), tp_size=0)


def _row_parallel_layers(model):
    return [m for n, m in model.named_modules() if n.endswith(("self_attn.o_proj", "mlp.down_proj"))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gpu_contract_row_parallel_layers_take_the_servers_matmul_per_rank(hf_qwen3, device):
    """``gpu_contract.prepare_model(tp_size=2)``: each rank's partial by the server's matmul (the
    batch-invariant kernel on CUDA, ``F.linear`` for the CPU stand-in), summed in rank order."""
    from parity import gpu_contract
    from parity.ops.batch_invariant_matmul import batch_invariant_linear

    model = gpu_contract.prepare_model(copy.deepcopy(hf_qwen3).to(device), tp_size=2, device=device)
    linear = batch_invariant_linear if device == "cuda" else F.linear
    g = torch.Generator().manual_seed(3)
    layers = _row_parallel_layers(model)
    assert layers and all(emulated_tp_size(model) == 2 for _ in layers)
    differs = 0
    for layer in layers:
        x = torch.randn(7, layer.in_features, generator=g).to(BF16).to(device)
        with torch.no_grad():
            got = layer(x)
            parts = [linear(x[:, a:e].contiguous(), layer.weight[:, a:e].contiguous(), None)
                     for a, e in shard_bounds(layer.in_features, 2)]  # fmt: skip
            single = linear(x, layer.weight, layer.bias)
        want = rank_order_sum(parts)
        assert torch.equal(got, want), describe_mismatch(got, want)
        differs += int((got != single).sum())
    assert differs > 0  # negative control: one pass over K (TP=1) rounds differently


def test_gpu_contract_refuses_tp_above_two_on_the_gpu(hf_qwen3):
    from parity import gpu_contract
    from parity.trainer import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="rank order"):
        gpu_contract.prepare_model(copy.deepcopy(hf_qwen3), tp_size=4, device="cuda")
