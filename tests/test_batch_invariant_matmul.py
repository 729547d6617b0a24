"""parity.ops.batch_invariant_matmul on the CPU: the configuration family and the M dispatch.

- the dispatch (``config_for``) is a pure function of (m, n, k) that returns members of ``CANDIDATES``,
  and the launcher uses it (grid and launch options) when no config is given;
- the tables are one family (``FAMILY_BLOCK_K``, wgmma-eligible tiles) and reject configs outside it;
- compiled for sm_90 without a GPU, every member lowers ``tl.dot`` to wgmma ``k16`` with fp32
  accumulation into its C operand and no ``mma.sync`` (a member that fell back to mma.sync would be
  another instruction family, outside what the GPU family test establishes); ``tma_persistent``
  members load by TMA (``cp.async.bulk.tensor``), store by TMA where Y allows it, are warp-specialised
  where they say so, and their layout fallback (the pointer kernel with their tile) is wgmma too;
- the launcher routes ``tma_persistent`` members by layout (``tma_compatible``) and sets Triton's
  scratch allocator for its launch only.

The bitwise claim itself (every member gives the canonical bits) needs the GPU:
tests/test_batch_invariant_matmul_gpu.py. The kernels under the interpreter:
tests/test_batch_invariant_matmul_interpreter.py and tests/test_batch_invariant_matmul_tma_interpreter.py.
"""

from __future__ import annotations

import inspect
import os
import re

import pytest
import torch
from triton.runtime import _allocation

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
    decode, prefill = bm.CANDIDATES[0], bm.DISPATCH[-1][1]
    monkeypatch.setattr(bm, "SHAPE_DISPATCH", {(1024, 4096): ((8, decode), (None, prefill))})
    bm._check_tables()
    assert bm.config_for(8, 1024, 4096) == decode
    assert bm.config_for(9, 1024, 4096) == prefill
    for m in (1, 9, 5000):
        assert bm.config_for(m, 1001, 1000) == next(c for b, c in bm.DISPATCH if b is None or m <= b)


