"""parity.ops.batch_invariant_matmul on the CPU: the configuration family and the M dispatch.

- the dispatch (``config_for``) is a pure function of (m, n, k) that returns members of ``CANDIDATES``,
  and the launcher uses it (grid and launch options) when no config is given;
- the tables are one family (``FAMILY_BLOCK_K``, wgmma-eligible tiles) and reject configs outside it;
- compiled for sm_90 without a GPU, every member lowers ``tl.dot`` to wgmma ``k16`` with fp32
  accumulation and no ``mma.sync`` (a member that fell back to mma.sync would be another instruction
  family, outside what the GPU family test establishes).

The bitwise claim itself (every member gives the canonical bits) needs the GPU:
tests/test_batch_invariant_matmul_gpu.py. The kernel under the interpreter:
tests/test_batch_invariant_matmul_interpreter.py.
"""

from __future__ import annotations

import inspect
import os
import re

import pytest
import torch

from parity.ops import batch_invariant_matmul as bm

ISSUE_SHAPES = [(4096, 4096), (12288, 4096), (4096, 12288), (151936, 1024), (14336, 4096), (4096, 14336)]
ISSUE_SHAPES += [(1024, 4096), (1001, 1000)]
SM90_MAX_SHARED = 232448  # bytes of shared memory one program may use on sm_90 (227 KiB)


def test_dispatch_is_a_pure_function_of_the_shape():
    assert list(inspect.signature(bm.config_for).parameters) == ["m", "n", "k"]
    bounds = [b for b, _ in bm.DISPATCH]
    for n, k in ISSUE_SHAPES:
        for m in [*range(1, 5000), 8191, 8192, 8193, 65536, 2**31 - 1]:
            c = bm.config_for(m, n, k)
            assert c in bm.CANDIDATES, (m, n, k, c)
            assert bm.config_for(m, n, k) == c
            # the first row whose bound admits m, in the shape's own table if it has one
            table = bm.SHAPE_DISPATCH.get((n, k), bm.DISPATCH)
            want = next(cfg for b, cfg in table if b is None or m <= b)
            assert c == want, (m, n, k, c, want)
    # the same (m, n, k) after other calls: the same config (no state)
    first = [bm.config_for(m, 4096, 4096) for m in (1, 100, 300, 2000, 9000)]
    for m in range(1, 9000, 97):
        bm.config_for(m, 151936, 1024)
    assert [bm.config_for(m, 4096, 4096) for m in (1, 100, 300, 2000, 9000)] == first
    assert bounds[-1] is None
    assert all(table[-1][0] is None for table in bm.SHAPE_DISPATCH.values())


def test_shape_tables_override_only_their_shape(monkeypatch):
    decode, prefill = bm.CANDIDATES[0], bm.CANDIDATES[-1]
    monkeypatch.setattr(bm, "SHAPE_DISPATCH", {(1024, 4096): ((8, decode), (None, prefill))})
    bm._check_tables()
    assert bm.config_for(8, 1024, 4096) == decode
    assert bm.config_for(9, 1024, 4096) == prefill
    for m in (1, 9, 5000):
        assert bm.config_for(m, 1001, 1000) == next(c for b, c in bm.DISPATCH if b is None or m <= b)


def test_tables_are_one_family():
    assert bm.CONFIG in bm.CANDIDATES
    assert len(set(bm.CANDIDATES)) == len(bm.CANDIDATES) <= 12
    for c in bm.CANDIDATES:
        assert c.block_k == bm.FAMILY_BLOCK_K == bm.CONFIG.block_k, c
        assert bm.wgmma_eligible(c) and bm.in_family(c), c
        assert c.block_m in (64, 128) and c.num_warps in (4, 8), c
        stage_bytes = (c.block_m + c.block_n) * c.block_k * 2
        assert stage_bytes * c.num_stages <= SM90_MAX_SHARED, c
    for _, c in bm.DISPATCH:
        assert c in bm.CANDIDATES
    # what the checks refuse: a config outside the tested table, outside the family, a broken range
    outside = bm.MatmulConfig(64, 128, 32, 8, 4, 3)  # another BLOCK_K: another K order
    assert not bm.in_family(outside)
    assert not bm.wgmma_eligible(bm.MatmulConfig(32, 128, 64, 8, 4, 3))  # mma.sync
    assert not bm.wgmma_eligible(bm.MatmulConfig(64, 128, 64, 8, 2, 3))  # mma.sync
    with pytest.raises(ValueError, match="not in CANDIDATES"):
        bm._check_table(((None, outside),))
    with pytest.raises(ValueError, match="not in CANDIDATES"):
        bm._check_table(((None, bm.MatmulConfig(64, 128, 64, 4, 4, 3)),))  # group_m 4: untested
    with pytest.raises(ValueError, match="increase"):
        bm._check_table(((128, bm.CONFIG), (64, bm.CONFIG), (None, bm.CONFIG)))
    with pytest.raises(ValueError, match="None"):
        bm._check_table(((128, bm.CONFIG),))


