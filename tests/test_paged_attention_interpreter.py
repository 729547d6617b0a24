"""parity.ops.paged_attention and parity.ops.batch_invariant_matmul on the CPU: the Triton kernels under
the Triton interpreter (bitwise the plain-PyTorch contract), decode == extend == the trainer's full
sequence, the negative controls, the backward, and the trainer-side wiring on a tiny HF model.

The interpreter must be chosen before triton.jit decorates the kernels, so the kernel checks run in a
child Python with ``TRITON_INTERPRET=1`` (this file's ``__main__``). There ``tl.fma`` rounds twice
(numpy), so exp_c uses its exact fp64 emulation, and the fp32 -> bf16 output rounding is done on the
bits; everything else is the kernel code that runs on the GPU. Shapes are small and odd (GQA groups
that are not a power of two, partial chunks, prefix hits, permuted KV slots) to keep the child under
a minute on two cores.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from parity.ops import paged_attention as pa
from tests.helpers import assert_same_bits, count_differing, nan_empty, run_under_triton_interpreter


class Cache:
    """A toy SGLang KV pool: [slots, Hkv, D] buffers, req_to_token rows of permuted slots."""

    def __init__(self, seed, lengths, hq, hkv, d, dtype=torch.bfloat16, width=None):
        g = torch.Generator().manual_seed(seed)
        total = sum(lengths) + 7
        self.k = (torch.randn(total, hkv, d, generator=g) * 1.5).to(dtype)
        self.v = torch.randn(total, hkv, d, generator=g).to(dtype)
        width = width or max(lengths) + 5
        perm = torch.randperm(total, generator=g)
        self.req_to_token = torch.zeros(len(lengths) + 1, width, dtype=torch.int32)
        start = 0
        for i, n in enumerate(lengths):  # pool row i + 1 (row 0 unused, as in SGLang)
            self.req_to_token[i + 1, :n] = perm[start : start + n].int()
            start += n
        self.q = (torch.randn(max(lengths), len(lengths), hq, d, generator=g) * 1.5).to(dtype)  # [pos, req]
        self.lengths = lengths

    def rows(self, req: int, first: int, last: int):
        """(q [n, Hq, D], row_pool, row_pos) of request ``req``'s positions first .. last - 1."""
        n = last - first
        return (
            self.q[first:last, req].contiguous(),
            torch.full((n,), req + 1, dtype=torch.long),
            torch.arange(first, last),
        )

    def reference(self, req: int, first: int, last: int, scale: float, chunk: int) -> torch.Tensor:
        q, pool, pos = self.rows(req, first, last)
        return pa.paged_attention_reference(
            q, self.k, self.v, self.req_to_token, pool, pos, scale, chunk=chunk
        )


# ---------------------------------------------------------------------------------------------------
# The kernels under the interpreter (child process)
# ---------------------------------------------------------------------------------------------------
def test_kernels_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "interpreter checks passed" in proc.stdout


