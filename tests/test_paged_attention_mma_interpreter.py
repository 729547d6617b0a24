"""parity.ops.paged_attention_mma on the CPU: its Triton kernels under the Triton interpreter. decode row
== extend row == the trainer's full-sequence row bitwise (at any batch composition, prefix hit, chunked
prefill, launch option; under the module's chunks and groups, and under 16-key chunks in groups of
3), every output written, results close to float64 attention, negative controls (another chunk or
group size changes the bits), and the decode fold's launch options (slices, register prefetch,
pipelining) giving the plain fold's bits.

The interpreter must be chosen before triton.jit decorates the kernels, so the kernel checks run in a
child Python with ``TRITON_INTERPRET=1`` (this file's ``__main__``). There ``tl.dot`` runs as numpy
sgemm on fp32-upcast operands (the module docstring says why), so the bits are not the GPU's; the
properties checked are the same (tests/test_paged_attention_mma_gpu.py checks them on the device).
Shapes are tiny (contexts up to ~200 keys: several 64-key chunks and 64-row tiles) to keep the child
well under a minute on two cores.

In this process, without a GPU: both kernels compiled for sm_90 (Triton's passes and bundled ptxas),
and their chunk arithmetic compared op for op (the premise of decode == extend on H100/H200); the
decode fold compiled for sm_90 as each benchmark candidate launches it (no spills, no fma).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from parity.ops.paged_attention_mma import FOLD_CANDIDATES, FoldLaunch
from tests.helpers import (
    assert_same_bits,
    count_differing,
    cubin_resource_usage,
    nan_empty,
    run_under_triton_interpreter,
)


class Cache:
    """A toy SGLang KV pool: [slots, Hkv, D] buffers, req_to_token rows of permuted slots (pool row
    i + 1 is request i; row 0 unused, as in SGLang), queries ``q[pos, req]``."""

    def __init__(self, seed, lengths, hq, hkv, d, dtype=torch.bfloat16):
        g = torch.Generator().manual_seed(seed)
        total = sum(lengths) + 7
        self.k = (torch.randn(total, hkv, d, generator=g) * 1.5).to(dtype)
        self.v = torch.randn(total, hkv, d, generator=g).to(dtype)
        perm = torch.randperm(total, generator=g)
        self.req_to_token = torch.zeros(len(lengths) + 1, max(lengths) + 5, dtype=torch.int32)
        start = 0
        for i, n in enumerate(lengths):
            self.req_to_token[i + 1, :n] = perm[start : start + n].int()
            start += n
        self.q = (torch.randn(max(lengths), len(lengths), hq, d, generator=g) * 1.5).to(dtype)
        self.lengths, self.hq, self.hkv, self.d = lengths, hq, hkv, d
        self.pools = torch.arange(1, len(lengths) + 1)

    def extend(self, pam, spans, scale, **kw):
        """spans [(req, prefix, new)] as one SGLang extend batch."""
        q = torch.cat([self.q[p : p + n, r] for r, p, n in spans])
        return pam.paged_attention_extend(
            q, self.k, self.v, self.req_to_token, self.pools[[r for r, _, _ in spans]],
            torch.tensor([p for _, p, _ in spans]), torch.tensor([n for _, _, n in spans]), scale, **kw,
        )  # fmt: skip

    def decode(self, pam, rows, scale, **kw):
        """rows [(req, pos)] as one decode batch (each request's KV up to pos)."""
        q = torch.stack([self.q[p, r] for r, p in rows])
        return pam.paged_attention_decode(
            q, self.k, self.v, self.req_to_token, self.pools[[r for r, _ in rows]],
            torch.tensor([p + 1 for _, p in rows]), scale, **kw,
        )  # fmt: skip

    def float64(self, req, pos, scale):
        """Attention of request ``req``'s row at ``pos`` in float64: [Hq, D]."""
        slots = self.req_to_token[req + 1, : pos + 1].long()
        group = self.hq // self.hkv
        k = self.k[slots].double().repeat_interleave(group, 1)  # [n, Hq, D]
        v = self.v[slots].double().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", self.q[pos, req].double(), k) * scale
        return torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)

    def full_kv(self, req, n):
        """Request ``req``'s first n keys/values in HF's layout [1, Hkv, n, D]."""
        slots = self.req_to_token[req + 1, :n].long()
        return self.k[slots].permute(1, 0, 2)[None], self.v[slots].permute(1, 0, 2)[None]