class _FakeKernel:
    """Stands in for the Triton kernel: records the grid and the launch's keyword arguments."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@pytest.mark.parametrize("m", [1, 64, 65, 300, 4096, 8192])
def test_launcher_uses_the_dispatch(monkeypatch, m):
    fake = _FakeKernel()
    monkeypatch.setattr(bm, "_bi_matmul_kernel", fake)
    n, k = 1001, 1000
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    w = torch.zeros(n, k, dtype=torch.bfloat16)
    bm.batch_invariant_mm(x, w)
    c = bm.config_for(m, n, k)
    bm.batch_invariant_mm(x, w, config=bm.CONFIG)  # the explicit override wins
    (grid, args, kw), (grid2, _, kw2) = fake.calls
    assert grid == (-(-m // c.block_m) * -(-n // c.block_n),)
    got = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], kw["num_warps"], kw["num_stages"])
    assert bm.MatmulConfig(*got) == c
    assert args[4:7] == (m, n, k)
    o = bm.CONFIG
    assert grid2 == (-(-m // o.block_m) * -(-n // o.block_n),)
    assert (kw2["BLOCK_M"], kw2["BLOCK_N"], kw2["num_warps"], kw2["num_stages"]) == (
        o.block_m,
        o.block_n,
        o.num_warps,
        o.num_stages,
    )


# ---------------------------------------------------------------------------------------------------
# Lowering for sm_90 (no GPU: Triton's passes and its bundled ptxas)
# ---------------------------------------------------------------------------------------------------
def _compile_sm90(c: bm.MatmulConfig, dtype: str, n: int, k: int):
    """The kernel for ``c`` as a real launch specializes it: N and K constant, unit strides constant,
    16-byte-aligned pointers, row strides divisible by 16 when K (and N) are multiples of 8."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = bm._bi_matmul_kernel
    types = dict(X=f"*{dtype}", W=f"*{dtype}", BIAS=f"*{dtype}", Y=f"*{dtype}", M="i32")
    types.update(sxm="i32", swn="i32", sym="i32")
    consts = dict(N=n, K=k, sxk=1, swk=1, syn=1, HAS_BIAS=True, OUT_BF16_INTERP=False)
    consts.update(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
    sig = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
    aligned = [a for a in sig if sig[a].startswith("*")]
    aligned += [s for s, dim in (("sxm", k), ("swn", k), ("sym", n)) if dim % 8 == 0]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    opts = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    return triton.compile(
        ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts
    )


def _mma_instructions(compiled) -> tuple[set[str], int]:
    ptx = compiled.asm["ptx"]
    return set(re.findall(r"wgmma\.mma_async\.[\w.]+", ptx)), len(re.findall(r"\bmma\.sync\b", ptx))


@pytest.mark.parametrize(
    "dtype,n,k",
    [("bf16", 4096, 4096), ("bf16", 1001, 1000), ("fp16", 4096, 4096)],
    ids=["bf16-aligned", "bf16-odd-n-k-tail", "fp16"],
)
def test_table_configs_compile_to_wgmma_on_sm90(dtype, n, k):
    """Every member of CANDIDATES: ``ttng.warp_group_dot`` in the TTGIR, only
    ``wgmma.mma_async...m64nNk16.f32.<in>.<in>`` in the PTX (the same k16 step with fp32 accumulation,
    whatever N), no ``mma.sync``, shared memory within sm_90's limit. The negative control (2 warps)
    shows the check sees a fallback."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles with the real Triton JIT")
    ins = {"bf16": "bf16", "fp16": "f16"}[dtype]
    pattern = re.compile(rf"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.{ins}\.{ins}")
    bad = []
    for c in bm.CANDIDATES:
        compiled = _compile_sm90(c, dtype, n, k)
        wgmma, mma_sync = _mma_instructions(compiled)
        shared = compiled.metadata.shared
        ok = (
            wgmma
            and all(pattern.fullmatch(w) for w in wgmma)
            and mma_sync == 0
            and "ttng.warp_group_dot " in compiled.asm["ttgir"]
            and shared <= SM90_MAX_SHARED
        )
        print(f"{c.name}: {sorted(wgmma)} mma.sync {mma_sync} shared {shared}")
        if not ok:
            bad.append((c.name, sorted(wgmma), mma_sync, shared))
    assert not bad, bad
    # negative control: 2 warps cannot form a warp group -> mma.sync, and the check sees it
    wgmma, mma_sync = _mma_instructions(_compile_sm90(bm.MatmulConfig(64, 128, 64, 8, 2, 3), dtype, n, k))
    assert not wgmma and mma_sync > 0
