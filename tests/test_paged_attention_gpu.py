"""parity.ops.paged_attention on a CUDA GPU (skipped without one): kernel == plain-PyTorch contract (on
the GPU and on the CPU), decode == extend == trainer on random batches up to 32k context, the
trainer-side HF model's decode loop == its full forward (and the drift without the kernels)."""

from __future__ import annotations

import pytest
import torch

from parity.ops import paged_attention as pa
from tests.helpers import assert_same_bits, decode_loop_vs_full_logprobs, nan_empty, qwen3_on_device

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(pa, "_empty", nan_empty)


class Pool:
    """SGLang-like KV pool on the GPU: [slots, Hkv, D] buffers, req_to_token rows of permuted slots."""

    def __init__(self, seed, lengths, hq, hkv, d, dtype):
        g = torch.Generator(device=DEV).manual_seed(seed)
        total = sum(lengths) + 16
        self.k = (torch.randn(total, hkv, d, generator=g, device=DEV) * 1.5).to(dtype)
        self.v = torch.randn(total, hkv, d, generator=g, device=DEV).to(dtype)
        self.req_to_token = torch.zeros(len(lengths) + 1, max(lengths) + 8, dtype=torch.int32, device=DEV)
        perm = torch.randperm(total, generator=g, device=DEV).int()
        start = 0
        for i, n in enumerate(lengths):
            self.req_to_token[i + 1, :n] = perm[start : start + n]
            start += n
        self.q = [(torch.randn(n, hq, d, generator=g, device=DEV) * 1.5).to(dtype) for n in lengths]
        self.lengths = lengths

    def rows(self, spans):
        """spans [(req, first, last)] -> (q, row_pool, row_pos)."""
        q = torch.cat([self.q[r][a:b] for r, a, b in spans])
        pool = torch.cat([torch.full((b - a,), r + 1, device=DEV) for r, a, b in spans])
        pos = torch.cat([torch.arange(a, b, device=DEV) for r, a, b in spans])
        return q, pool, pos


