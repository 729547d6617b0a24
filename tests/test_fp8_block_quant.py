"""Block FP8 quantization: the PyTorch reference's semantics (CPU), and the Triton kernel against it (GPU).

Exactness is the product: the kernel must give the reference's bits (compared as uint8 / fp32 bit
patterns with ``torch.equal``) on random and adversarial inputs. The same cases run through Triton's
interpreter on the CPU in ``test_fp8_interpreter.py``.
"""

from __future__ import annotations

import pytest
import torch

from weight_sync.fp8 import (
    BLOCK,
    CANDIDATE_CONFIGS,
    DEFAULT_CONFIGS,
    EPS,
    FP8_MAX,
    NonFiniteWeightError,
    fp8_block_dequant,
    fp8_block_quant,
    fp8_block_quant_torch,
    fp8_block_quant_triton,
    launch_config,
    scale_shape,
    shape_class,
)

FP8 = torch.float8_e4m3fn
POISON_Q = 0x7F  # float8_e4m3fn NaN bits: never produced for a finite input
BF16_MAX = torch.finfo(torch.bfloat16).max


# ------------------------------------------------------------------------------------------------
# Inputs (shared with test_fp8_interpreter.py)
# ------------------------------------------------------------------------------------------------


def _rand(shape, gen, scale=1.0, dtype=torch.bfloat16):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def all_bf16_within_fp8_range() -> torch.Tensor:
    """Every finite bf16 value with |x| <= 448 (both signs, both zeros), in blocks whose amax is 448.

    With amax = 448 the scale is exactly 1.0, so the quantized bits are the e4m3 cast of each bf16
    value itself: an exhaustive test of the rounding (ties included: bf16 has 7 mantissa bits).
    """
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    vals = bits.view(torch.bfloat16)
    vals = vals[torch.isfinite(vals) & (vals.float().abs() <= FP8_MAX)]
    rows = -(-vals.numel() // (BLOCK - 1))
    out = torch.full((rows * (BLOCK - 1),), 0.0, dtype=torch.bfloat16)
    out[: vals.numel()] = vals
    out = out.view(rows, BLOCK - 1)
    sentinel = torch.full((rows, 1), FP8_MAX, dtype=torch.bfloat16)
    sentinel[1::2] = -FP8_MAX  # amax 448 either sign
    return torch.cat([out, sentinel], dim=1)  # each row holds a ±448: every block's amax is 448


def fp32_ties_and_sticky(gen) -> torch.Tensor:
    """fp32 values in blocks of amax 448 (scale 1): exact e4m3 midpoints and midpoints ± 1 ulp."""
    fp8 = torch.arange(0, 0x7F, dtype=torch.uint8).view(FP8).float()  # 0 .. 448, ascending
    mids = (fp8[:-1] + fp8[1:]) / 2  # exact in fp32
    up = torch.nextafter(mids, torch.full_like(mids, 1e9))
    down = torch.nextafter(mids, torch.zeros_like(mids))
    vals = torch.cat([mids, up, down, fp8])
    vals = torch.cat([vals, -vals])
    vals = torch.cat([vals, (torch.rand(20000, generator=gen) * 2 - 1) * FP8_MAX])
    n = -(-vals.numel() // (BLOCK - 1)) * (BLOCK - 1)
    vals = torch.cat([vals, torch.zeros(n - vals.numel())]).view(-1, BLOCK - 1)
    return torch.cat([vals, torch.full((vals.shape[0], 1), FP8_MAX)], dim=1)


def division_near_midpoints(gen, blocks: int = 4) -> torch.Tensor:
    """fp32 weights whose quotient w / scale lands on or next to an e4m3 rounding midpoint.

    Each 128x128 block gets a random amax A (log-uniform over 1e-6 .. 1e6, so scale = A / 448 is
    not a power of two) and values ``RN(mid * scale)`` and their fp32 neighbours, for every e4m3
    midpoint ``mid``: which way those round to e4m3 depends on the last bit of the fp32 quotient,
    so any shortcut in the division shows here.
    """
    fp8 = torch.arange(0, 0x7F, dtype=torch.uint8).view(FP8).float()
    mids = (fp8[:-1] + fp8[1:]) / 2
    n = blocks * BLOCK
    out = torch.empty(n, n)
    for bi in range(blocks):
        for bj in range(blocks):
            amax = torch.exp(torch.empty(()).uniform_(-13.8, 13.8, generator=gen)).float()
            scale = amax / torch.tensor(FP8_MAX)
            idx = torch.randint(0, mids.numel(), (BLOCK * BLOCK,), generator=gen)
            w = mids[idx] * scale
            step = torch.randint(-1, 2, w.shape, generator=gen)
            w = torch.where(step > 0, torch.nextafter(w, torch.full_like(w, 1e30)), w)
            w = torch.where(step < 0, torch.nextafter(w, torch.zeros_like(w)), w)
            w = torch.where(torch.rand(w.shape, generator=gen) < 0.5, -w, w)
            w[0] = amax
            out[bi * BLOCK : (bi + 1) * BLOCK, bj * BLOCK : (bj + 1) * BLOCK] = w.view(BLOCK, BLOCK)
    return out


def adversarial_cases(gen: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    """(label, weight) pairs on the CPU: odd shapes, zeros, huge values, subnormals, ±448 and beyond."""
    cases = []
    for shape in [(1, 1), (1, 200), (200, 1), (129, 257), (3, 300), (256, 384), (127, 129)]:
        for scale in (0.02, 1.0, 300.0):
            cases.append((f"randn{shape}x{scale}", _rand(shape, gen, scale)))
    cases.append(("fp16", _rand((130, 140), gen, 3.0, torch.float16)))
    cases.append(("fp32", _rand((130, 140), gen, 3.0, torch.float32)))

    w = _rand((256, 384), gen, 0.02)
    w[:128, 128:256] = 0  # one all-zero block
    w[128:, 256:] = -0.0  # one all-negative-zero block
    w[130:140, :128] = 0  # zeros inside a block
    cases.append(("zero-blocks", w))
    cases.append(("all-zero-129x257", torch.zeros(129, 257, dtype=torch.bfloat16)))

    w = _rand((257, 300), gen, 0.02)
    for i in range(0, 257, BLOCK):
        for j in range(0, 300, BLOCK):
            sign = 1 if (i + j) % 3 else -1
            w[min(i + 7, 256), min(j + 11, 299)] = sign * BF16_MAX  # one huge value per block
    cases.append(("huge-per-block", w))
    w = _rand((256, 256), gen, 1.0)
    w[0, 0] = 1e30
    w[200, 200] = -1e20
    cases.append(("huge-few", w))

    tiny = torch.finfo(torch.bfloat16).tiny  # 2^-126, the smallest normal
    sub = (torch.rand((256, 256), generator=gen) * 2 - 1) * tiny  # bf16 subnormals (and zeros)
    cases.append(("subnormal-only", sub.to(torch.bfloat16)))
    w = _rand((256, 256), gen, 1.0)
    w[::3, ::5] = sub[::3, ::5].to(torch.bfloat16)  # subnormals among normal values
    cases.append(("subnormal-mixed", w))
    w = _rand((128, 256), gen, 1.0) * torch.tensor([1e-9, 1e-12]).repeat_interleave(128)  # amax ~ EPS
    cases.append(("near-eps", w.to(torch.bfloat16)))
    w = _rand((200, 200), gen, 1.0) * 2.0**-12  # many values land in e4m3's subnormal range
    w[0, 0] = 1.0
    cases.append(("fp8-subnormal-range", w.to(torch.bfloat16)))

    edge = torch.tensor([448, -448, 449, 450, 464, 465, 480, 500, 1e4, -1e4, 447, 446], dtype=torch.bfloat16)
    w = _rand((200, 260), gen, 100.0)
    w.view(-1)[: edge.numel() * 997 : 997] = edge
    cases.append(("around-448", w))
    w = torch.full((129, 129), 448.0, dtype=torch.bfloat16)
    w[1::2] = -448.0
    cases.append(("exactly-448", w))
    w = torch.full((130, 130), 3.0, dtype=torch.bfloat16)  # constant blocks: amax = |w|
    cases.append(("constant", w))

    cases.append(("all-bf16-in-range", all_bf16_within_fp8_range()))
    cases.append(("fp32-ties", fp32_ties_and_sticky(gen)))
    cases.append(("division-near-midpoints", division_near_midpoints(gen)))
    return cases


# ------------------------------------------------------------------------------------------------
# Comparison helpers
# ------------------------------------------------------------------------------------------------


def mismatch(label, got_q, got_s, want_q, want_s) -> str | None:
    """None if both outputs have identical bits, else a description (max |Δ|, differing count)."""
    gq, wq = got_q.view(torch.uint8), want_q.view(torch.uint8)
    msgs = []
    if gq.shape != wq.shape or not torch.equal(gq, wq):
        if gq.shape != wq.shape:
            msgs.append(f"q shape {list(gq.shape)} != {list(wq.shape)}")
        else:
            diff = gq != wq
            d = (got_q.float() - want_q.float()).abs()
            d = d[diff & ~d.isnan()]
            maxd = d.max().item() if d.numel() else float("nan")
            msgs.append(f"q: {int(diff.sum())} of {gq.numel()} bytes differ, max |Δ| = {maxd:.3e}")
    gs, ws = got_s.view(torch.int32), want_s.view(torch.int32)
    if gs.shape != ws.shape or not torch.equal(gs, ws):
        if gs.shape != ws.shape:
            msgs.append(f"scale shape {list(gs.shape)} != {list(ws.shape)}")
        else:
            diff = gs != ws
            d = (got_s.double() - want_s.double()).abs().max().item()
            msgs.append(f"scale: {int(diff.sum())} of {gs.numel()} differ, max |Δ| = {d:.3e}")
    return f"{label}: " + "; ".join(msgs) if msgs else None


def dequant_violations(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> int:
    """Elements outside |q*s - w| <= 2^-4 |w| + 2^-10 s + 2^-20 |w| (see block_quant's docstring)."""
    wf = w.float()
    dq = fp8_block_dequant(q, s)
    n, k = w.shape
    sb = s.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]
    bound = 2.0**-4 * wf.abs() + 2.0**-10 * sb + 2.0**-20 * wf.abs()
    return int(((dq - wf).abs() > bound).sum())


# ------------------------------------------------------------------------------------------------
# Reference semantics (CPU)
# ------------------------------------------------------------------------------------------------


def test_e4m3_cast_is_round_to_nearest_even_after_clamp():
    """torch's cast, which the reference relies on, is RNE on [-448, 448] (checked by brute force)."""
    gen = torch.Generator().manual_seed(0)
    table = torch.arange(0, 0x7F, dtype=torch.uint8)  # all non-negative finite e4m3 (0x00 .. 0x7E)
    vals = table.view(FP8).double()
    y = fp32_ties_and_sticky(gen).flatten().abs()
    dist = (y.double()[:, None] - vals[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    cand = dist == best
    # ties: prefer the even code (lowest mantissa bit 0)
    even = (table % 2 == 0)[None, :] & cand
    pick = torch.where(even.any(dim=1), even.float().argmax(dim=1), cand.float().argmax(dim=1))
    got = y.to(FP8).view(torch.uint8)
    assert torch.equal(got, table[pick]), int((got != table[pick]).sum())
    # beyond the midpoint 464 torch's cast gives NaN: the clamp before the cast is what saturates
    assert torch.isnan(torch.tensor([465.0]).to(FP8).float()).all()
    assert torch.tensor([464.0]).to(FP8).float().item() == 448.0


@pytest.mark.parametrize("shape", [(1, 1), (129, 257), (128, 128), (256, 130), (5, 1000)])
def test_reference_shapes_and_dtypes(shape):
    w = _rand(shape, torch.Generator().manual_seed(1), 0.5)
    q, s = fp8_block_quant_torch(w)
    assert q.dtype == FP8 and tuple(q.shape) == shape and q.is_contiguous()
    assert s.dtype == torch.float32 and tuple(s.shape) == scale_shape(shape)
    assert tuple(s.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))


def test_reference_scale_is_amax_over_448_in_fp32():
    gen = torch.Generator().manual_seed(2)
    w = _rand((300, 260), gen, 2.0)
    _, s = fp8_block_quant_torch(w)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            amax = blk.abs().max()
            want = torch.div(amax.clamp_min(EPS), torch.tensor(FP8_MAX))
            assert s[i, j].view(torch.int32) == want.view(torch.int32)


def test_reference_zero_block_gives_zeros_and_finite_scale():
    w = torch.zeros(129, 257, dtype=torch.bfloat16)
    w[0, 0] = -0.0
    q, s = fp8_block_quant_torch(w)
    assert torch.isfinite(s).all()
    assert torch.equal(s, torch.full_like(s, EPS) / FP8_MAX)
    qb = q.view(torch.uint8)
    assert int(qb[0, 0]) == 0x80 and int(qb.flatten()[1:].max()) == 0  # -0 keeps its sign, rest +0


def test_reference_block_amax_maps_to_448():
    gen = torch.Generator().manual_seed(3)
    w = _rand((256, 256), gen, 0.02)
    w[5, 9] = 7.0
    w[200, 3] = -BF16_MAX
    q, s = fp8_block_quant_torch(w)
    assert q.view(torch.uint8)[5, 9] == 0x7E  # +448
    assert q.view(torch.uint8)[200, 3] == 0xFE  # -448
    assert torch.isfinite(q.float()).all()
    # nothing saturates past ±448, nothing becomes NaN
    assert q.float().abs().max().item() == FP8_MAX


def test_reference_dequantization_error_within_format_bound():
    gen = torch.Generator().manual_seed(4)
    for label, w in adversarial_cases(gen):
        q, s = fp8_block_quant_torch(w)
        assert dequant_violations(w, q, s) == 0, label
        # and the coarser statement: |error| <= 2^-4 * block amax (+ fp32 rounding)
        n, k = w.shape
        amax = s * FP8_MAX
        ab = amax.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]
        err = (fp8_block_dequant(q, s) - w.float()).abs()
        assert bool((err <= ab * (2.0**-4 + 2.0**-20)).all()), label


def test_reference_exhaustive_bf16_values_round_to_nearest_even():
    w = all_bf16_within_fp8_range()
    q, s = fp8_block_quant_torch(w)
    assert torch.equal(s, torch.ones_like(s))  # amax 448 in every block: scale exactly 1
    assert torch.equal(q.view(torch.uint8), w.float().to(FP8).view(torch.uint8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_reference_nonfinite_raises_naming_tensor_and_block(bad):
    w = _rand((300, 400), torch.Generator().manual_seed(5), 1.0)
    w[260, 5] = bad  # block (2, 0)
    w[130, 390] = bad  # block (1, 3): first in row-major block order
    with pytest.raises(NonFiniteWeightError) as info:
        fp8_block_quant_torch(w, name="model.layers.7.mlp.down_proj.weight")
    err = info.value
    assert (err.name, err.block_row, err.block_col) == ("model.layers.7.mlp.down_proj.weight", 1, 3)
    assert "model.layers.7.mlp.down_proj.weight" in str(err) and "block_row=1, block_col=3" in str(err)
    # unchecked, the bad blocks carry NaN scales (never a valid-looking result)
    _, s = fp8_block_quant_torch(w, check=False)
    assert torch.isnan(s[1, 3]) and torch.isnan(s[2, 0]) and int(torch.isnan(s).sum()) == 2


def test_dispatch_on_cpu_uses_reference_and_fills_given_outputs():
    w = _rand((129, 257), torch.Generator().manual_seed(6), 1.0)
    want_q, want_s = fp8_block_quant_torch(w)
    out = torch.full((129, 257), POISON_Q, dtype=torch.uint8).view(FP8)
    scale_out = torch.full(scale_shape(w.shape), float("nan"))
    q, s = fp8_block_quant(w, out=out, scale_out=scale_out)
    assert q.data_ptr() == out.data_ptr() and s.data_ptr() == scale_out.data_ptr()
    assert mismatch("dispatch", q, s, want_q, want_s) is None


def test_launch_config_is_a_fixed_table_by_shape_class():
    assert shape_class(4096, 4096) == shape_class(8192, 4096) == "small"  # <= 2048 blocks
    assert shape_class(8193, 4096) == "large"
    assert shape_class(8192, 8192) == shape_class(151936, 4096) == "large"
    assert launch_config(4096, 4096) == DEFAULT_CONFIGS["small"]
    assert launch_config(28672, 8192) == DEFAULT_CONFIGS["large"]
    names = [c.name for c in CANDIDATE_CONFIGS]
    assert len(set(names)) == len(names)  # the benchmark's table keys
    for c in (*CANDIDATE_CONFIGS, *DEFAULT_CONFIGS.values()):
        assert c.validate() is c
    with pytest.raises(ValueError, match="num_stages"):
        fp8_block_quant_triton(torch.zeros(4, 4), num_stages=3)  # pipelining needs a persistent loop
    with pytest.raises(ValueError, match="num_warps"):
        fp8_block_quant_triton(torch.zeros(4, 4), num_warps=3)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="2-D"):
        fp8_block_quant_torch(torch.zeros(4, 4, 4))
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        fp8_block_quant_torch(torch.zeros(4, 4, dtype=torch.int32))


# ------------------------------------------------------------------------------------------------
# The Triton kernel against the reference (GPU)
# ------------------------------------------------------------------------------------------------


def _kernel_vs_reference(w: torch.Tensor, label: str, **kw) -> str | None:
    from weight_sync.fp8 import fp8_block_quant_triton
    from weight_sync.fp8.block_quant import DIV_RECIPROCAL

    recip = kw.get("div_mode") == DIV_RECIPROCAL
    want_q, want_s = fp8_block_quant_torch(w, check=False, _reciprocal=recip)
    out = torch.full(w.shape, POISON_Q, dtype=torch.uint8, device=w.device).view(FP8)
    scale_out = torch.full(scale_shape(w.shape), float("nan"), device=w.device)
    q, s = fp8_block_quant_triton(w, out=out, scale_out=scale_out, check=False, **kw)
    return mismatch(label, q, s, want_q, want_s)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"div_mode": 0},
        {"soft_cast": True},
        {"num_warps": 8, "group_k": 1},
        {"num_warps": 16, "group_k": 1},
        {"num_warps": 32, "group_k": 1},
        {"num_warps": 16, "group_k": 2, "prefetch": False},
        {"num_warps": 16, "group_k": 3, "prefetch": True},
        {"num_warps": 32, "group_k": 4, "prefetch": True},
        {"div_mode": 2},
    ],
    ids=[
        "default",
        "div-rn",
        "soft-cast",
        "w8",
        "w16",
        "w32",
        "g2w16",
        "g3w16p",
        "g4w32p",
        "reciprocal-variant",
    ],
)
def test_kernel_bitwise_equals_reference_adversarial(variant):
    gen = torch.Generator().manual_seed(10)
    bad = []
    for label, w in adversarial_cases(gen):
        m = _kernel_vs_reference(w.cuda(), label, **variant)
        if m:
            bad.append(m)
    assert not bad, "\n".join(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CANDIDATE_CONFIGS, ids=[c.name for c in CANDIDATE_CONFIGS])
def test_kernel_every_swept_launch_config_bitwise(config):
    """Every configuration the benchmark may pick: the reference's bits on the adversarial cases, and
    on weights with many more units of work than a persistent grid has programs (edges included)."""
    gen = torch.Generator().manual_seed(14)
    bad = []
    for label, w in adversarial_cases(gen):
        m = _kernel_vs_reference(w.cuda(), label, config=config)
        if m:
            bad.append(m)
    for shape in [(8192, 4096), (4000, 3000)]:
        w = _large_weight(shape, seed=15)
        m = _kernel_vs_reference(w, f"large{shape}", config=config)
        if m:
            bad.append(m)
    assert not bad, "\n".join(bad)


def _large_weight(shape, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(shape, generator=gen, device="cuda") * 0.02).to(torch.bfloat16)
    w[::977, ::131] = 0  # sprinkle zeros, huge values and subnormals into many blocks
    w[5::1999, 7::257] = BF16_MAX
    w[9::3001, 1::509] = 1e-39
    w[: min(128, shape[0]), : min(128, shape[1])] = 0
    return w


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 11008), (151936, 4096), (11008, 4096), (1000, 1000)])
def test_kernel_bitwise_equals_reference_large(shape):
    w = _large_weight(shape, seed=11)
    m = _kernel_vs_reference(w, f"large{shape}")
    assert m is None, m
    del w
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("div_mode", [0, 1, 2])
def test_kernel_division_near_midpoints_large(div_mode):
    """Millions of quotients next to e4m3 midpoints: the division must be IEEE, bit for bit."""
    gen = torch.Generator().manual_seed(13)
    w = division_near_midpoints(gen, blocks=16).cuda()
    m = _kernel_vs_reference(w, f"midpoints-div{div_mode}", div_mode=div_mode)
    assert m is None, m