def _check_exp():
    import triton
    import triton.language as tl

    from parity.ops import policy_loss as pl

    @triton.jit
    def exp_kernel(T, OUT, N: tl.constexpr, FMA: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(OUT + offs, pa._exp_neg(tl.load(T + offs), FMA))

    g = torch.Generator().manual_seed(1)
    t = torch.cat(
        [-torch.rand(4000, generator=g) * 100, torch.tensor([0.0, -0.0, -86.0, -87.5] + [-1e-30] * 92)]
    )
    out = torch.empty_like(t)
    exp_kernel[(1,)](t, out, N=4096, FMA=pl._fma_mode(True))
    assert_same_bits(out, pl._exp_neg_t(t, True), "exp_c (flat) vs policy_loss._exp_neg_t")
    assert out[4000] == 1.0 and out[4001] == 1.0
    print("exp_c: 4096 values bitwise policy_loss's", flush=True)


def _check_kernel_vs_reference():
    cases = [
        # seed, lengths, hq, hkv, d, dtype, chunk, scale
        (1, [37, 9], 6, 2, 64, torch.bfloat16, 16, 0.125),
        (2, [21, 18], 2, 2, 128, torch.bfloat16, 16, 128**-0.5),
        (3, [33, 5], 4, 1, 64, torch.float32, 32, 0.3),
    ]
    for seed, lengths, hq, hkv, d, dtype, chunk, scale in cases:
        c = Cache(seed, lengths, hq, hkv, d, dtype)
        tag = f"{lengths} Hq={hq} Hkv={hkv} D={d} {dtype} C={chunk}"
        # extend: request 0 after a cached prefix of 3, request 1 from scratch, one batch
        q0, p0, s0 = c.rows(0, 3, lengths[0])
        q1, p1, s1 = c.rows(1, 0, lengths[1])
        q, pool, pos = torch.cat([q0, q1]), torch.cat([p0, p1]), torch.cat([s0, s1])
        want = pa.paged_attention_reference(q, c.k, c.v, c.req_to_token, pool, pos, scale, chunk=chunk)
        got = pa.paged_attention_extend(
            q, c.k, c.v, c.req_to_token, torch.tensor([1, 2]), torch.tensor([3, 0]),
            torch.tensor([lengths[0] - 3, lengths[1]]), scale, chunk=chunk,
        )  # fmt: skip
        assert not torch.isnan(got.float()).any(), f"{tag}: unwritten (poisoned) extend outputs"
        assert_same_bits(got, want, f"extend kernel vs reference {tag}")
        # decode: the last row of each request
        qd = torch.stack([c.q[lengths[0] - 1, 0], c.q[lengths[1] - 1, 1]])
        dec = pa.paged_attention_decode(
            qd, c.k, c.v, c.req_to_token, torch.tensor([1, 2]), torch.tensor(lengths), scale, chunk=chunk
        )
        assert not torch.isnan(dec.float()).any(), f"{tag}: unwritten (poisoned) decode outputs"
        assert_same_bits(dec[0], want[lengths[0] - 4], f"decode row vs extend row (request 0) {tag}")
        assert_same_bits(dec[1], want[-1], f"decode row vs extend row (request 1) {tag}")
        print(f"kernel == reference, decode == extend: {tag}", flush=True)
    # launch options never change the bits: heads per program, warps
    c = Cache(4, [20], 6, 2, 64)
    q, pool, pos = c.rows(0, 0, 20)
    want = c.reference(0, 0, 20, 0.125, 16)
    for hb, warps in ((1, 1), (2, 8)):
        got = pa.paged_attention_rows(
            q, c.k, c.v, c.req_to_token, pool, pos, 0.125, chunk=16, heads_per_program=hb, num_warps=warps
        )
        assert_same_bits(got, want, f"extend with {hb} heads/program, {warps} warps")
        dec = pa.paged_attention_decode(
            q[-1:], c.k, c.v, c.req_to_token, pool[:1], torch.tensor([20]), 0.125, chunk=16,
            heads_per_program=hb, num_warps=warps, max_chunks=4,
        )  # fmt: skip
        assert_same_bits(dec[0], want[-1], f"decode with {hb} heads/program, {warps} warps, spare chunks")
    print("launch options (heads per program, warps, spare grid chunks): same bits", flush=True)


def _check_decode_equals_extend_across_batches():
    """One request of 40 tokens (chunks of 16) computed every way the server can: prefill at once,
    after a prefix hit, as chunked prefill, decoded alone or batched with other requests."""
    lengths = [40, 23, 50]
    c = Cache(5, lengths, 4, 1, 64)
    scale, chunk = 0.125, 16
    want = c.reference(0, 0, 40, scale, chunk)
    r2t, pools = c.req_to_token, torch.tensor([1, 2, 3])

    def extend(spans):  # spans: [(req, prefix, new)]
        q = torch.cat([c.q[p : p + n, r] for r, p, n in spans])
        return pa.paged_attention_extend(
            q, c.k, c.v, r2t, pools[[r for r, _, _ in spans]], torch.tensor([p for _, p, _ in spans]),
            torch.tensor([n for _, _, n in spans]), scale, chunk=chunk,
        )  # fmt: skip

    assert_same_bits(extend([(0, 0, 40)]), want, "prefill at once")
    assert_same_bits(extend([(1, 0, 5), (0, 17, 23)])[5:], want[17:], "after a 17-token prefix hit, batched")
    parts = [
        extend([(0, 0, 15)]),
        extend([(2, 46, 4), (0, 15, 17)])[4:],
        extend([(0, 32, 8), (1, 3, 2)])[:8],
    ]
    assert_same_bits(torch.cat(parts), want, "chunked prefill 15 + 17 + 8, mixed batches")
    for p in (31, 32, 39):
        alone = pa.paged_attention_decode(
            c.q[p, 0][None], c.k, c.v, r2t, pools[:1], torch.tensor([p + 1]), scale, chunk=chunk
        )
        mixed = pa.paged_attention_decode(
            torch.stack([c.q[22, 1], c.q[p, 0], c.q[49, 2]]), c.k, c.v, r2t, pools[[1, 0, 2]],
            torch.tensor([23, p + 1, 50]), scale, chunk=chunk,
        )  # fmt: skip
        assert_same_bits(alone[0], want[p], f"decode at {p}, alone")
        assert_same_bits(mixed[1], want[p], f"decode at {p}, batch of 3")
        assert_same_bits(mixed[0], c.reference(1, 22, 23, scale, chunk)[0], "decode of the other request")
    print("decode == extend == prefix hit == chunked prefill, any batch", flush=True)
    return c, want


def _check_trainer_full_sequence(c, want):
    """The trainer's full-sequence attention (HF layout) gives the server's rows."""
    ks = torch.stack([c.k[c.req_to_token[1, :40].long()]]).permute(0, 2, 1, 3)  # [1, Hkv, 40, D]
    vs = torch.stack([c.v[c.req_to_token[1, :40].long()]]).permute(0, 2, 1, 3)
    qs = c.q[:40, 0][None].permute(0, 2, 1, 3)  # [1, Hq, 40, D]
    out = pa.full_sequence_attention(qs, ks, vs, 0.125, 16)  # [1, 40, Hq, D]
    assert_same_bits(out[0], want, "trainer full sequence vs server rows")
    tail = pa.full_sequence_attention(qs[:, :, 36:], ks, vs, 0.125, 16)  # the last 4 rows, all keys
    assert_same_bits(tail[0], want[36:], "trainer rows 36..39 against the 40 keys")
    print("trainer full sequence == server rows", flush=True)


def _check_negative_control_kernel():
    """fp32 inputs and outputs (a bf16 output rounding would hide most last-bit differences)."""
    c = Cache(6, [50], 4, 2, 64, torch.float32)
    want = c.reference(0, 49, 50, 0.125, 16)[0]
    other = pa.paged_attention_decode(
        c.q[49, 0][None], c.k, c.v, c.req_to_token, torch.tensor([1]), torch.tensor([50]), 0.125, chunk=32
    )
    n = count_differing(other[0], want)
    assert n > 0, "a decode with another chunk size should not equal the extend rows"
    print(f"negative control: decode with chunk 32 vs extend with chunk 16: {n} of {want.numel()} differ")


def _check_matmul():
    from parity.ops import batch_invariant_matmul as bm

    bm._empty = nan_empty
    cfg = bm.MatmulConfig(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=1)
    g = torch.Generator().manual_seed(7)
    for k, n, bias in ((100, 70, True), (64, 96, False)):
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
        x = torch.randn(70, k, generator=g).to(torch.bfloat16)
        full = bm.batch_invariant_linear(x, w, b, config=cfg)
        assert not torch.isnan(full.float()).any()
        for m in (1, 3, 17, 33):
            for off in (0, 5, 70 - m):
                part = bm.batch_invariant_linear(x[off : off + m], w, b, config=cfg)
                assert_same_bits(
                    part, full[off : off + m], f"matmul rows {off}..{off + m} of M=70, K={k}, N={n}"
                )
    print("batch-invariant matmul: rows bitwise independent of M and of their place in the tile", flush=True)
    # Differentiable (the trainer trains through it): the kernel's forward, F.linear's gradients.
    for k, n, bias in ((100, 70, True), (64, 96, False)):
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
        x = torch.randn(2, 35, k, generator=g).to(torch.bfloat16)
        upstream = torch.randn(2, 35, n, generator=g).to(torch.bfloat16)
        ours = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        plain = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        out = bm.batch_invariant_linear(*ours, config=cfg)
        flat = bm.batch_invariant_linear(x.view(70, k), w, b, config=cfg)
        assert_same_bits(out, flat.view(2, 35, n), "differentiable forward")
        out.backward(upstream)
        torch.nn.functional.linear(*plain).backward(upstream)
        for name, got, want in zip(("dx", "dweight", "dbias"), ours, plain, strict=True):
            if got is not None:
                assert_same_bits(got.grad, want.grad, f"{name}, K={k}, N={n} (F.linear's backward)")
    print("batch-invariant linear: F.linear's gradients", flush=True)


def _check_server_hooks():
    """The GPU patches' hooks, called as SGLang's TritonAttnBackend would, with the kernels."""
    from types import SimpleNamespace

    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType

    from server_patches import gpu_patches

    gpu_patches.select_attention("exact")  # this module's kernels (the default is the mma family)
    hq, hkv, d = 4, 1, 64
    lengths = [40, 9]
    c = Cache(9, lengths, hq, hkv, d, width=48)
    k_pool, v_pool = torch.zeros_like(c.k), torch.zeros_like(c.v)

    class Pool:
        def get_key_buffer(self, layer_id):
            return k_pool

        def get_value_buffer(self, layer_id):
            return v_pool

        def set_kv_buffer(self, layer, loc, k, v, *args, **kwargs):
            k_pool[loc.loc] = k
            v_pool[loc.loc] = v

    backend = SimpleNamespace(
        use_mla=False, dcp_size=1, page_size=1, _translate_kv_loc=None, use_sliding_window_kv_pool=False,
        token_to_kv_pool=Pool(), req_to_token=c.req_to_token,
        forward_metadata=SimpleNamespace(swa_out_cache_loc=None, out_cache_loc_full_physical=None),
    )  # fmt: skip
    backend._set_kv_buffer = lambda *a, **kw: TritonAttnBackend._set_kv_buffer(backend, *a, **kw)
    layer = SimpleNamespace(
        tp_q_head_num=hq, qk_head_dim=d, v_head_dim=d, layer_id=0, scaling=0.125, logit_cap=0.0,
        sliding_window_size=-1, is_cross_attention=False, attn_type=AttentionType.DECODER, k_scale=None,
        v_scale=None, xai_temperature_len=-1,
    )  # fmt: skip
    slots = c.req_to_token[1:3].long()
    # prefill request 0 (positions 0..31) and request 1 (0..7), then extend request 0 by 7 after its prefix
    for spans in ([(0, 0, 32), (1, 0, 8)], [(0, 32, 7)]):
        q = torch.cat([c.q[p : p + n, r] for r, p, n in spans]).reshape(-1, hq * d)
        loc = torch.cat([slots[r, p : p + n] for r, p, n in spans])
        fb = SimpleNamespace(
            spec_info=None, out_cache_loc=loc, req_pool_indices=torch.tensor([r + 1 for r, _, _ in spans]),
            extend_prefix_lens=torch.tensor([p for _, p, _ in spans]),
            extend_seq_lens=torch.tensor([n for _, _, n in spans]),
        )  # fmt: skip
        kv = (
            torch.cat([c.k[slots[r, p : p + n]] for r, p, n in spans]),
            torch.cat([c.v[slots[r, p : p + n]] for r, p, n in spans]),
        )
        o = gpu_patches.triton_forward_extend(backend, q, kv[0], kv[1], layer, fb)
        start = 0
        for r, p, n in spans:
            assert_same_bits(
                o[start : start + n].view(n, hq, d), c.reference(r, p, p + n, 0.125, 64), "hook extend"
            )
            start += n
    # decode: request 0 at position 39 and request 1 at position 8, one batch
    q = torch.stack([c.q[39, 0], c.q[8, 1]]).reshape(2, hq * d)
    loc = torch.stack([slots[0, 39], slots[1, 8]])
    fb = SimpleNamespace(
        spec_info=None, out_cache_loc=loc, req_pool_indices=torch.tensor([1, 2]),
        seq_lens=torch.tensor([40, 9]), seq_lens_cpu=torch.tensor([40, 9]),
    )  # fmt: skip
    o = gpu_patches.triton_forward_decode(backend, q, c.k[loc], c.v[loc], layer, fb)
    assert_same_bits(o[0].view(hq, d), c.reference(0, 39, 40, 0.125, 64)[0], "hook decode, request 0")
    assert_same_bits(o[1].view(hq, d), c.reference(1, 8, 9, 0.125, 64)[0], "hook decode, request 1")
    assert torch.equal(k_pool[slots[0, :40]], c.k[slots[0, :40]]), "the hooks wrote the KV"
    layer.logit_cap = 30.0
    try:
        gpu_patches.triton_forward_decode(backend, q, c.k[loc], c.v[loc], layer, fb)
        raise AssertionError("logit capping must be refused")
    except NotImplementedError as exc:
        assert "logit capping" in str(exc)
    print(
        "server hooks (forward_extend / forward_decode) == reference; outside the contract refused",
        flush=True,
    )


def _checks():
    import time

    pa._empty = nan_empty
    t0 = time.monotonic()
    _check_exp()
    _check_kernel_vs_reference()
    print(f"  {time.monotonic() - t0:.0f} s", flush=True)
    c, want = _check_decode_equals_extend_across_batches()
    print(f"  {time.monotonic() - t0:.0f} s", flush=True)
    _check_trainer_full_sequence(c, want)
    print(f"  {time.monotonic() - t0:.0f} s", flush=True)
    _check_negative_control_kernel()
    _check_matmul()
    print(f"  {time.monotonic() - t0:.0f} s", flush=True)
    _check_server_hooks()
    print(f"  {time.monotonic() - t0:.0f} s", flush=True)
    print("interpreter checks passed")


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch (this process): negative controls, backward, the trainer's HF wiring
# ---------------------------------------------------------------------------------------------------
def test_negative_control_another_chunk_size_or_a_fixed_split_count_is_not_bitwise():
    """What the fixed chunk size buys: with another chunk size, or with chunk boundaries that follow the
    sequence length (a fixed split count), a decode row is no longer the extend row."""
    c = Cache(11, [200], 8, 2, 128)
    scale = 128**-0.5
    extend16 = c.reference(0, 0, 200, scale, 16)
    extend32 = c.reference(0, 0, 200, scale, 32)
    n = count_differing(extend16[64:], extend32[64:])
    assert n > 0
    print(f"chunk 16 vs 32: {n} of {extend16[64:].numel()} output elements differ")

    # fixed split count: 4 splits of a power-of-two size covering the length (SGLang-style: the split
    # size follows the length). Decode at position p uses the split size for p + 1 keys; the extend row
    # at p, computed in a prefill of all 200 tokens, uses the split size for 200.
    def split_size(n_keys):
        return max(2, 1 << math.ceil(math.log2(math.ceil(n_keys / 4))))

    # fp32 inputs and outputs: a bf16 output rounding hides most last-bit differences
    c = Cache(12, [200], 8, 2, 128, torch.float32)
    prefill = c.reference(0, 0, 200, scale, split_size(200))  # splits of 64
    differing = 0
    for p in (30, 60, 99, 120):  # splits of 8, 16, 32, 32
        decode = c.reference(0, p, p + 1, scale, split_size(p + 1))
        differing += count_differing(decode[0], prefill[p])
    assert differing > 0
    print(f"fixed split count: {differing} of {4 * prefill[0].numel()} decode elements differ from prefill")


def test_full_sequence_backward_against_float64():
    """Gradients are not part of the contract (the backward recomputes in fp32); they must still be the
    gradients of attention: against float64 autograd, relative error < 1e-5 (fp32 inputs)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 13, 64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 13, 64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 13, 64, generator=g, requires_grad=True)
    w = torch.randn(2, 13, 4, 64, generator=g)
    (pa.full_sequence_attention(q, k, v, 0.125, 16) * w).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    (pa._attention_fp32(q64, k64, v64, 0.125).transpose(1, 2) * w.double()).sum().backward()
    for name, got, want in (("q", q.grad, q64.grad), ("k", k.grad, k64.grad), ("v", v.grad, v64.grad)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-5, (name, err)
    # and the forward agrees with float64 attention to fp32 accuracy (it is attention)
    out = pa.full_sequence_attention(q.detach(), k.detach(), v.detach(), 0.125, 16)
    ref = pa._attention_fp32(q64.detach(), k64.detach(), v64.detach(), 0.125).transpose(1, 2)
    assert ((out.double() - ref).abs().max() < 1e-5).item()


def test_trainer_gpu_contract_on_cpu_rows_do_not_depend_on_the_sequence_length(tiny_qwen3):
    """prepare_model(device="cpu") runs the GPU contract's attention (reference path) inside HF: the
    logits of a prefix, and of a KV-cache decode loop, are bitwise the whole sequence's logits."""
    from parity.gpu_contract import ATTENTION_NAMES, prepare_model
    from parity.tiny_models import load_hf_model

    model = prepare_model(load_hf_model(tiny_qwen3), device="cpu")
    assert model.config._attn_implementation == ATTENTION_NAMES["exact"]  # the CPU default
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 150), generator=g)
    with torch.no_grad():
        full = model(input_ids=ids).logits[0]
        for n in (1, 63, 64, 65, 129):
            assert_same_bits(model(input_ids=ids[:, :n]).logits[0], full[:n], f"prefix of {n}")
        # a decode loop over HF's KV cache (one-row steps: the split-KV decode path) gives the same rows
        out = model(input_ids=ids[:, :120], use_cache=True)
        rows, cache = [out.logits[0]], out.past_key_values
        for t in range(120, 150):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            rows.append(out.logits[0])
        assert_same_bits(torch.cat(rows), full, "prefill 120 + 30 decode steps vs one full forward")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the pytest test above"
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    from server_patches.launcher import CPU_RUNTIME_DIR, real_sgl_kernel_importable

    if not real_sgl_kernel_importable():
        sys.path.insert(0, str(CPU_RUNTIME_DIR))
    _checks()
