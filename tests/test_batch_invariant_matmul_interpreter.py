"""parity.ops.batch_invariant_matmul's family members and M dispatch under the Triton interpreter (CPU).

What this checks: the launcher and the kernel's index arithmetic for tiles of every shape the family
uses -- grid size, grouped tile order, the M / N / K-tail masks, bias, every output written (outputs
poisoned with NaN) -- for several pointer-kernel members (decode 64 x 16, the canonical 64 x 128,
128 x 32, prefill 128 x 256) and for the dispatch (``config=None``) at M in several of its ranges. The
persistent TMA kernel's members: tests/test_batch_invariant_matmul_tma_interpreter.py.

What it does not check: the family claim (every member gives the same *bits* on the GPU). Under the
interpreter ``tl.dot`` is numpy's fp32 matmul, not wgmma; so the inputs here are small integers, whose
products and sums are exact in fp32 in any order, and each result is compared bit for bit with the
exact product rounded once to bf16. The bitwise family claim is tested on the GPU
(tests/test_batch_invariant_matmul_gpu.py::test_family_members_give_the_canonical_bits).

The interpreter must be chosen before triton.jit decorates the kernel: the checks run in a child
Python with ``TRITON_INTERPRET=1`` (this file's ``__main__``). Row M-invariance with random values
under the interpreter: tests/test_paged_attention_interpreter.py (``_check_matmul``).
"""

from __future__ import annotations

import sys

import torch

from tests.helpers import assert_same_bits, exact_linear, nan_empty, run_under_triton_interpreter


def test_family_members_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "interpreter checks passed" in proc.stdout


def _checks():
    from parity.ops import batch_invariant_matmul as bm

    assert bm._interpreting()
    bm._empty = nan_empty
    g = torch.Generator().manual_seed(3)
    prefill = bm.MatmulConfig(128, 256, 64, 8, 8, 4)
    wide = [c for c in bm.CANDIDATES if c.block_k in bm.WIDE_BLOCK_KS]
    family = [bm.CANDIDATES[0], bm.CONFIG, bm.MatmulConfig(128, 32, 64, 8, 4, 5), prefill, *wide]
    assert all(c in bm.CANDIDATES for c in family) and len(wide) == 2
    # odd sizes: partial M tiles (64 and 128), partial N tiles (16 .. 256), a K tail (200 = 3 * 64 + 8);
    # K = 256: the wide K steps too (one 256-wide or two 128-wide dots)
    for m, n, k, bias in ((150, 300, 200, True), (70, 17 * 16 + 5, 256, False)):
        members = [c for c in family if bm.serves_k(c, k)]
        x = torch.randint(-4, 5, (m, k), generator=g).to(torch.bfloat16)
        w = torch.randint(-4, 5, (n, k), generator=g).to(torch.bfloat16)
        b = torch.randint(-64, 65, (n,), generator=g).to(torch.bfloat16) if bias else None
        want = exact_linear(x, w, b)
        for c in members:
            got = bm.batch_invariant_linear(x, w, b, config=c)
            assert_same_bits(got, want, f"{c.name}, M={m}, N={n}, K={k}")
        print(f"M={m} N={n} K={k}: {len(members)} members == the exact product", flush=True)
        # the dispatch (config=None), at M in several of its ranges, rows anywhere in x
        for rows in (1, 7, 64, 65, m):
            for off in (0, m - rows):
                got = bm.batch_invariant_linear(x[off : off + rows], w, b)
                assert_same_bits(got, want[off : off + rows], f"dispatch, rows {off}..{off + rows}")
        print(f"M={m} N={n} K={k}: dispatched rows == the exact product", flush=True)
    print("interpreter checks passed")


if __name__ == "__main__":
    _checks()
    sys.exit(0)