def test_tables_are_one_family():
    assert bm.CONFIG in bm.CANDIDATES and bm.CONFIG.kernel == "ptr"
    assert len(set(bm.CANDIDATES)) == len(bm.CANDIDATES) <= 24
    assert len({c.name for c in bm.CANDIDATES}) == len(bm.CANDIDATES)  # the sweep keys on names
    assert {c.kernel for c in bm.CANDIDATES} == set(bm.KERNELS)
    assert bm.CONFIG.block_k == bm.FAMILY_BLOCK_K
    assert {c.block_k for c in bm.CANDIDATES} == {bm.FAMILY_BLOCK_K, *bm.WIDE_BLOCK_KS}
    for c in bm.CANDIDATES:
        assert c.block_k == bm.FAMILY_BLOCK_K or (c.block_k in bm.WIDE_BLOCK_KS and c.kernel == "ptr"), c
        assert bm.wgmma_eligible(c) and bm.in_family(c), c
        assert c.block_m in (64, 128) and c.num_warps in (4, 8), c
        stage_bytes = (c.block_m + c.block_n) * c.block_k * 2
        # the TMA kernel stages its output tile (or half of it) in shared memory for the TMA store
        staging = c.block_m * c.block_n * 2 // (2 if c.epilogue_subtile else 1) if c.kernel != "ptr" else 0
        assert stage_bytes * c.num_stages + staging <= SM90_MAX_SHARED, c
        # Triton 3.6's Hopper warp specialisation: 4 warps, unsubtiled epilogue (see the lowering test)
        assert not c.warp_specialize or (c.num_warps == 4 and not c.epilogue_subtile), c
    for _, c in bm.DISPATCH:
        assert c in bm.CANDIDATES and c.block_k == bm.FAMILY_BLOCK_K  # any K: no wide step
    for (_, k), table in bm.SHAPE_DISPATCH.items():
        assert all(bm.serves_k(c, k) for _, c in table), (k, table)
    # what the checks refuse: a config outside the tested table, outside the family, a broken range
    outside = bm.MatmulConfig(64, 128, 32, 8, 4, 3)  # another BLOCK_K: another K order
    assert not bm.in_family(outside)
    assert not bm.wgmma_eligible(bm.MatmulConfig(32, 128, 64, 8, 4, 3))  # mma.sync
    assert not bm.wgmma_eligible(bm.MatmulConfig(64, 128, 64, 8, 2, 3))  # mma.sync
    assert not bm.in_family(bm.CONFIG._replace(kernel="other"))
    assert not bm.in_family(bm.CONFIG._replace(warp_specialize=True))  # a switch of the TMA kernel only
    assert not bm.in_family(bm.CONFIG._replace(epilogue_subtile=True))
    with pytest.raises(ValueError, match="unknown kernel"):
        bm.batch_invariant_mm(
            torch.zeros(2, 64, dtype=torch.bfloat16),
            torch.zeros(16, 64, dtype=torch.bfloat16),
            config=bm.CONFIG._replace(kernel="other"),
        )
    with pytest.raises(ValueError, match="not in CANDIDATES"):
        bm._check_table(((None, outside),), None)
    with pytest.raises(ValueError, match="not in CANDIDATES"):
        bm._check_table(((None, bm.MatmulConfig(64, 128, 64, 4, 4, 3)),), None)  # group_m 4: untested
    # a wide K step: only in the pointer kernel, only in a shape table whose K it divides
    wide = next(c for c in bm.CANDIDATES if c.block_k == 256)
    assert not bm.in_family(wide._replace(kernel="tma_persistent"))
    assert bm.serves_k(wide, 4096) and not bm.serves_k(wide, 4096 + 128) and bm.serves_k(bm.CONFIG, 1000)
    bm._check_table(((None, wide),), 3072)
    with pytest.raises(ValueError, match="K step 256 does not serve K = 1152"):
        bm._check_table(((64, wide), (None, bm.CONFIG)), 1152)
    with pytest.raises(ValueError, match=r"does not serve DISPATCH \(any K\)"):
        bm._check_table(((64, wide), (None, bm.CONFIG)), None)
    with pytest.raises(ValueError, match="increase"):
        bm._check_table(((128, bm.CONFIG), (64, bm.CONFIG), (None, bm.CONFIG)), None)
    with pytest.raises(ValueError, match="None"):
        bm._check_table(((128, bm.CONFIG),), None)


class _FakeKernel:
    """Stands in for a Triton kernel: records the grid, the launch's arguments and Triton's allocator
    at the time of the launch; ``fail`` makes the launch raise after recording."""

    def __init__(self, fail: bool = False):
        self.calls = []
        self.fail = fail

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs, _allocation._allocator.get()))
            if self.fail:
                raise RuntimeError("launch failed")

        return launch


def _fake_kernels(monkeypatch, fail: bool = False) -> tuple[_FakeKernel, _FakeKernel]:
    ptr, tma = _FakeKernel(), _FakeKernel(fail)
    monkeypatch.setattr(bm, "_bi_matmul_kernel", ptr)
    monkeypatch.setattr(bm, "_bi_matmul_tma_kernel", tma)
    return ptr, tma


def _launched_config(kw) -> bm.MatmulConfig:
    """The tile and launch options of a recorded launch, as a (pointer-kernel) config."""
    tile = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], kw["num_warps"], kw["num_stages"])
    return bm.MatmulConfig(*tile)


def _tile_of(c: bm.MatmulConfig) -> bm.MatmulConfig:
    """``c``'s tile and launch options, as :func:`_launched_config` recovers them."""
    return c._replace(kernel="ptr", epilogue_subtile=False, warp_specialize=False)


