"""parity.ops.batch_invariant_matmul on a CUDA GPU (skipped without one): rows bitwise independent of
M (1..8192) for decode and prefill shapes; the product within its error bound; cuBLAS's negative
control. The interpreter checks live in tests/test_paged_attention_interpreter.py."""

from __future__ import annotations

import math

import pytest
import torch

from parity.ops import batch_invariant_matmul as bm

pytestmark = pytest.mark.gpu

DEV = "cuda"
SHAPES = [(1024, 1024), (3072, 1024), (1024, 3072), (4096, 4096), (151936, 1024)]  # (N, K)
MS = (1, 2, 3, 7, 8, 16, 33, 64, 129, 256, 1000, 4097)


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(bm, "_empty", lambda *a, **kw: torch.empty(*a, **kw).fill_(math.nan))


def _bits(t):
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("n,k", SHAPES)
def test_rows_do_not_depend_on_m(poison, n, k):
    g = torch.Generator(device=DEV).manual_seed(n + k)
    w = (torch.randn(n, k, generator=g, device=DEV) * k**-0.5).to(torch.bfloat16)
    bias = torch.randn(n, generator=g, device=DEV).to(torch.bfloat16) if n == 3072 else None
    x = torch.randn(8192, k, generator=g, device=DEV).to(torch.bfloat16)
    full = bm.batch_invariant_linear(x, w, bias)
    assert not torch.isnan(full.float()).any(), "unwritten (poisoned) outputs"
    for m in MS:
        for off in (0, 8192 - m, (8192 - m) // 3):
            part = bm.batch_invariant_linear(x[off : off + m], w, bias)
            same = _bits(part) == _bits(full[off : off + m])
            assert bool(same.all()), (
                f"M={m} rows {off}..: {int((~same).sum())} of {same.numel()} differ, max |Δ| "
                f"{(part.float() - full[off : off + m].float()).abs().max().item():.3e}"
            )
    # the right product: within fp32-accumulation error of the blocked reference (a bound, not bits)
    ref = bm.linear_reference(x[:64], w, bias)
    err = (full[:64].float() - ref.float()).abs()
    bound = 2**-7 * ref.float().abs() + 1e-3
    assert bool((err <= bound).all()), f"max error {err.max().item():.3e}"


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
