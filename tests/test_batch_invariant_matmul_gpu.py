"""parity.ops.batch_invariant_matmul on a CUDA GPU (skipped without one).

- the family claim the M dispatch rests on: every member of ``CANDIDATES`` (pointer and persistent TMA
  kernels) gives bitwise the canonical ``CONFIG``'s output (odd M, K tails, odd N, bias, bf16 and
  fp16, normal and wide-exponent inputs, a TMA store with a partial N tile, and a K whose rows TMA
  cannot address, where TMA members run their pointer-kernel fallback);
- rows bitwise independent of M (1..8192) under the dispatch, for small test shapes and the issue's
  decode / prefill shapes (a row alone == the same row inside M = 4096, several members involved);
- each persistent TMA member on its own at the issue's shapes: rows alone == rows inside M = 4096
  (where the programs run several tiles each), and its M = 4096 product == ``CONFIG``'s;
- the product within its error bound;
- negative controls: cuBLAS's rows depend on M; the same product with its K blocks in another order
  differs (so the bitwise comparisons can see a change of summation order).

The CPU side (dispatch purity, wgmma lowering of every member for sm_90):
tests/test_batch_invariant_matmul.py; under the interpreter: tests/test_batch_invariant_matmul_interpreter.py
and tests/test_paged_attention_interpreter.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from parity.ops import batch_invariant_matmul as bm

pytestmark = pytest.mark.gpu

DEV = "cuda"
SHAPES = [(1024, 1024), (3072, 1024), (1024, 3072), (4096, 4096), (151936, 1024)]  # (N, K)
MS = (1, 2, 3, 7, 8, 16, 33, 64, 129, 256, 1000, 4097)
# the issue's shapes: Qwen3-8B-like q/k/v/o, MLP and lm_head (N, K)
ISSUE_SHAPES = [
    (4096, 4096), (12288, 4096), (4096, 12288), (151936, 1024), (14336, 4096), (4096, 14336), (1024, 4096),
]  # fmt: skip


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(bm, "_empty", lambda *a, **kw: torch.empty(*a, **kw).fill_(math.nan))


def _bits(t):
    return t.contiguous().view(torch.int16)


def _mismatch(got, want) -> str | None:
    same = _bits(got) == _bits(want)
    if bool(same.all()):
        return None
    diff = (got.float() - want.float()).abs()
    return f"{int((~same).sum())} of {same.numel()} elements differ, max |diff| {diff.max().item():.3e}"


@pytest.mark.parametrize("n,k", SHAPES)
def test_rows_do_not_depend_on_m(poison, n, k):
    """Under the dispatch (``config=None``): the parts use the members of their M ranges, the whole
    M = 8192 another one."""
    g = torch.Generator(device=DEV).manual_seed(n + k)
    w = (torch.randn(n, k, generator=g, device=DEV) * k**-0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=g, device=DEV).to(torch.bfloat16) if n == 3072 else None
    x = torch.randn(8192, k, generator=g, device=DEV).to(torch.bfloat16)
    full = bm.batch_invariant_linear(x, w, bias)
    assert not torch.isnan(full.float()).any(), "unwritten (poisoned) outputs"
    for m in MS:
        for off in (0, 8192 - m, (8192 - m) // 3):
            part = bm.batch_invariant_linear(x[off : off + m], w, bias)
            bad = _mismatch(part, full[off : off + m])
            assert bad is None, f"M={m} ({bm.config_for(m, n, k).name}) rows {off}.. vs M=8192: {bad}"
    # the right product: within fp32-accumulation error of the blocked reference (a bound, not bits)
    ref = bm.linear_reference(x[:64], w, bias)
    err = (full[:64].float() - ref.float()).abs()
    bound = 2**-7 * ref.float().abs() + 1e-3
    assert bool((err <= bound).all()), f"max error {err.max().item():.3e}"


# (N, K, dtype, bias): odd N, K tails (1000 = 15 * 64 + 40, 3000 = 46 * 64 + 56), a square MLP-like shape.
# For the TMA members: N = 1001 / 257 store Y by masked pointer stores (rows of 2002 / 514 bytes), 4096
# and 1032 by TMA (1032 = 4 * 256 + 8: a partial N tile); K = 1003 (rows of 2006 bytes) is a layout TMA
# cannot address, so they run the pointer kernel with their tile there. The wide K steps (128, 256) run
# where they divide K: 4096, and 3072 / 2048 (a partial N tile of BLOCK_N 16 / 32 at N = 1000).
FAMILY_CASES = [
    (1001, 1000, torch.bfloat16, True),
    (4096, 4096, torch.bfloat16, False),
    (257, 3000, torch.bfloat16, False),
    (1001, 1000, torch.float16, True),
    (1032, 1000, torch.float16, True),
    (1001, 1003, torch.bfloat16, True),
    (1000, 3072, torch.bfloat16, True),
    (1024, 2048, torch.float16, False),
]
FAMILY_MS = (1, 7, 65, 300, 1000)


def _inputs(g, m, n, k, dtype, wide):
    x = torch.randn(m, k, generator=g, device=DEV)
    w = torch.randn(n, k, generator=g, device=DEV) * k**-0.5
    if wide:  # exponents spread over 2^-8 .. 2^8: products of very different sizes in one k16 group
        x = x * torch.exp2(torch.randint(-8, 9, (m, k), generator=g, device=DEV).float())
        w = w * torch.exp2(torch.randint(-8, 9, (n, k), generator=g, device=DEV).float())
    if dtype == torch.float16:
        x, w = x.clamp(-3e4, 3e4), w.clamp(-3e4, 3e4)
    return x.to(dtype), w.to(dtype)


@pytest.mark.parametrize("n,k,dtype,has_bias", FAMILY_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_family_members_give_the_canonical_bits(poison, n, k, dtype, has_bias):
    """The premise of the M dispatch: every config in ``CANDIDATES`` that serves K (a wide K step: K a
    multiple of it) computes every element bitwise as ``CONFIG`` does, on fresh inputs per (M, kind).
    All failures are collected and reported."""
    g = torch.Generator(device=DEV).manual_seed(n * 7 + k)
    members = [c for c in bm.CANDIDATES if bm.serves_k(c, k)]
    failures, compared = [], 0
    for wide in (False, True):
        for m in FAMILY_MS:
            x, w = _inputs(g, m, n, k, dtype, wide)
            bias = torch.randn(n, generator=g, device=DEV).to(dtype) if has_bias else None
            want = bm.batch_invariant_mm(x, w, bias, config=bm.CONFIG)
            assert not torch.isnan(want.float()).any(), "unwritten (poisoned) outputs"
            for c in members:
                got = bm.batch_invariant_mm(x, w, bias, config=c)
                compared += got.numel()
                bad = _mismatch(got, want)
                if bad is not None:
                    failures.append(f"{c.name} M={m} {'wide' if wide else 'normal'}: {bad}")
    print(f"{len(members)} members x {compared // len(members)} elements compared, N={n} K={k}")
    assert not failures, "family members differ from CONFIG " + bm.CONFIG.name + ":\n" + "\n".join(failures)


@pytest.mark.parametrize("n,k", ISSUE_SHAPES)
def test_dispatched_rows_alone_equal_rows_in_large_batches(poison, n, k):
    """Decode (a row alone, a few rows) and prefill (M = 4096) rows of the issue's shapes under the
    dispatch: the same bits, though the dispatch runs them with different family members."""
    g = torch.Generator(device=DEV).manual_seed(n ^ k)
    w = (torch.randn(n, k, generator=g, device=DEV) * k**-0.5).to(torch.bfloat16)
    x = torch.randn(4096, k, generator=g, device=DEV).to(torch.bfloat16)
    full = bm.batch_invariant_linear(x, w)
    assert not torch.isnan(full.float()).any(), "unwritten (poisoned) outputs"
    used = {bm.config_for(4096, n, k)}
    cases = [(1, 0), (1, 1), (1, 2047), (1, 4095), (4, 100), (16, 4080), (64, 3), (200, 1000), (1000, 3000)]
    for m, off in cases:
        part = bm.batch_invariant_linear(x[off : off + m], w)
        used.add(bm.config_for(m, n, k))
        bad = _mismatch(part, full[off : off + m])
        assert bad is None, f"M={m} ({bm.config_for(m, n, k).name}) rows {off}.. vs M=4096: {bad}"
    print(f"N={n} K={k}: members used {sorted(c.name for c in used)}")
    assert len(used) >= 2 or len({c for _, c in bm.DISPATCH}) == 1, "the test should span members"


TMA_MEMBERS = [c for c in bm.CANDIDATES if c.kernel == "tma_persistent"]


@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (4096, 14336), (151936, 1024)])
def test_tma_members_rows_alone_equal_rows_in_m4096(poison, n, k):
    """Each ``tma_persistent`` member, given explicitly (not through the dispatch): rows alone and in
    small batches at several offsets == the same rows inside M = 4096, where the persistent grid (one
    program per SM) strides over more tiles than programs -- at N >= 4096 for every member -- so the
    flattened loop crosses tile boundaries; and the M = 4096 product == ``CONFIG``'s. All failures are
    collected and reported."""
    g = torch.Generator(device=DEV).manual_seed(n * 3 + k)
    w = (torch.randn(n, k, generator=g, device=DEV) * k**-0.5).to(torch.bfloat16)
    x = torch.randn(4096, k, generator=g, device=DEV).to(torch.bfloat16)
    bias = torch.randn(n, generator=g, device=DEV).to(torch.bfloat16) if n == 1024 else None
    assert bm.tma_compatible(x) and bm.tma_compatible(w), "the TMA path must be the one under test"
    want = bm.batch_invariant_mm(x, w, bias, config=bm.CONFIG)
    cases = [(1, 0), (1, 1), (1, 2047), (1, 4095), (3, 17), (16, 4080), (64, 3), (129, 1000), (1000, 3000)]
    failures = []
    for c in TMA_MEMBERS:
        full = bm.batch_invariant_mm(x, w, bias, config=c)
        assert not torch.isnan(full.float()).any(), f"{c.name}: unwritten (poisoned) outputs"
        bad = _mismatch(full, want)
        if bad is not None:
            failures.append(f"{c.name} M=4096 vs CONFIG: {bad}")
        for m, off in cases:
            part = bm.batch_invariant_mm(x[off : off + m], w, bias, config=c)
            bad = _mismatch(part, full[off : off + m])
            if bad is not None:
                failures.append(f"{c.name} M={m} rows {off}.. vs M=4096: {bad}")
    print(f"N={n} K={k}: {len(TMA_MEMBERS)} TMA members x {len(cases)} row sets compared")
    assert not failures, "\n".join(failures)


def test_negative_control_cublas_rows_depend_on_m():
    """Why the kernel exists: cuBLAS's rows for M = 1 differ from the same rows in a large M."""
    g = torch.Generator(device=DEV).manual_seed(0)
    w = torch.randn(4096, 4096, generator=g, device=DEV).to(torch.bfloat16)
    x = torch.randn(4096, 4096, generator=g, device=DEV).to(torch.bfloat16)
    full = torch.nn.functional.linear(x, w)
    differing = sum(
        int((_bits(torch.nn.functional.linear(x[i : i + 1], w)) != _bits(full[i : i + 1])).sum())
        for i in range(16)
    )
    print(f"cuBLAS: {differing} of {16 * 4096} elements of rows 0..15 differ between M=1 and M=4096")
    assert differing > 0


def test_negative_control_another_k_order_changes_bits():
    """The family test's comparison can see a change of summation order: the same product with the
    first and last 64-wide K blocks swapped (a different K order, the same exact sum) differs."""
    g = torch.Generator(device=DEV).manual_seed(5)
    n, k, m = 1024, 1024, 256
    x = torch.randn(m, k, generator=g, device=DEV).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g, device=DEV) * k**-0.5).to(torch.bfloat16)
    perm = torch.arange(k, device=DEV)
    perm[:64], perm[-64:] = torch.arange(k - 64, k, device=DEV), torch.arange(64, device=DEV)
    want = bm.batch_invariant_mm(x, w, config=bm.CONFIG)
    got = bm.batch_invariant_mm(x[:, perm].contiguous(), w[:, perm].contiguous(), config=bm.CONFIG)
    bad = _mismatch(got, want)
    print(f"K blocks 0 and {k // 64 - 1} swapped: {bad}")
    assert bad is not None