@pytest.mark.parametrize(
    "hq,hkv,d,dtype",
    [(32, 8, 128, torch.bfloat16), (14, 2, 64, torch.bfloat16), (16, 16, 128, torch.float16)],
)
def test_kernel_is_bitwise_the_reference_on_gpu_and_cpu(poison, hq, hkv, d, dtype):
    lengths = [1, 63, 64, 65, 700, 1500]
    p = Pool(hq * d, lengths, hq, hkv, d, dtype)
    spans = [(0, 0, 1), (1, 10, 63), (2, 0, 64), (3, 64, 65), (4, 300, 700), (5, 1400, 1500)]
    q, pool, pos = p.rows(spans)
    scale = d**-0.5
    got = pa.paged_attention_rows(q, p.k, p.v, p.req_to_token, pool, pos, scale)
    assert not torch.isnan(got.float()).any(), "unwritten (poisoned) outputs"
    assert_same_bits(
        got, pa.paged_attention_reference(q, p.k, p.v, p.req_to_token, pool, pos, scale), "vs GPU ref"
    )
    sel = torch.tensor([0, 1, 60, 61, 100, len(pos) - 1], device=DEV)
    cpu = pa.paged_attention_reference(
        q[sel].cpu(), p.k.cpu(), p.v.cpu(), p.req_to_token.cpu(), pool[sel].cpu(), pos[sel].cpu(), scale
    )
    assert_same_bits(got[sel].cpu(), cpu, "vs CPU reference")
    # launch options never change the bits
    for hb, warps in ((1, 4), (8, 8)):
        other = pa.paged_attention_rows(
            q, p.k, p.v, p.req_to_token, pool, pos, scale, heads_per_program=hb, num_warps=warps
        )
        assert_same_bits(other, got, f"{hb} heads/program, {warps} warps")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_equals_extend_equals_trainer_on_random_batches(poison, seed):
    """Random batches (1..64 requests, contexts 1..32k, prefix hits): every decode row is bitwise the
    extend row at its position, whatever else is in the batch, and the trainer's full sequence."""
    g = torch.Generator().manual_seed(seed)
    n_req = [1, 17, 64][seed]
    lengths = [int(x) for x in torch.randint(1, 3000, (n_req,), generator=g)]
    lengths[0] = [32768, 8191, 4097][seed]
    hq, hkv, d = 32, 8, 128
    p = Pool(seed, lengths, hq, hkv, d, torch.bfloat16)
    scale = d**-0.5
    pools = torch.arange(1, n_req + 1, device=DEV)
    # extend: each request's last rows after a random cached prefix, all in one batch
    prefix = [max(0, n - int(torch.randint(1, 40, (1,), generator=g))) for n in lengths]
    q_ext = torch.cat([p.q[r][prefix[r] :] for r in range(n_req)])
    ext = pa.paged_attention_extend(
        q_ext, p.k, p.v, p.req_to_token, pools, torch.tensor(prefix, device=DEV),
        torch.tensor([n - a for n, a in zip(lengths, prefix, strict=True)], device=DEV), scale,
    )  # fmt: skip
    last = torch.cumsum(torch.tensor([n - a for n, a in zip(lengths, prefix, strict=True)]), 0) - 1
    ext_last = ext[last.to(DEV)]
    # decode: the same last rows, as one batch, then in random sub-batches
    q_dec = torch.stack([p.q[r][-1] for r in range(n_req)])
    seq = torch.tensor(lengths, device=DEV)
    dec = pa.paged_attention_decode(q_dec, p.k, p.v, p.req_to_token, pools, seq, scale)
    assert not torch.isnan(dec.float()).any()
    assert_same_bits(dec, ext_last, f"decode batch of {n_req} vs extend rows")
    for _ in range(3):
        sub = torch.randperm(n_req, generator=g)[: max(1, n_req // 3)].to(DEV)
        part = pa.paged_attention_decode(q_dec[sub], p.k, p.v, p.req_to_token, pools[sub], seq[sub], scale)
        assert_same_bits(part, ext_last[sub], "decode sub-batch vs extend rows")
    # the trainer's full sequence of request 1 (or 0), the HF layout
    r = 1 if n_req > 1 else 0
    slots = p.req_to_token[r + 1, : lengths[r]].long()
    k = p.k[slots].permute(1, 0, 2)[None]
    v = p.v[slots].permute(1, 0, 2)[None]
    full = pa.full_sequence_attention(p.q[r].permute(1, 0, 2)[None], k, v, scale)[0]
    assert_same_bits(full[-1], dec[r], "trainer full sequence vs server decode")
    assert_same_bits(
        full[prefix[r] :], ext[last[r] - (lengths[r] - prefix[r]) + 1 : last[r] + 1], "trainer vs extend"
    )


def test_hf_decode_loop_equals_one_full_forward_with_the_kernels():
    """A Qwen3 (8 layers, hidden 1024, bf16): a prefill of 64 then 256 one-token steps over the KV
    cache gives per-token logprobs identical to one full forward, with the GPU contract (paged
    attention + batch-invariant linears); plain HF (SDPA + cuBLAS) drifts."""
    from parity.gpu_contract import prepare_model

    ids = torch.randint(0, 32000, (1, 64 + 256), generator=torch.Generator().manual_seed(0)).to(DEV)
    plain = qwen3_on_device(8, 1024, 16, 8)
    a, b = decode_loop_vs_full_logprobs(plain, ids, 64)
    drift = (a - b).abs()
    print(
        f"plain HF: decode loop vs full forward: max |Δlogp| {drift.max().item():.3e}, "
        f"mean {drift.mean().item():.3e}"
    )
    model = prepare_model(plain, device="cuda", attention="exact")
    a, b = decode_loop_vs_full_logprobs(model, ids, 64)
    assert_same_bits(a, b, "logprobs: decode loop vs full forward (GPU contract)")
    assert drift.max() > 0, "negative control: plain HF should drift"
