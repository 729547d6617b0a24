"""parity.ops.batch_invariant_matmul's persistent TMA kernel (``tma_persistent`` members) under the Triton
interpreter (CPU).

Triton 3.6's interpreter runs device-side tensor descriptors (``tl.make_tensor_descriptor``) as masked
pointer accesses -- out-of-bounds box elements load as zeros and are not stored -- and asserts TMA's
alignment rules (16-byte base and row strides, 16-byte aligned column offsets). It ignores loop
flattening and warp specialisation, so the ``warp_specialize`` members run the same code as the others.

What this checks, for every ``tma_persistent`` member: the persistent tile loop (3 interpreter
"SMs", so each program runs several tiles, and the spare steps of the less busy ones), the grouped
tile order, the descriptors' zero padding for partial M / N tiles and the K tail, bias, the TMA store
(whole and subtiled) and the masked pointer store for a Y that TMA cannot address, every output written
(outputs poisoned with NaN), and the dispatch by layout: inputs that TMA cannot address run the pointer
kernel. A spy on the two kernels shows which one each call ran.

What it does not check: the family claim (the GPU's bits), for the reason given in
tests/test_batch_invariant_matmul_interpreter.py -- the inputs are small integers, exact in fp32 in
any order, and each result is compared bit for bit with the exact product rounded once to bf16. The
bitwise family claim: tests/test_batch_invariant_matmul_gpu.py.
"""

from __future__ import annotations

import sys

import torch

from tests.helpers import assert_same_bits, exact_linear, nan_empty, run_under_triton_interpreter


def test_tma_members_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "tma interpreter checks passed" in proc.stdout


class _Spy:
    """Wraps a jitted kernel: counts the launches, then launches it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _checks():
    from parity.ops import batch_invariant_matmul as bm

    assert bm._interpreting()
    bm._empty = nan_empty
    ptr = bm._bi_matmul_kernel = _Spy(bm._bi_matmul_kernel)
    tma = bm._bi_matmul_tma_kernel = _Spy(bm._bi_matmul_tma_kernel)
    members = [c for c in bm.CANDIDATES if c.kernel == "tma_persistent"]
    assert any(c.epilogue_subtile for c in members) and any(c.warp_specialize for c in members)
    g = torch.Generator().manual_seed(5)
    # (M, N, K, bias, kernel that must run): partial M tiles (64 and 128 rows), partial N tiles (16 ..
    # 256 columns), a K tail (200 = 3 * 64 + 8);
    # - N = 264: Y rows of 528 bytes -> TMA store (whole and subtiled), 8 columns past the last full tile;
    # - N = 277: Y rows of 554 bytes -> masked pointer stores;
    # - K = 203: X / W rows of 406 bytes -> TMA cannot address them: the pointer kernel, same tile.
    cases = ((150, 264, 200, True, tma), (70, 277, 64, False, tma), (33, 40, 203, True, ptr))
    for m, n, k, bias, kernel in cases:
        x = torch.randint(-4, 5, (m, k), generator=g).to(torch.bfloat16)
        w = torch.randint(-4, 5, (n, k), generator=g).to(torch.bfloat16)
        b = torch.randint(-64, 65, (n,), generator=g).to(torch.bfloat16) if bias else None
        want = exact_linear(x, w, b)
        before = (ptr.launches, tma.launches)
        for c in members:
            got = bm.batch_invariant_linear(x, w, b, config=c)
            assert_same_bits(got, want, f"{c.name}, M={m}, N={n}, K={k}")
        ran = (ptr.launches - before[0], tma.launches - before[1])
        assert ran == ((0, len(members)) if kernel is tma else (len(members), 0)), ran
        print(f"M={m} N={n} K={k}: {len(members)} members == the exact product ({ran})", flush=True)
        # rows alone and at offsets (row slices keep TMA's alignment when K * 2 bytes is a multiple
        # of 16), against the same rows of the exact product
        for c in (members[0], members[-1]):
            for rows, off in ((1, 0), (1, m - 1), (7, 3), (m - 5, 5)):
                got = bm.batch_invariant_linear(x[off : off + rows], w, b, config=c)
                assert_same_bits(got, want[off : off + rows], f"{c.name}, rows {off}..{off + rows}")
    print("tma interpreter checks passed")


if __name__ == "__main__":
    _checks()
    sys.exit(0)
