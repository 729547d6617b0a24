"""parity.ops.paged_attention_mma on a CUDA GPU (skipped without one): decode == extend == trainer bitwise
on random batches up to 32k context (GQA groups 1/4/7/8, head dim 64/128, bf16/fp16), at every position
of a request, under every launch option; a row's bits do not depend on the other rows of its MMA tile;
close to float64 attention; full_sequence_attention's gradient against float64; the trainer-side HF
model's decode loop == its full forward with these kernels; negative controls (another chunk or
group size)."""

from __future__ import annotations

import math

import pytest
import torch
import triton

from parity.ops import paged_attention_mma as pam
from parity.ops.paged_attention_mma import FoldLaunch
from tests import helpers
from tests.helpers import assert_same_bits, bit_view, nan_empty

pytestmark = pytest.mark.gpu

DEV = "cuda"

CONFIGS = [
    # hq, hkv, d, dtype: GQA groups 4, 8, 1 (MHA) and 7 (not a power of two); D 128 / 64; bf16 / fp16
    (32, 8, 128, torch.bfloat16),
    (32, 4, 128, torch.float16),
    (16, 16, 64, torch.bfloat16),
    (28, 4, 64, torch.float16),
]


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(pam, "_empty", nan_empty)


class Pool:
    """SGLang-like KV pool on the GPU: [slots, Hkv, D] buffers, req_to_token rows of permuted slots
    (pool row i + 1 is request i), queries q[i] [len_i, Hq, D]."""

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
        self.lengths, self.hq, self.hkv, self.d = lengths, hq, hkv, d
        self.pools = torch.arange(1, len(lengths) + 1, device=DEV)

    def extend(self, spans, scale, **kw):
        """spans [(req, prefix, new)] as one SGLang extend batch."""
        q = torch.cat([self.q[r][p : p + n] for r, p, n in spans])
        return pam.paged_attention_extend(
            q, self.k, self.v, self.req_to_token, self.pools[[r for r, _, _ in spans]],
            torch.tensor([p for _, p, _ in spans], device=DEV),
            torch.tensor([n for _, _, n in spans], device=DEV), scale, **kw,
        )  # fmt: skip

    def decode(self, rows, scale, **kw):
        """rows [(req, pos)] as one decode batch."""
        q = torch.stack([self.q[r][p] for r, p in rows])
        return pam.paged_attention_decode(
            q, self.k, self.v, self.req_to_token, self.pools[[r for r, _ in rows]],
            torch.tensor([p + 1 for _, p in rows], device=DEV), scale, **kw,
        )  # fmt: skip

    def full_sequence(self, req, scale, first=0):
        """The trainer's full-sequence attention of request ``req`` (rows first .., all its keys)."""
        slots = self.req_to_token[req + 1, : self.lengths[req]].long()
        k = self.k[slots].permute(1, 0, 2)[None]
        v = self.v[slots].permute(1, 0, 2)[None]
        return pam.full_sequence_attention(self.q[req][first:].permute(1, 0, 2)[None], k, v, scale)[0]

    def float64(self, req, pos, scale):
        slots = self.req_to_token[req + 1, : pos + 1].long()
        group = self.hq // self.hkv
        k = self.k[slots].double().repeat_interleave(group, 1)
        v = self.v[slots].double().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", self.q[req][pos].double(), k) * scale
        return torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)