# ---------------------------------------------------------------------------------------------------
# The kernels under the interpreter (child process)
# ---------------------------------------------------------------------------------------------------
def test_mma_kernels_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "interpreter checks passed" in proc.stdout
    print(proc.stdout)


def _check_decode_equals_extend(pam, contract: dict):
    """Three requests (200, 70, 131 keys; Hq 4, Hkv 2, D 64): the extend rows of a mixed batch with
    prefix hits, the decode rows of other batches, chunked prefill, launch options: one set of bits,
    under the definition's ``contract`` (chunk and group sizes: {} is the module's)."""
    lengths = [200, 70, 131]
    c = Cache(1, lengths, 4, 2, 64)
    scale = 0.125
    for out_dtype in (torch.bfloat16, torch.float32):
        tag = f"{out_dtype} out, {contract or 'the module contract'}"

        def kw(q_rows, _dt=out_dtype):
            out = {} if _dt == torch.bfloat16 else {"out": torch.full((q_rows, 4, 64), math.nan)}
            return dict(contract, **out)

        # request 0 prefilled from scratch, request 1 after a 5-token prefix hit, request 2 after 100
        ext = c.extend(pam, [(0, 0, 200), (1, 5, 65), (2, 100, 31)], scale, **kw(296))
        assert not torch.isnan(ext.float()).any(), f"{tag}: unwritten (poisoned) extend outputs"
        want0 = ext[:200]
        if out_dtype == torch.bfloat16:
            ext_bf16 = ext
        else:  # the bf16 output is the fp32 one rounded once (nearest even)
            assert_same_bits(ext_bf16, ext.bfloat16(), "bf16 out vs fp32 out rounded")
        # the same rows as chunked prefill (15 + 50 + 70 + 65, other requests in the batches)
        parts = [
            c.extend(pam, [(0, 0, 15)], scale, **kw(15)),
            c.extend(pam, [(2, 0, 3), (0, 15, 50)], scale, **kw(53))[3:],
            c.extend(pam, [(0, 65, 70), (1, 0, 9)], scale, **kw(79))[:70],
            c.extend(pam, [(1, 60, 10), (0, 135, 65)], scale, **kw(75))[10:],
        ]
        assert_same_bits(torch.cat(parts), want0, f"chunked prefill 15 + 50 + 70 + 65 vs prefill ({tag})")
        # decode rows: alone, batched, with spare grid chunks and other launch options
        rows = [(0, 199), (1, 69), (2, 130), (0, 63), (0, 64), (0, 127), (0, 128), (0, 0), (1, 5)]
        ref = {
            (0, 199): ext[199], (1, 69): ext[264], (2, 130): ext[295], (0, 63): ext[63], (0, 64): ext[64],
            (0, 127): ext[127], (0, 128): ext[128], (0, 0): ext[0], (1, 5): ext[200],
        }  # fmt: skip
        batch = c.decode(pam, rows, scale, **kw(len(rows)))
        assert not torch.isnan(batch.float()).any(), f"{tag}: unwritten (poisoned) decode outputs"
        for i, row in enumerate(rows):
            assert_same_bits(batch[i], ref[row], f"decode {row} in a batch of {len(rows)} vs extend ({tag})")
        for gpp, max_chunks in ((1, None), (3, 17), (2, 40)):
            alone = c.decode(pam, [(0, 199)], scale, groups_per_program=gpp, max_chunks=max_chunks, **kw(1))
            assert_same_bits(alone[0], ref[(0, 199)], f"decode alone, {gpp} groups/program ({tag})")
        sub = c.decode(pam, [(2, 130), (0, 128)], scale, groups_per_program=2, **kw(2))
        assert_same_bits(sub, torch.stack([ref[(2, 130)], ref[(0, 128)]]), f"decode sub-batch ({tag})")
        # explicit rows in any order (paged_attention_rows): the same bits
        order = torch.tensor([7, 3, 199, 64, 65, 0, 150])
        got = pam.paged_attention_rows(
            c.q[order, 0].contiguous(), c.k, c.v, c.req_to_token, torch.ones(7, dtype=torch.long), order,
            scale, **kw(7),
        )  # fmt: skip
        assert_same_bits(got, want0[order], f"explicit rows in another order vs extend ({tag})")
        print(f"decode == extend == chunked prefill == explicit rows, any batch ({tag})", flush=True)
        if out_dtype == torch.float32:
            for r, p in ((0, 199), (0, 64), (1, 69), (2, 130), (0, 0)):
                err = (ref[(r, p)].double() - c.float64(r, p, scale)).abs().max().item()
                assert err < 3e-3, (r, p, err)
            print("fp32 outputs within 3e-3 of float64 attention", flush=True)
    for r, p, i in ((0, 199, 199), (1, 30, 225), (2, 110, 275)):
        err = (ext_bf16[i].double() - c.float64(r, p, scale)).abs().max().item()
        assert err < 2e-2, (r, p, err)
    print("bf16 outputs within 2e-2 of float64 attention", flush=True)
    return c, ext_bf16[:200]