@pytest.mark.parametrize("m", [1, 64, 65, 300, 4096, 8192])
def test_launcher_uses_the_dispatch(monkeypatch, m):
    ptr, tma = _fake_kernels(monkeypatch)
    n, k = 1001, 1000
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    w = torch.zeros(n, k, dtype=torch.bfloat16)
    bm.batch_invariant_mm(x, w)
    c = bm.config_for(m, n, k)
    tiles = -(-m // c.block_m) * -(-n // c.block_n)
    if c.kernel == "ptr":
        (grid, args, kw, _), *_ = ptr.calls
        assert grid == (tiles,)
    else:  # off the GPU the persistent grid has _INTERPRETER_PROGRAMS programs
        (grid, args, kw, _), *_ = tma.calls
        assert grid == (min(bm._INTERPRETER_PROGRAMS, tiles),)
        assert (kw["EPILOGUE_SUBTILE"], kw["WARP_SPECIALIZE"]) == (c.epilogue_subtile, c.warp_specialize)
    assert _launched_config(kw) == _tile_of(c)
    assert args[4:7] == (m, n, k)
    ptr.calls.clear()
    bm.batch_invariant_mm(x, w, config=bm.CONFIG)  # the explicit override wins
    ((grid2, _, kw2, _),) = ptr.calls
    o = bm.CONFIG
    assert grid2 == (-(-m // o.block_m) * -(-n // o.block_n),)
    assert _launched_config(kw2) == o


def test_tma_compatible():
    """TMA's layout rules: unit last stride, row stride a multiple of 16 bytes (and no overlap),
    16-byte aligned base."""
    a = torch.zeros(8, 1000, dtype=torch.bfloat16)  # rows of 2000 bytes
    assert bm.tma_compatible(a) and bm.tma_compatible(a[3:])  # a row slice: base moves by 2000 bytes
    assert not bm.tma_compatible(torch.zeros(8, 1003, dtype=torch.bfloat16))  # 2006-byte rows
    assert not bm.tma_compatible(a[:, 1:])  # base 2 bytes past alignment
    assert bm.tma_compatible(a[:, 8:])  # 16 bytes past: aligned, row stride still 2000 bytes
    assert not bm.tma_compatible(a.t().contiguous().t())  # column-major: last stride 8
    assert not bm.tma_compatible(a[:1].expand(8, 1000))  # row stride 0: overlapping rows
    assert not bm.tma_compatible(torch.zeros(8, 2000, dtype=torch.bfloat16)[:, ::2])


@pytest.mark.parametrize(
    "c", [c for c in bm.CANDIDATES if c.kernel == "tma_persistent"], ids=lambda c: c.name
)
def test_tma_members_route_by_layout(monkeypatch, c):
    """A TMA member runs the TMA kernel when x and W qualify (Y stored by TMA iff Y qualifies), and the
    pointer kernel with its own tile otherwise; Triton's allocator is ours during the TMA launch only."""
    ptr, tma = _fake_kernels(monkeypatch)
    before = _allocation._allocator.get()
    m, k = 300, 1000
    x = torch.zeros(m + 1, k, dtype=torch.bfloat16)[1:]  # a row slice: base 2000 bytes in, aligned
    for n, y_tma in ((1024, True), (1001, False)):  # Y rows of 2048 / 2002 bytes
        w = torch.zeros(n, k, dtype=torch.bfloat16)
        bm.batch_invariant_mm(x, w, config=c)
        ((grid, args, kw, allocator),) = tma.calls
        tma.calls.clear()
        tiles = -(-m // c.block_m) * -(-n // c.block_n)
        assert grid == (min(bm._INTERPRETER_PROGRAMS, tiles),)
        assert _launched_config(kw) == _tile_of(c)
        assert (kw["EPILOGUE_SUBTILE"], kw["WARP_SPECIALIZE"], kw["Y_TMA"]) == (
            c.epilogue_subtile,
            c.warp_specialize,
            y_tma,
        )
        assert args[4:11] == (m, n, k, k, k, n, 1)  # M N K, row strides of x, W, Y; Y's column stride
        assert allocator is not before and allocator.__qualname__.startswith("_scratch_allocator")
        assert _allocation._allocator.get() is before  # restored
    assert not ptr.calls
    # layouts TMA cannot address: the pointer kernel, same tile and launch options
    w = torch.zeros(1001, k, dtype=torch.bfloat16)
    odd_k = torch.zeros(m, 1003, dtype=torch.bfloat16), torch.zeros(1001, 1003, dtype=torch.bfloat16)
    column_major_w = w.t().contiguous().t()
    for xx, ww in ((x[:, 1:], w[:, 1:]), (x.t().contiguous().t(), w), (x, column_major_w), odd_k):
        bm.batch_invariant_mm(xx, ww, config=c)
    assert not tma.calls and len(ptr.calls) == 4
    for grid, _, kw, _ in ptr.calls:
        assert grid == (-(-m // c.block_m) * -(-1001 // c.block_n),)
        assert _launched_config(kw) == _tile_of(c)


def test_tma_launch_restores_another_allocator_even_when_it_fails(monkeypatch):
    """An allocator set by someone else (``triton.set_allocator``) is back after our launch, whether the
    launch returns or raises."""
    import triton

    c = next(c for c in bm.CANDIDATES if c.kernel == "tma_persistent")
    x, w = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(64, 64, dtype=torch.bfloat16)

    def theirs(size, alignment, stream):
        raise AssertionError("not to be called by our launch")

    outer = _allocation._allocator.get()
    try:
        triton.set_allocator(theirs)
        for fail in (False, True):
            _, tma = _fake_kernels(monkeypatch, fail=fail)
            if fail:
                with pytest.raises(RuntimeError, match="launch failed"):
                    bm.batch_invariant_mm(x, w, config=c)
            else:
                bm.batch_invariant_mm(x, w, config=c)
            assert tma.calls[0][3] is not theirs and _allocation._allocator.get() is theirs
    finally:
        triton.set_allocator(outer)


def test_scratch_allocator():
    buf = bm._scratch_allocator(torch.device("cpu"))(384, 16, None)
    assert buf.dtype == torch.int8 and buf.numel() == 384 and buf.device.type == "cpu"


# ---------------------------------------------------------------------------------------------------
# Lowering for sm_90 (no GPU: Triton's passes and its bundled ptxas)
# ---------------------------------------------------------------------------------------------------
def _compile_sm90(c: bm.MatmulConfig, dtype: str, n: int, k: int):
    """The kernel for ``c`` (``c.kernel``'s) as a real launch specializes it: N and K constant, unit
    strides constant, 16-byte-aligned pointers, row strides divisible by 16 when K (and N) are multiples
    of 8; the TMA kernel stores by TMA when Y's rows are a multiple of 16 bytes (N a multiple of 8), as
    the launcher decides for a fresh output."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = dict(X=f"*{dtype}", W=f"*{dtype}", BIAS=f"*{dtype}", Y=f"*{dtype}", M="i32")
    types.update(sxm="i32", swn="i32", sym="i32")
    consts = dict(N=n, K=k, syn=1, HAS_BIAS=True, OUT_BF16_INTERP=False)
    consts.update(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
    if c.kernel == "ptr":
        fn = bm._bi_matmul_kernel
        consts.update(sxk=1, swk=1)
    else:
        fn = bm._bi_matmul_tma_kernel
        consts.update(EPILOGUE_SUBTILE=c.epilogue_subtile, WARP_SPECIALIZE=c.warp_specialize)
        consts.update(Y_TMA=n % 8 == 0, INTERP_STEPS=0)
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


def _scale_d_always_true(ptx: str) -> bool:
    """Every wgmma accumulates into its C operand: its scale-d operand (``D = A B + scale_d * C``, the
    first operand after the A / B descriptors or the A registers' ``{...}``) is a predicate that is only
    ever set by ``mov.pred %p, -1`` (true). With scale-d false the first K step would compute ``A B``
    without the contract's ``+ 0.0``, which can differ in the sign of a zero."""
    preds = set()
    for ins in re.findall(r"wgmma\.mma_async\.sync[^;]*;", ptx):
        operands = [o.strip() for o in ins[ins.rindex("}") + 1 : -1].split(",")[1:]]
        scale_d = next(o for o in operands if not o.startswith("%rd"))
        if not scale_d.startswith("%p"):
            return False
        preds.add(scale_d)
    for p in preds:
        writes = re.findall(rf"^\s*([\w.]+)\s+{re.escape(p)}\s*[,|]\s*([^;]*);", ptx, flags=re.M)
        if not writes or any(w != ("mov.pred", "-1") for w in writes):
            return False
    return bool(preds)


def test_scale_d_check_sees_other_forms():
    wgmma = "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%r1, %r2}, %rd1, %rd2, {p}, 1, 1, 0, 1;"
    true_ = "mov.pred %p3, -1;\n" + wgmma.replace("{p}", "%p3")
    assert _scale_d_always_true(true_)
    assert not _scale_d_always_true(true_.replace("-1", "0"))
    assert not _scale_d_always_true("setp.ne.s32 %p3, %r9, 0;\n" + true_)  # set elsewhere from data
    assert not _scale_d_always_true(wgmma.replace("{p}", "0"))  # an immediate
    registers_a = (
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%r1}, {%r5, %r6}, %rd2, %p3, 1, 1, 1;"
    )
    assert _scale_d_always_true("mov.pred %p3, -1;\n" + registers_a)


def _check_lowering(c: bm.MatmulConfig, dtype: str, n: int, k: int) -> tuple[bool, str]:
    ins = {"bf16": "bf16", "fp16": "f16"}[dtype]
    pattern = re.compile(rf"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.{ins}\.{ins}")
    compiled = _compile_sm90(c, dtype, n, k)
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    wgmma, mma_sync = _mma_instructions(compiled)
    tma_loads = len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::cluster\.global", ptx))
    tma_stores = len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.global\.shared::cta", ptx))
    partitioned = "ttg.warp_specialize(" in ttgir
    tma = c.kernel == "tma_persistent"
    ok = (
        wgmma
        and all(pattern.fullmatch(w) for w in wgmma)
        and mma_sync == 0
        and "ttng.warp_group_dot " in ttgir
        and compiled.metadata.shared <= SM90_MAX_SHARED
        and _scale_d_always_true(ptx)
        and (tma_loads > 0) == tma
        and (tma_stores > 0) == (tma and n % 8 == 0)
        and partitioned == c.warp_specialize
    )
    what = (
        f"{c.name} ({c.kernel}): {sorted(wgmma)} mma.sync {mma_sync} shared {compiled.metadata.shared}"
        f" TMA loads {tma_loads} stores {tma_stores} warp-specialised {partitioned}"
    )
    return bool(ok), what


@pytest.mark.parametrize(
    "dtype,n,k",
    [("bf16", 4096, 4096), ("bf16", 1001, 1000), ("fp16", 4096, 4096)],
    ids=["bf16-aligned", "bf16-odd-n-k-tail", "fp16"],
)
def test_table_configs_compile_to_wgmma_on_sm90(dtype, n, k):
    """Every member of CANDIDATES: ``ttng.warp_group_dot`` in the TTGIR, only
    ``wgmma.mma_async...m64nNk16.f32.<in>.<in>`` in the PTX (the same k16 step with fp32 accumulation,
    whatever N), scale-d always true, no ``mma.sync``, shared memory within sm_90's limit. The
    ``tma_persistent`` members: X and W loaded by ``cp.async.bulk.tensor`` (none in the pointer
    kernel), Y stored by it when N * 2 bytes is a multiple of 16 (N = 1001: masked pointer stores),
    partitioned into warp groups exactly when ``warp_specialize``; and their layout fallback, the pointer
    kernel with the member's tile, lowers to wgmma as well. The negative control (2 warps) shows the
    check sees a fallback to mma.sync."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles with the real Triton JIT")
    bad = []
    for c in bm.CANDIDATES:
        for member in (c, _tile_of(c)) if c.kernel != "ptr" else (c,):
            ok, what = _check_lowering(member, dtype, n, k)
            print(what)
            if not ok:
                bad.append(what)
    assert not bad, bad
    # negative control: 2 warps cannot form a warp group -> mma.sync, and the check sees it
    wgmma, mma_sync = _mma_instructions(_compile_sm90(bm.MatmulConfig(64, 128, 64, 8, 2, 3), dtype, n, k))
    assert not wgmma and mma_sync > 0