@pytest.mark.parametrize("hq,hkv,d,dtype", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_equals_extend_equals_trainer_on_random_batches(poison, seed, hq, hkv, d, dtype):
    """Random batches (1..64 requests, contexts 1..32k, prefix hits): every decode row is bitwise the
    extend row at its position, whatever else is in the batch, and the trainer's full-sequence row."""
    g = torch.Generator().manual_seed(seed)
    n_req = [1, 17, 64][seed]
    lengths = [int(x) for x in torch.randint(1, 3000, (n_req,), generator=g)]
    lengths[0] = [32768, 8191, 4097][seed]
    if n_req > 2:
        lengths[1:3] = [1, 64]  # a one-token request, one full chunk
    p = Pool(seed, lengths, hq, hkv, d, dtype)
    scale = d**-0.5
    prefix = [max(0, n - int(torch.randint(1, 100, (1,), generator=g))) for n in lengths]
    new = [n - a for n, a in zip(lengths, prefix, strict=True)]
    ext = p.extend(list(zip(range(n_req), prefix, new, strict=True)), scale)
    assert not torch.isnan(ext.float()).any(), "unwritten (poisoned) extend outputs"
    last = torch.cumsum(torch.tensor(new), 0) - 1
    ext_last = ext[last.to(DEV)]
    rows = [(r, lengths[r] - 1) for r in range(n_req)]
    dec = p.decode(rows, scale)
    assert not torch.isnan(dec.float()).any(), "unwritten (poisoned) decode outputs"
    assert_same_bits(dec, ext_last, f"decode batch of {n_req} vs extend rows")
    for _ in range(3):
        sub = torch.randperm(n_req, generator=g)[: max(1, n_req // 3)].tolist()
        part = p.decode([rows[i] for i in sub], scale)
        assert_same_bits(part, ext_last[sub], "decode sub-batch vs extend rows")
    # the trainer's full sequence of a request (HF layout)
    r = 1 if n_req > 1 else 0
    full = p.full_sequence(r, scale)
    assert_same_bits(full[-1], dec[r], "trainer full sequence vs server decode")
    start = int(last[r]) - new[r] + 1
    assert_same_bits(full[prefix[r] :], ext[start : start + new[r]], "trainer vs extend")
    # close to float64 attention (a few rows)
    tol = 3e-2 if dtype == torch.bfloat16 else 1.5e-2
    for i in (0, n_req - 1):
        err = (dec[i].double() - p.float64(i, lengths[i] - 1, scale)).abs().max().item()
        assert err < tol, (i, lengths[i], err)


@pytest.mark.parametrize(
    "hq,hkv,d,dtype,contract",
    [(*c, {}) for c in CONFIGS[:2] + CONFIGS[3:]]
    + [(*CONFIGS[0], dict(group=3)), (*CONFIGS[3], dict(group=1))],
)
def test_every_position_and_every_split(poison, hq, hkv, d, dtype, contract):
    """One 700-token request: every position decoded (one batch) == the prefill rows == prefill after a
    prefix hit == chunked prefill of odd sizes (tiles, chunks and groups at every alignment), fp32
    outputs; under the module's contract (11 chunks: 3 groups) and groups of 3 and 1 chunks."""
    lengths = [700, 333]
    p = Pool(hq + d, lengths, hq, hkv, d, dtype)
    scale = d**-0.5

    def out(n):
        return {"out": torch.full((n, hq, d), math.nan, device=DEV), **contract}  # fp32, poisoned

    want = p.extend([(0, 0, 700)], scale, **out(700))
    dec = p.decode([(0, i) for i in range(700)], scale, **out(700))
    assert_same_bits(dec, want, "decode at every position vs prefill (fp32 out)")
    assert_same_bits(p.extend([(1, 0, 5), (0, 131, 569)], scale, **out(574))[5:], want[131:], "prefix hit")
    parts, a = [], 0
    for n in (1, 63, 65, 100, 7, 200, 264):
        parts.append(p.extend([(1, 300, 33), (0, a, n)], scale, **out(33 + n))[33:])
        a += n
    assert_same_bits(torch.cat(parts), want, "chunked prefill 1 + 63 + 65 + 100 + 7 + 200 + 264")
    rows = torch.randperm(700, device=DEV)[:150]
    got = pam.paged_attention_rows(
        p.q[0][rows], p.k, p.v, p.req_to_token, torch.ones(150, dtype=torch.long, device=DEV), rows, scale,
        **out(150),
    )  # fmt: skip
    assert_same_bits(got, want[rows], "explicit rows in random order")
    # bf16/fp16 outputs: the fp32 ones rounded once
    assert_same_bits(p.extend([(0, 0, 700)], scale, **contract), want.to(dtype), "16-bit out == fp32 rounded")


def test_launch_options_do_not_change_the_bits(poison):
    hq, hkv, d = 32, 8, 128
    p = Pool(5, [5000, 77, 1200], hq, hkv, d, torch.bfloat16)
    scale = d**-0.5
    rows = [(0, 4999), (1, 76), (2, 1199), (0, 2047)]
    want = p.decode(rows, scale, groups_per_program=1, num_stages=2)
    for gpp in (2, 3, 5, 11):
        for stages in (1, 2, 3, 4):
            for pdl in (False, True):
                got = p.decode(
                    rows, scale, groups_per_program=gpp, num_stages=stages, max_chunks=100, pdl=pdl
                )
                assert_same_bits(
                    got, want, f"decode: {gpp} groups/program, {stages} stages, pdl {pdl}, spare chunks"
                )
    assert_same_bits(p.decode(rows, scale), want, "decode: default options")
    ext = p.extend([(0, 4900, 100), (2, 0, 1200)], scale)
    for stages in (1, 3):
        assert_same_bits(
            p.extend([(0, 4900, 100), (2, 0, 1200)], scale, num_stages=stages), ext, f"{stages} st"
        )
    assert_same_bits(ext[99], want[0], "extend vs decode")


@pytest.mark.parametrize("hq,hkv,d,dtype", [CONFIGS[0], CONFIGS[3]])
def test_decode_fold_launch_options_do_not_change_the_bits(poison, hq, hkv, d, dtype):
    """The decode fold's launch options (D / row slices, partials loaded P chunks ahead, the pipelined
    loop's stages and unroll, warps) and the default give the bits of the plain serial fold (one
    program per kv head and request, the loop neither pipelined nor unrolled), fp32 outputs (every
    bit) and 16-bit ones, all poisoned: every candidate the benchmark's --sweep times (at its shape:
    Hq 32, Hkv 8, D 128) and odd ones (P not a power of two, a head per program, 16 D slices, one
    stage), on mixed
    batches to 32k context (lengths 1, 64, 65, not multiples of 64, group counts not multiples of P;
    batches of 9, 1 and 3; spare chunks past the longest request)."""
    gp = triton.next_power_of_2(hq // hkv)
    plain = FoldLaunch(d_slices=1, row_slices=1, prefetch=0, num_warps=4, num_stages=1, unroll=1)
    odd = [FoldLaunch(prefetch=p) for p in (1, 3, 5)] + [
        FoldLaunch(row_slices=gp, prefetch=4, num_warps=1),
        FoldLaunch(d_slices=16, row_slices=2, prefetch=3, num_warps=2),
        FoldLaunch(d_slices=2, row_slices=2, prefetch=0, num_stages=2, unroll=1),
        FoldLaunch(d_slices=4, row_slices=1, prefetch=0, num_stages=5, unroll=3, num_warps=1),
    ]
    cand = pam.FOLD_CANDIDATES
    some = [odd[1], odd[3], cand["d4_r1_p16_w1"], cand["d4_r1_s8_u8_w1"]]
    options = [*cand.values(), *odd] if hq == 32 else some + odd[4:]
    lengths = [32768, 1, 64, 65, 4097, 777, 12345, 130, 20000]
    p = Pool(11, lengths, hq, hkv, d, dtype)
    scale = d**-0.5
    full = [(i, n - 1) for i, n in enumerate(lengths)]
    for rows, opts_list, out_dtypes, max_chunks in (
        (full, options, (torch.float32,), None),
        (full, some, (dtype,), None),
        ([(0, 32767)], options, (torch.float32,), None),
        ([(1, 0), (5, 776), (8, 19999)], some, (torch.float32, dtype), 600),
    ):
        for out_dtype in out_dtypes:

            def out(_rows=rows, _dt=out_dtype):
                return {"out": torch.full((len(_rows), hq, d), math.nan, dtype=_dt, device=DEV)}

            want = p.decode(rows, scale, max_chunks=max_chunks, fold=plain, **out())
            assert not torch.isnan(want.float()).any(), "unwritten (poisoned) decode outputs"
            default = p.decode(rows, scale, max_chunks=max_chunks, **out())
            assert_same_bits(default, want, f"the default fold vs the plain one, batch of {len(rows)}")
            for fold in opts_list:
                got = p.decode(rows, scale, max_chunks=max_chunks, fold=fold, **out())
                assert_same_bits(got, want, f"decode fold {fold}, batch of {len(rows)}, {out_dtype} out")


def test_a_row_does_not_depend_on_the_other_rows_of_its_tile(poison):
    """The MMA-row-independence premise: change every other row of a row's tiles (other positions in
    an extend tile, the other query heads of its group in a decode tile: zero, huge, random) and the
    row's bits stay."""
    hq, hkv, d = 32, 8, 128
    p = Pool(6, [300], hq, hkv, d, torch.bfloat16)
    scale = d**-0.5
    q = p.q[0].clone()
    args = (p.k, p.v, p.req_to_token, p.pools[:1], torch.tensor([0], device=DEV))
    base = pam.paged_attention_extend(q, *args, torch.tensor([300], device=DEV), scale)
    for fill in (0.0, 300.0, None):
        q2 = torch.randn_like(q) * 10 if fill is None else torch.full_like(q, fill)
        q2[100] = q[100]  # row 100 (tile 64..127) keeps its query
        got = pam.paged_attention_extend(q2, *args, torch.tensor([300], device=DEV), scale)
        assert_same_bits(got[100], base[100], f"extend row 100 with its tile's other rows = {fill}")
        qd = q2[299:300].clone()
        qd[0, 9] = q[299, 9]  # query head 9 (kv head 2, group of 4) keeps its query; its group changes
        dec = pam.paged_attention_decode(
            qd, p.k, p.v, p.req_to_token, p.pools[:1], torch.tensor([300], device=DEV), scale
        )
        assert_same_bits(dec[0, 9], base[299, 9], f"decode head 9 with its group's other heads = {fill}")


def test_full_sequence_backward_against_float64():
    """Gradients are not part of the definition (the backward recomputes in fp32); they must still be
    the gradients of attention: against float64 autograd on the same bf16 inputs."""
    g = torch.Generator(device=DEV).manual_seed(3)
    q = torch.randn(2, 8, 200, 128, generator=g, device=DEV).bfloat16().requires_grad_(True)
    k = torch.randn(2, 2, 200, 128, generator=g, device=DEV).bfloat16().requires_grad_(True)
    v = torch.randn(2, 2, 200, 128, generator=g, device=DEV).bfloat16().requires_grad_(True)
    w = torch.randn(2, 200, 8, 128, generator=g, device=DEV)
    (pam.full_sequence_attention(q, k, v, 128**-0.5).float() * w).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    (pam._attention_fp32(q64, k64, v64, 128**-0.5).transpose(1, 2) * w.double()).sum().backward()
    for name, got, want in (("q", q.grad, q64.grad), ("k", k.grad, k64.grad), ("v", v.grad, v64.grad)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-2, (name, err)  # bf16 gradients (one rounding)
    out = pam.full_sequence_attention(q.detach(), k.detach(), v.detach(), 128**-0.5)
    ref = pam._attention_fp32(q64.detach(), k64.detach(), v64.detach(), 128**-0.5).transpose(1, 2)
    assert (out.double() - ref).abs().max().item() < 3e-2


def test_negative_control_another_chunk_size_is_not_bitwise(poison):
    """What the fixed chunk and group buy: a decode with 32- or 128-key chunks (another split of the
    keys, as SGLang's length-dependent split sizes give), or with other groups, is not the extend row.
    fp32 outputs show every bit."""
    hq, hkv, d = 32, 8, 128
    p = Pool(7, [3000], hq, hkv, d, torch.bfloat16)
    scale = d**-0.5
    rows = [(0, 2999), (0, 1500), (0, 700)]
    want = p.extend([(0, 0, 3000)], scale, out=torch.full((3000, hq, d), math.nan, device=DEV))[
        [2999, 1500, 700]
    ]
    assert_same_bits(
        p.decode(rows, scale, out=torch.full((3, hq, d), math.nan, device=DEV)), want, "chunk 64 both"
    )
    for chunk in (32, 128):
        other = p.decode(rows, scale, chunk=chunk, out=torch.full((3, hq, d), math.nan, device=DEV))
        n = int((bit_view(other) != bit_view(want)).sum())
        print(f"decode with chunk {chunk} vs extend with chunk 64: {n} of {want.numel()} differ")
        assert n > 0
        assert (other.double() - want.double()).abs().max().item() < 1e-2  # other bits, same attention
    for group in sorted({1, 2, 8, 16} - {pam.CONTRACT_GROUP}):  # 47 chunks, other groups than the module's
        other = p.decode(rows, scale, group=group, out=torch.full((3, hq, d), math.nan, device=DEV))
        n = int((bit_view(other) != bit_view(want)).sum())
        print(f"decode in groups of {group} vs extend in groups of {pam.CONTRACT_GROUP}: {n} differ")
        assert n > 0
        assert (other.double() - want.double()).abs().max().item() < 1e-2


def test_hf_decode_loop_equals_one_full_forward_with_the_mma_kernels():
    """A Qwen3 (8 layers, hidden 1024, bf16): a prefill of 64 then 256 one-token steps over the KV
    cache gives per-token logprobs identical to one full forward, with the GPU contract's linears and
    RMSNorm and this module's attention; plain HF (SDPA + cuBLAS) drifts."""
    from parity.gpu_contract import prepare_model

    ids = torch.randint(0, 32000, (1, 64 + 256), generator=torch.Generator().manual_seed(0)).to(DEV)
    plain = helpers.qwen3_on_device(8, 1024, 16, 8)
    a, b = helpers.decode_loop_vs_full_logprobs(plain, ids, 64)
    drift = (a - b).abs()
    print(
        f"plain HF: decode loop vs full forward: max |Δlogp| {drift.max().item():.3e}, "
        f"mean {drift.mean().item():.3e}"
    )
    model = prepare_model(plain, device="cuda", attention="mma")
    assert model.config._attn_implementation == "truepolicy_paged_mma"
    a, b = helpers.decode_loop_vs_full_logprobs(model, ids, 64)
    assert_same_bits(a, b, "logprobs: decode loop vs full forward (mma attention)")
    assert drift.max() > 0, "negative control: plain HF should drift"