@pytest.mark.gpu
def test_kernel_fresh_random_inputs_and_strided_rows():
    from weight_sync.fp8 import fp8_block_quant_triton

    bad = []
    for seed in range(8):
        gen = torch.Generator(device="cuda").manual_seed(100 + seed)
        n, k = (int(x) for x in torch.randint(1, 700, (2,), generator=gen, device="cuda"))
        big = torch.randn((n, k + 37), generator=gen, device="cuda").to(torch.bfloat16)
        w = big[:, 5 : 5 + k]  # row stride k + 37: no copy needed
        m = _kernel_vs_reference(w, f"seed{seed}-{n}x{k}-strided")
        if m:
            bad.append(m)
    assert not bad, "\n".join(bad)
    q, _ = fp8_block_quant_triton(big[:, 3:40])
    assert q.shape == (big.shape[0], 37)


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_kernel_nonfinite_raises_naming_tensor_and_block(bad):
    from weight_sync.fp8 import fp8_block_quant_triton

    w = torch.randn(300, 400, device="cuda").to(torch.bfloat16)
    w[299, 399] = bad  # block (2, 3): the last, partial one
    w[140, 260] = bad  # block (1, 2): first in row-major block order
    with pytest.raises(NonFiniteWeightError) as info:
        fp8_block_quant_triton(w, name="model.layers.0.self_attn.q_proj.weight")
    assert (info.value.block_row, info.value.block_col) == (1, 2)
    assert "model.layers.0.self_attn.q_proj.weight" in str(info.value)
    _, s = fp8_block_quant_triton(w, check=False)
    assert int(torch.isnan(s).sum()) == 2 and torch.isnan(s[1, 2]) and torch.isnan(s[2, 3])


@pytest.mark.gpu
def test_kernel_dequantization_error_within_format_bound():
    from weight_sync.fp8 import fp8_block_quant_triton

    gen = torch.Generator().manual_seed(12)
    for label, w in adversarial_cases(gen):
        q, s = fp8_block_quant_triton(w.cuda())
        assert dequant_violations(w.cuda(), q, s) == 0, label