def _check_trainer_full_sequence(pam, c, want0, contract: dict):
    """The trainer's full-sequence attention (HF layout) gives the server's rows (under ``contract``),
    and its backward is the gradient of attention."""
    k, v = c.full_kv(0, 200)
    q = c.q[:200, 0].permute(1, 0, 2)[None]  # [1, Hq, 200, D]
    out = pam.full_sequence_attention(q, k, v, 0.125, **contract)  # [1, 200, Hq, D]
    assert_same_bits(out[0], want0, f"trainer full sequence vs server rows ({contract})")
    tail = pam.full_sequence_attention(q[:, :, 150:], k, v, 0.125, **contract)  # the last 50 rows
    assert_same_bits(tail[0], want0[150:], f"trainer rows 150..199 against the 200 keys ({contract})")
    if contract:
        return
    # two sequences in one batch (B = 2): each is its own request
    k2, v2 = c.full_kv(2, 131)
    q2 = c.q[:131, 2].permute(1, 0, 2)[None]
    both = pam.full_sequence_attention(
        torch.cat([q[:, :, 69:200], q2]), torch.cat([k[:, :, 69:200], k2]), torch.cat([v[:, :, 69:200], v2]),
        0.125,
    )  # fmt: skip
    alone = pam.full_sequence_attention(q2, k2, v2, 0.125)
    assert_same_bits(both[1], alone[0], "trainer batch of 2 vs alone")
    print("trainer full sequence == server rows (any batch)", flush=True)
    # backward: the fp32 recomputation's gradients against float64 autograd
    g = torch.Generator().manual_seed(3)
    qg = torch.randn(2, 4, 13, 64, generator=g).bfloat16().requires_grad_(True)
    kg = torch.randn(2, 2, 13, 64, generator=g).bfloat16().requires_grad_(True)
    vg = torch.randn(2, 2, 13, 64, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(2, 13, 4, 64, generator=g)
    (pam.full_sequence_attention(qg, kg, vg, 0.125).float() * w).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (qg, kg, vg))
    (pam._attention_fp32(q64, k64, v64, 0.125).transpose(1, 2) * w.double()).sum().backward()
    for name, got, want in (("q", qg.grad, q64.grad), ("k", kg.grad, k64.grad), ("v", vg.grad, v64.grad)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-2, (name, err)  # bf16 gradients
    print("full_sequence_attention backward == float64 attention gradients (bf16 rounding)", flush=True)


def _check_shapes(pam):
    """Other GQA groups, D = 128, fp16: decode == extend; MHA (G = 1) and a whole group of 4."""
    for hq, hkv, d, dtype in ((2, 2, 128, torch.bfloat16), (4, 1, 64, torch.float16)):
        c = Cache(hq * d, [90, 66], hq, hkv, d, dtype)
        scale = d**-0.5
        ext = c.extend(pam, [(0, 10, 80), (1, 0, 66)], scale)
        dec = c.decode(pam, [(1, 65), (0, 89), (0, 64)], scale)
        assert not torch.isnan(dec.float()).any() and not torch.isnan(ext.float()).any()
        tag = f"Hq {hq} Hkv {hkv} D {d} {dtype}"
        assert_same_bits(dec, torch.stack([ext[-1], ext[79], ext[54]]), f"decode vs extend, {tag}")
        err = (dec[1].double() - c.float64(0, 89, scale)).abs().max().item()
        assert err < 2e-2, (tag, err)
        print(f"decode == extend, close to float64: {tag}", flush=True)


def _check_negative_control(pam):
    """What the fixed chunk and group buy: a decode with 32- or 128-key chunks (another split of the
    keys, as SGLang's length-dependent splits give), or with other groups of 16-key chunks, is not the
    extend row (fp32 outputs show every bit)."""
    c = Cache(6, [200], 4, 2, 64)
    rows = [(0, 199), (0, 150), (0, 100)]
    want = c.extend(pam, [(0, 0, 200)], 0.125, out=torch.empty(200, 4, 64))
    want = want[[199, 150, 100]]
    same = c.decode(pam, rows, 0.125, out=torch.empty(3, 4, 64))
    assert_same_bits(same, want, "decode vs extend, both chunk 64 (fp32 out)")
    for chunk in (32, 128):
        other = c.decode(pam, rows, 0.125, chunk=chunk, out=torch.empty(3, 4, 64))
        n = count_differing(other, want)
        assert n > 0, f"a decode with chunk {chunk} should not equal the extend rows (chunk 64)"
        for i, (r, p) in enumerate(rows):  # other bits, still attention
            assert (other[i].double() - c.float64(r, p, 0.125)).abs().max().item() < 3e-3
        print(
            f"negative control: decode with chunk {chunk} vs extend with chunk 64: "
            f"{n} of {want.numel()} differ"
        )
    want = c.extend(pam, [(0, 0, 200)], 0.125, chunk=16, group=3, out=torch.empty(200, 4, 64))[
        [199, 150, 100]
    ]
    same = c.decode(pam, rows, 0.125, chunk=16, group=3, out=torch.empty(3, 4, 64))
    assert_same_bits(same, want, "decode vs extend, both 16-key chunks in groups of 3 (fp32 out)")
    for group in (1, 2, 4):
        other = c.decode(pam, rows, 0.125, chunk=16, group=group, out=torch.empty(3, 4, 64))
        n = count_differing(other, want)
        assert n > 0, f"a decode with groups of {group} should not equal the extend rows (groups of 3)"
        print(f"negative control: decode with groups of {group} vs extend with groups of 3: {n} differ")


def _combine_options(pam, extra=()):
    """The fold's launch options to check: the benchmark's candidates (one per interpreter-visible
    layout: stages, unroll and warps do not exist here) and ``extra``."""
    seen, out = set(), []
    for fold in [*pam.FOLD_CANDIDATES.values(), *extra]:
        key = (fold.d_slices, fold.row_slices, fold.prefetch)
        if key not in seen:
            seen.add(key)
            out.append(fold)
    return out


def _decode_and_fold(pam, c, rows, scale, out_dtype):
    """Decode ``rows`` in groups of one chunk (a fold step per chunk: P = 2 .. 32 meet whole blocks and
    tails at these lengths) with the default fold, poisoned output: (that output, ``fold``), where
    ``fold(opts)`` runs the fold alone with launch options ``opts`` on the same partials (their buffers
    poisoned before the partials kernel wrote them) into a fresh poisoned output."""
    captured = []
    launch = pam._launch_combine

    def capture(*args):
        captured.append(args)
        return launch(*args)

    pam._launch_combine = capture
    try:
        out = torch.full((len(rows), c.hq, c.d), math.nan, dtype=out_dtype)
        want = c.decode(pam, rows, scale, group=1, out=out)
    finally:
        pam._launch_combine = launch
    mid, mm, ml, seq, out, span, _, pdl = captured[0]

    def fold(fold_launch):
        config = pam._combine_config(mid.shape[3], mid.shape[4], fold_launch)
        return launch(mid, mm, ml, seq, torch.full_like(out, math.nan), span, config, pdl)

    return want, fold


PLAIN_FOLD = FoldLaunch(d_slices=1, row_slices=1, prefetch=0, num_warps=4, num_stages=2, unroll=1)


def _check_combine_options(pam):
    """Every launch option of the decode fold (D and row slices, partials loaded P chunks ahead, the
    pipelined loop's stages / unroll, warps) and the default give the bits of the plain serial fold
    (``PLAIN_FOLD``): mixed lengths (1, not multiples of 64, chunk counts that are not multiples of P,
    fewer chunks than P), several batches, G = 4 and G = 3 (a padded row), fp32 and bf16 outputs,
    poisoned outputs and partials. (Hkv 1: the interpreter's time grows with the programs, and the
    slices multiply them.)"""
    cand = pam.FOLD_CANDIDATES
    odd = [FoldLaunch(prefetch=p) for p in (1, 2, 3, 5)] + [
        FoldLaunch(d_slices=16, row_slices=2, prefetch=3),
        FoldLaunch(d_slices=2, row_slices=2, prefetch=0, num_stages=1, unroll=1),
    ]
    some = [odd[2], odd[4], cand["d4_r1_p16_w1"], cand["d2_r1_s6_u8_w2"]]
    c = Cache(11, [700, 1, 65, 129, 7, 200], 4, 1, 64)
    n = 0
    for rows, options, dtypes in (
        # 11, 1 and 3 chunks: P = 2 .. 32 meet whole blocks, tails, and fewer chunks than P
        ([(0, 699), (1, 0), (3, 128)], _combine_options(pam, odd), (torch.float32,)),
        ([(0, 699), (1, 0), (2, 64), (3, 128), (0, 191)], some, (torch.bfloat16,)),
        ([(0, 699)], some, (torch.float32,)),
        ([(4, 6), (5, 199), (1, 0)], some, (torch.float32,)),
    ):
        for dt in dtypes:
            default, fold = _decode_and_fold(pam, c, rows, 0.125, dt)
            want = fold(PLAIN_FOLD)
            assert not torch.isnan(want.float()).any(), "unwritten (poisoned) decode outputs"
            assert_same_bits(
                default, want, f"the default fold vs the plain one, batch of {len(rows)}, {dt} out"
            )
            for launch in options:
                assert_same_bits(fold(launch), want, f"decode fold {launch}, batch of {len(rows)}, {dt} out")
                n += 1
            if len(rows) > 1:  # the public call: the partials, then the fold with the options
                for launch in some[:2]:
                    got = c.decode(
                        pam, rows, 0.125, group=1, out=torch.full_like(want, math.nan), fold=launch
                    )
                    assert_same_bits(got, want, f"decode with {launch}, batch of {len(rows)}, {dt} out")
                    n += 1
    # G = 3 (padded to 4 rows: a row slice with no head), D 32 (4 columns a slice at 8 D slices)
    c3 = Cache(12, [300, 1, 130], 6, 2, 32)
    _, fold = _decode_and_fold(pam, c3, [(0, 299), (1, 0), (2, 129)], 0.2, torch.float32)
    want = fold(PLAIN_FOLD)
    for launch in (
        FoldLaunch(row_slices=4, prefetch=2),
        FoldLaunch(d_slices=8, row_slices=2, prefetch=4),
        FoldLaunch(d_slices=4, row_slices=1),
    ):
        assert_same_bits(fold(launch), want, f"decode fold {launch}, G = 3")
        n += 1
    print(f"decode fold launch options: {n} runs, the default fold's bits", flush=True)


def _check_combine_refusals(pam):
    c = Cache(13, [10], 4, 2, 64)
    for opts in (
        dict(fold=FoldLaunch(d_slices=3)), dict(fold=FoldLaunch(d_slices=128)),
        dict(fold=FoldLaunch(row_slices=4)), dict(fold=FoldLaunch(prefetch=-1)),
        dict(fold=FoldLaunch(num_warps=3)), dict(fold=FoldLaunch(prefetch=0, num_stages=0)),
        dict(pdl=True),  # pdl: no sm_90 GPU here
    ):  # fmt: skip
        try:
            c.decode(pam, [(0, 9)], 0.1, **opts)
        except ValueError as exc:
            print(f"refused {opts}: {exc}", flush=True)
        else:
            raise AssertionError(f"{opts} should be refused")


def _check_refusals(pam):
    c = Cache(7, [10], 4, 2, 64, torch.float32)
    for call, what in (
        (lambda: c.decode(pam, [(0, 9)], 0.1), "fp32 inputs"),
        (lambda: Cache(8, [10], 4, 2, 64).decode(pam, [(0, 9)], 0.1, num_warps=8), "num_warps 8"),
    ):
        try:
            call()
        except (NotImplementedError, ValueError) as exc:
            print(f"refused {what}: {exc}", flush=True)
        else:
            raise AssertionError(f"{what} should be refused")


def _checks():
    import time

    from parity.ops import paged_attention_mma as pam

    pam._empty = nan_empty
    t0 = time.monotonic()
    # the module's contract (200 keys: one group of 4 chunks) and 16-key chunks in groups of 3 (13
    # chunks: 5 groups, the last one short; extend tiles whose rows end in different groups)
    for contract in ({}, dict(chunk=16, group=3)):
        c, want0 = _check_decode_equals_extend(pam, contract)
        print(f"  {time.monotonic() - t0:.0f} s", flush=True)
        _check_trainer_full_sequence(pam, c, want0, contract)
        print(f"  {time.monotonic() - t0:.0f} s", flush=True)
    _check_shapes(pam)
    _check_negative_control(pam)
    _check_refusals(pam)
    _check_combine_refusals(pam)
    print(f"  {time.monotonic() - t0:.0f} s", flush=True)
    _check_combine_options(pam)
    print(f"  {time.monotonic() - t0:.0f} s", flush=True)
    print("interpreter checks passed")


# ---------------------------------------------------------------------------------------------------
# This process (no interpreter)
# ---------------------------------------------------------------------------------------------------
def _compile_sm90(fn, types: dict, consts: dict, num_stages: int, num_warps: int = 4):
    """Compile a kernel for sm_90 (H100/H200) without a GPU: Triton's own passes and bundled ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    # as a real launch specializes them: 16-byte aligned pointers, strides that are multiples of 16
    strides = {"sq_t", "sq_b", "sq_h", "sk_t", "sk_h", "sv_t", "sv_h", "so_t", "so_b", "so_h", "stride_r"}
    aligned = [n for n in sig if n in strides or sig[n].startswith("*")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    opts = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def _tile_arithmetic(ttgir: str) -> list[list[str]]:
    """Each copy of the chunk arithmetic in a TTGIR module: from a first tensor-core dot to the second
    (scores, row max, exp2, row sum, ``acc * alpha``, p @ v), the ops on floating-point
    values only (the dots, element-wise ops, reductions, layout conversions), in order; loads, address
    and index arithmetic, pipelining and the operand lists of the dots' waits (scheduling: which
    in-flight dots a wait covers) dropped; SSA names and locations dropped, layout aliases replaced by
    their definitions (so layouts compare by value)."""
    import re

    aliases = dict(re.findall(r"^(#\w+) = (#[^\n]*?)(?: loc\(.*\))?$", ttgir, re.M))
    ops = ("arith.", "math.", '"tt.reduce"', "tt.reduce.return", "}) :", "ttng.warp_group_dot ",
           "ttg.convert_layout", "tt.broadcast", "tt.expand_dims", "tt.splat")  # fmt: skip
    copies, cur = [], None
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line and cur is None:
            cur = []
        if cur is None or "warp_group_dot_wait" in line:
            continue
        line = re.sub(r"%[\w#]+", "%", re.sub(r"loc\(.*\)", "", line)).replace(", mutable", "").strip()
        op = line.split("= ", 1)[-1]
        floats = re.search(r"\b(f32|bf16|f16)\b|x(f32|bf16|f16)\b", line) and "!tt.ptr" not in line
        if op.startswith('"tt.reduce"') or (op.startswith(ops) and floats):
            for a in sorted(aliases, key=len, reverse=True):
                line = re.sub(re.escape(a) + r"\b", aliases[a], line)
            cur.append(line)
            if op.startswith("ttng.warp_group_dot ") and len(cur) > 1:  # the second dot: p @ v
                copies.append(cur)
                cur = None
    return copies


def test_decode_and_extend_compile_to_the_same_tile_arithmetic_on_sm90():
    """The premise of decode == extend, checked on the compiler's output (no GPU needed): compiled for
    sm_90, every copy of the chunk arithmetic in the extend kernel (two loops) and in the decode kernel,
    under other launch options and specializations, is the same TTGIR: wgmma (MMA v3) of the same
    instruction shapes and warps, the row max and sum on the same register layout, the same
    element-wise ops. And no fma in the PTX (fusion disabled: every product rounded before its sum)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles with the real Triton JIT")
    from parity.ops import paged_attention_mma as pam

    common = dict(Q="*bf16", K="*bf16", V="*bf16", sk_t="i32", sk_h="i32", sv_t="i32", sv_h="i32", R2T="*i32")
    common.update(stride_r="i32", qk_scale="fp32", sq_h="i32")
    ext_types = dict(common, sq_t="i32", SEG="*i32", S="i32", ROW_POS="*i64", n_tiles="i32")
    ext_types.update(OUT="*bf16", so_t="i32", so_h="i32")
    dec_types = dict(common, sq_b="i32", POOL="*i64", SEQ="*i64", MID="*fp32", MM="*fp32", ML="*fp32")
    dec_types.update(max_groups="i32", gpp="i32")
    shape = dict(
        G=4, D=128, C=pam.CONTRACT_CHUNK, GROUP=pam.CONTRACT_GROUP, BLOCK_M=pam.BLOCK_M, INTERP=False
    )
    ext_consts = dict(shape, SEARCH=pam.SEARCH_BLOCK, HAS_ROW_POS=False, OUT_BF16_INTERP=False)
    dec_consts = dict(shape, PDL=False)
    # the variants a real launch compiles (an int argument equal to 1 becomes a constant) and options
    kernels = {
        "extend": _compile_sm90(pam._extend_kernel, ext_types, ext_consts, pam.EXTEND_NUM_STAGES),
        "extend, one request": _compile_sm90(pam._extend_kernel, ext_types, dict(ext_consts, S=1), 1),
        "decode, 1 stage": _compile_sm90(pam._decode_partials_kernel, dec_types, dec_consts, 1),
        "decode, 2 stages": _compile_sm90(pam._decode_partials_kernel, dec_types, dec_consts, 2),
        "decode, 1 group/program": _compile_sm90(
            pam._decode_partials_kernel, dec_types, dict(dec_consts, gpp=1), 3
        ),
        "decode, PDL, 4 stages": _compile_sm90(
            pam._decode_partials_kernel, dec_types, dict(dec_consts, PDL=True), 4
        ),
    }
    copies = {name: _tile_arithmetic(k.asm["ttgir"]) for name, k in kernels.items()}
    assert [len(c) for c in copies.values()] == [1, 1, 1, 1, 1, 1], {k: len(c) for k, c in copies.items()}
    ref = copies["extend"][0]
    assert any("tt.reduce" in line for line in ref) and any("math.exp2" in line for line in ref)
    for name, cs in copies.items():
        for i, c in enumerate(cs):
            assert c == ref, (
                f"{name} (copy {i}): the chunk arithmetic differs from the extend's:\n"
                + "\n".join(f"{a}  |  {b}" for a, b in zip(c, ref, strict=False) if a != b)
            )
    for k in kernels.values():
        ptx = k.asm["ptx"]
        assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in ptx
        assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in ptx
        assert "fma.rn.f32" not in ptx, "an fma in the PTX: fusion must be off"
    n = sum(len(c) for c in copies.values())
    print(f"sm_90: {n} copies of the chunk arithmetic, one TTGIR ({len(ref)} ops)")


@pytest.mark.parametrize("name", ["default", *FOLD_CANDIDATES])
def test_decode_fold_launches_compile_for_sm90(name):
    """The decode fold as launched by default and by each candidate the benchmark's --sweep times
    (``FOLD_CANDIDATES``) compiles for sm_90 at the benchmark's shape (G 4, D 128, bf16 out): no
    register spills; the products rounded before their sums (no fma); exp2 as ex2.approx and the IEEE
    division, as the partials kernel's; the pipelined loop's loads through cp.async (the pipeliner
    applied: its stages mean something), the register prefetch's plain loads."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles with the real Triton JIT")
    from parity.ops import paged_attention_mma as pam

    cfg = pam._combine_config(4, 128, FOLD_CANDIDATES.get(name))
    types = dict(MID="*fp32", MM="*fp32", ML="*fp32", max_groups="i32", SEQ="*i64", OUT="*bf16")
    types.update(so_b="i32", so_h="i32")
    consts = {k: v for k, v in cfg.items() if k not in ("slices", "num_warps")}
    consts.update(G=4, D=128, SPAN=pam.CONTRACT_CHUNK * pam.CONTRACT_GROUP, PDL=True, INTERP=False)
    consts.update(OUT_BF16_INTERP=False)
    # num_stages 3: Triton's default, as the launch passes none (the loop's own stages are STAGES)
    k = _compile_sm90(pam._decode_combine_kernel, types, consts, 3, cfg["num_warps"])
    ptx = k.asm["ptx"]
    assert "fma.rn.f32" not in ptx, "an fma in the PTX: fusion must be off"
    assert "ex2.approx.ftz.f32" in ptx and "div.rn.f32" in ptx
    assert "griddepcontrol.wait" in ptx, "launched as a dependent of the partials: it must wait for them"
    if cfg["PREFETCH"]:
        assert "cp.async" not in ptx, "register prefetch: the loads should stay plain"
    elif cfg["STAGES"] > 1:
        assert "cp.async" in ptx, "the fold's loop was not pipelined"
    usage = cubin_resource_usage(k.asm["cubin"])
    if usage is not None:
        assert "STACK:0" in usage, usage  # no register spills
        print(name, usage.strip().splitlines()[-1].strip())


def test_mma_refuses_cpu_tensors_without_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter")
    from parity.ops import paged_attention_mma as pam

    c = Cache(9, [10], 4, 2, 64)
    with pytest.raises(NotImplementedError, match="CUDA tensors"):
        c.decode(pam, [(0, 9)], 0.125)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the pytest test above"
    _checks()
