"""The fused policy-loss contract on the CPU: plain-PyTorch reference, fallback op, PPO wrapper.

The Triton kernels themselves are checked under the interpreter (test_policy_loss_interpreter.py) and
on a GPU (test_policy_loss_gpu.py).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from parity import token_logprobs
from parity.ops import policy_loss as pl
from parity.ppo_loss import aggregate, ppo_loss, surrogate
from tests.helpers import cubin_resource_usage


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def f64_outputs(logits, ids, old, temperature, ref_logits=None, ref_logprobs=None, est="k3"):
    """float64 truth (x.double() / fp32(T)) with autograd: (leaf, logp, ratio, kl, entropy)."""
    x = logits.detach().double().requires_grad_(True)
    t = float(np.float32(temperature))
    lsm = torch.log_softmax(x / t, -1)
    logp = lsm.gather(-1, ids[:, None])[:, 0]
    ratio = torch.exp(logp - old.double())
    kl = None
    if ref_logits is not None or ref_logprobs is not None:
        if ref_logits is not None:
            ref = torch.log_softmax(ref_logits.double() / t, -1).gather(-1, ids[:, None])[:, 0]
        else:
            ref = ref_logprobs.double()
        d = ref - logp
        kl = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.expm1(d) - d}[est]
    p = lsm.exp()
    ent = -torch.where(p > 0, p * lsm, 0.0).sum(-1)
    return x, logp, ratio, kl, ent


def exact_fma32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """Correctly rounded fp32 a*b + c from exact rational arithmetic (ties to even)."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    r = np.float32(float(exact))
    cands = [np.nextafter(r, np.float32(-np.inf)), r, np.nextafter(r, np.float32(np.inf))]
    return min(cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(np.float32(v).view(np.uint32)) & 1))


# ---------------------------------------------------------------------------------------------------
# Contract arithmetic
# ---------------------------------------------------------------------------------------------------
def test_fma_emulation_is_the_correctly_rounded_fma():
    rng = np.random.default_rng(0)
    # Horner-like operands, plus hard cases: a*b + c just below a midpoint between two fp32 values,
    # where rounding first to fp64 lands exactly on the midpoint (double rounding goes wrong).
    a = rng.uniform(-2, 2, 1500).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, 1500).astype(np.float32)
    c = rng.uniform(-1, 1, 1500).astype(np.float32)
    k = rng.integers(1, 200, 300)
    ha = (2.0**-12 * (1 + k * 2.0**-23)).astype(np.float32)
    hb = (2.0**-12 * (1 - k * 2.0**-23)).astype(np.float32)
    hc = np.full(300, 1 + 2.0**-23, dtype=np.float32)
    sign = np.where(rng.random(300) < 0.5, -1, 1).astype(np.float32)
    a = np.concatenate([a, ha * sign])
    b = np.concatenate([b, hb])
    c = np.concatenate([c, hc * sign])
    want = np.array([exact_fma32(x, y, z) for x, y, z in zip(a, b, c, strict=True)], dtype=np.float32)
    got = np.array(
        [
            pl._fma32_t(torch.tensor([x]), torch.tensor([y]), float(z), True).item()
            for x, y, z in zip(a, b, c, strict=True)
        ],
        dtype=np.float32,
    )
    naive = (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)
    assert (naive != want).sum() > 100, "the hard cases should defeat fp64-then-fp32 rounding"
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_exp_contract_accuracy_and_special_values():
    t = torch.linspace(-80, 80, 200001, dtype=torch.float32)
    for fma in (True, False):
        e = pl.exp_contract(t, fma)
        rel = (e.double() / torch.exp(t.double()) - 1).abs()
        # the rounding of y = t log2(e) and of log2(e) itself (< 2^-23 |y| ln 2) plus the polynomial (< 2e-7)
        bound = 2.0**-23 * (t.double().abs() * 1.4427) * math.log(2) + 2.5e-7
        assert (rel <= bound).all()
    special = torch.tensor([0.0, -0.0, -math.inf, math.inf, math.nan, -87.0, 88.0, 89.0])
    got = pl.exp_contract(special)
    assert got[0] == 1.0 and got[1] == 1.0  # ratio is exactly 1 on policy
    assert got[2] == 0.0 and got[3] == math.inf and torch.isnan(got[4])
    assert got[5] == 0.0 and torch.isfinite(got[6]) and got[7] == math.inf


def test_temperature_division_is_ieee_division():
    """The contract divides by T with Markstein's fma correction of x * RN(1/T); it must be the
    correctly rounded quotient: every finite bf16 value (and random fp32 ones), several T."""
    every = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    every = every[
        torch.isfinite(every) & (every.abs() < 2.0**100) & ((every.abs() > 2.0**-100) | (every == 0))
    ]
    f32 = torch.randn(100000, generator=gen(5)) * 20
    for t in (0.3, 0.7, 0.9, 1.3, 2.7, 1 / 3):
        for x in (every, f32):
            want = x / torch.tensor(t, dtype=torch.float32)
            assert torch.equal(pl._scaled(x, t, True), want)  # == on values: -0.0 may come out +0.0
    assert pl._scaled(torch.tensor([-math.inf]), 0.7, True).item() == -math.inf


def test_log_contract_accuracy():
    s = torch.cat(
        [
            torch.tensor([1.0, 2.0, 1.4142135, 1.4142137, 262144.0]),
            torch.rand(10000, generator=gen(1)) * 3e5 + 1,
        ]
    )
    got = pl.log_contract(s)
    assert got.dtype == torch.float64
    want = torch.log(s.double())
    assert ((got - want).abs() <= 4e-16 * want.abs().clamp(min=1)).all()
    assert got[0] == 0.0


# ---------------------------------------------------------------------------------------------------
# logprobs_reference: the contract's logprob
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,v,dtype,temperature",
    [(37, 1000, torch.bfloat16, 1.0), (37, 4099, torch.float32, 0.7), (5, 8193, torch.float16, 1.3),
     (3, 1, torch.float32, 1.0)],
)  # fmt: skip
def test_logprobs_reference_vs_float64_and_torch(n, v, dtype, temperature):
    g = gen(n + v)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    ids = torch.randint(0, v, (n,), generator=g)
    got = pl.logprobs_reference(logits, ids, temperature)
    assert got.dtype == torch.float32 and got.shape == (n,)
    t = float(np.float32(temperature))
    truth = torch.log_softmax(logits.double() / t, -1).gather(-1, ids[:, None])[:, 0]
    # a couple of fp32 ulps of |logp| (up to ~30 here)
    tol = 1e-6 + 3e-7 * truth.abs()
    assert ((got.double() - truth).abs() <= tol).all()
    # parity.token_logprobs (server and trainer) is this contract, bit for bit
    assert torch.equal(got, token_logprobs(logits, ids, temperature))


def test_logprobs_reference_bits_do_not_depend_on_batching_layout_or_padding():
    g = gen(7)
    logits = (torch.randn(9, 5000, generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(0, 5000, (9,), generator=g)
    full = pl.logprobs_reference(logits, ids)
    alone = torch.stack([pl.logprobs_reference(logits[i : i + 1], ids[i : i + 1])[0] for i in range(9)])
    assert torch.equal(full, alone)
    wide = torch.full((9, 6000), -1.0, dtype=torch.bfloat16)[:, 500:5500]  # strided rows
    wide.copy_(logits)
    assert torch.equal(pl.logprobs_reference(wide, ids), full)
    # -inf columns appended (even a whole extra tile) contribute exp_c(-86) ~ 2^-124: same bits
    padded = torch.cat([logits, torch.full((9, 4096 + 17), -math.inf, dtype=torch.bfloat16)], -1)
    assert torch.equal(pl.logprobs_reference(padded, ids), full)
    assert torch.equal(pl.logprobs_reference(logits.view(3, 3, 5000), ids.view(3, 3)).view(9), full)


def test_logprobs_reference_special_rows():
    logits = torch.randn(5, 300, generator=gen(2))
    logits[1, 7] = math.nan
    logits[2, 9] = math.inf
    logits[3] = -math.inf
    logits[4, :150] = -math.inf
    ids = torch.tensor([0, 1, 2, 3, 200])
    got = pl.logprobs_reference(logits, ids)
    assert torch.isfinite(got[0]) and torch.isnan(got[1:4]).all()  # never a silent value
    want = torch.log_softmax(logits[4, 150:].double(), -1)[50]
    assert abs(got[4].item() - want.item()) < 1e-6
    logits[0, 5] = -math.inf
    assert pl.logprobs_reference(logits[:1], torch.tensor([5]))[0] == -math.inf


def test_fused_logprobs_on_cpu_is_the_reference():
    logits = (torch.randn(11, 777, generator=gen(3)) * 3).to(torch.bfloat16)
    ids = torch.randint(0, 777, (11,), generator=gen(4))
    assert torch.equal(pl.fused_logprobs(logits, ids, 0.9), pl.logprobs_reference(logits, ids, 0.9))


# ---------------------------------------------------------------------------------------------------
# The op (plain-PyTorch path on the CPU): values, gradients, masking, validation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("ref_kind", ["logits", "logprobs"])
def test_policy_loss_reference_values_and_grads_vs_float64(est, ref_kind):
    g = gen(11)
    n, v, temperature = 37, 1000, 0.8
    logits = torch.randn(n, v, generator=g) * 2
    ref_logits = logits + torch.randn(n, v, generator=g) * 0.3
    ids = torch.randint(0, v, (n,), generator=g)
    old = pl.logprobs_reference(logits, ids, temperature) + torch.randn(n, generator=g) * 0.05
    ref_lp = old + torch.randn(n, generator=g) * 0.2
    kw = {"ref_logits": ref_logits} if ref_kind == "logits" else {"ref_logprobs": ref_lp}
    x = logits.clone().requires_grad_(True)
    out = pl.fused_policy_loss(x, ids, old, None, temperature, kl_estimator=est, entropy=True, **kw)
    leaf, logp, ratio, kl, ent = f64_outputs(
        logits, ids, old, temperature, ref_logits if ref_kind == "logits" else None,
        ref_lp if ref_kind == "logprobs" else None, est,
    )  # fmt: skip
    assert (out.logp.double() - logp).abs().max() < 2e-6
    assert ((out.ratio.double() - ratio).abs() / ratio).max() < 3e-6
    assert (out.kl.double() - kl).abs().max() < 3e-6 + 1e-5 * kl.abs().max()
    assert (out.entropy.double() - ent).abs().max() < 1e-5
    w = torch.randn(4, n, generator=g)
    loss = (w[0] * out.logp + w[1] * out.ratio + w[2] * out.kl + w[3] * out.entropy).sum()
    loss.backward()
    (w.double()[0] * logp + w.double()[1] * ratio + w.double()[2] * kl + w.double()[3] * ent).sum().backward()
    err = (x.grad.double() - leaf.grad).norm() / leaf.grad.norm()
    assert err < 1e-5


def test_masked_rows_are_neutral_with_zero_grad_and_ref_gets_no_grad():
    g = gen(12)
    logits = torch.randn(2, 6, 300, generator=g)
    ref = torch.randn(2, 6, 300, generator=g).requires_grad_(True)
    ids = torch.randint(0, 300, (2, 6), generator=g)
    mask = torch.rand(2, 6, generator=g) > 0.4
    mask[0, 0], mask[1, 5] = True, False
    ids[1, 5] = 10**6  # masked: never read, never an error
    old = torch.full((2, 6), math.nan)  # masked rows' old logprobs are garbage too
    old[mask] = -5.0
    x = logits.clone().requires_grad_(True)
    out = pl.fused_policy_loss(x, ids, old, mask, ref_logits=ref, entropy=True)
    assert out.logp.shape == (2, 6)
    off = ~mask
    assert (out.logp[off] == 0).all() and (out.ratio[off] == 1).all()
    assert (out.kl[off] == 0).all() and (out.entropy[off] == 0).all()
    (out.logp.sum() + out.ratio.sum() + out.kl.sum() + out.entropy.sum()).backward()
    assert (x.grad[off] == 0).all()
    assert (x.grad[mask].abs().sum(-1) > 0).all()
    assert ref.grad is None


def test_ratio_is_exactly_one_on_policy():
    logits = (torch.randn(37, 4099, generator=gen(13)) * 3).to(torch.bfloat16)
    ids = torch.randint(0, 4099, (37,), generator=gen(14))
    old = pl.fused_logprobs(logits, ids, 0.7)
    out = pl.fused_policy_loss(logits, ids, old, None, 0.7)
    assert torch.equal(out.logp, old)
    assert (out.ratio == 1.0).all()
    assert (pl.fused_policy_loss(logits, ids, None, None, 0.7).ratio == 1.0).all()


def test_invalid_ids_raise_on_unmasked_tokens_only():
    logits = torch.randn(4, 50)
    for bad in (-1, 50, 10**9):
        ids = torch.tensor([0, bad, 2, 3])
        with pytest.raises(ValueError, match="outside \\[0, 50\\)"):
            pl.fused_policy_loss(logits, ids, torch.zeros(4))
        with pytest.raises(ValueError, match="outside"):
            pl.fused_logprobs(logits, ids)
        pl.fused_policy_loss(logits, ids, torch.zeros(4), torch.tensor([True, False, True, True]))
    with pytest.raises(ValueError, match="one per token"):
        pl.fused_policy_loss(logits, torch.zeros(3, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="kl_estimator"):
        pl.fused_policy_loss(logits, torch.zeros(4, dtype=torch.long), kl_estimator="k4")


def test_fused_op_and_reference_reject_the_same_arguments():
    logits = torch.randn(4, 50)
    ids = torch.zeros(4, dtype=torch.long)
    bad = [
        (dict(ids=torch.zeros(3, dtype=torch.long)), "one per token"),
        (dict(old_logprobs=torch.zeros(5)), "one per token"),
        (dict(mask=torch.ones(2, dtype=torch.bool)), "one per token"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(temperature=0.0), "positive"),
        (dict(temperature=math.nan), "positive"),
        (dict(ref_logits=torch.randn(4, 51)), "ref_logits shape"),
        (dict(ref_logits=torch.randn(4, 50), ref_logprobs=torch.zeros(4)), "not both"),
        (dict(ref_logprobs=torch.zeros(3)), "one per token"),
    ]
    for kw, msg in bad:
        kw = {"ids": ids, **kw}
        for fn in (pl.fused_policy_loss, pl.policy_loss_reference):
            with pytest.raises(ValueError, match=msg):
                fn(logits, **kw)


def test_launch_tables_are_fixed_by_vocabulary_class():
    assert pl.v_class(32768) == pl.v_class(65536) == "small"
    assert pl.v_class(65537) == pl.v_class(151936) == pl.v_class(262144) == "large"
    names = [c.name for c in pl.FWD_CANDIDATES]
    assert len(set(names)) == len(names) and pl.FwdLaunch() in pl.FWD_CANDIDATES
    for c in (*pl.FWD_CANDIDATES, *pl.FWD_LAUNCH.values()):
        assert c.validate() is c
    for bad in (
        pl.FwdLaunch(unroll=3),
        pl.FwdLaunch(stream=2, rows=2),  # a stream launch's grid is stream x SMs
        pl.FwdLaunch(stream=2, unroll=2),
        pl.FwdLaunch(packed=True),  # packed needs pairs
        pl.FwdLaunch(stream=65),
    ):
        with pytest.raises(ValueError):
            bad.validate()
    assert pl.FwdLaunch(num_warps=1, num_stages=3, stream=12, pairs=True, packed=True).name == "w1u1s3r1g12ph"


# ---------------------------------------------------------------------------------------------------
# The forward kernels compiled for sm_90 (H100/H200) on the CPU: Triton's passes and bundled ptxas
# ---------------------------------------------------------------------------------------------------
def _compile_fwd_sm90(kernel, num_warps: int, num_stages: int, **consts):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    base = dict(
        V=32768, HAS_T=False, HAS_OLD=True, HAS_MASK=False, REF_MODE=2, KL_MODE=3, ENTROPY=False, TILE=2048,
        LOG2_TILE=11, FMA=1, UNROLL=1, NUM_STAGES=num_stages, ROWS_LOOP=False, N_ITERS=0, N_STEPS=0,
        INTERP=False, PAIRS=False, PACKED=False, UNIFORM=True, ROW_T=False,
    )  # fmt: skip
    base.update(consts)
    consts = {k: v for k, v in base.items() if k in kernel.arg_names}
    types = {"IDS": "*i64", "OLD": "*fp32", "REF_LP": "*fp32", "MASK": "*u8", "temperature": "fp32"}
    types.update({n: "*fp32" for n in ("LOGP", "RATIO", "KL", "ENT", "LSE", "TEMPS", "INV_TS")}, inv_t="fp32")
    sig = {
        n: "constexpr" if n in consts else types.get(n, "*bf16" if n in "XR" else "i32")
        for n in kernel.arg_names
    }
    # as a launch specializes them: 16-byte aligned pointers, strides that are multiples of 16
    aligned = [n for n in sig if sig[n].startswith("*") or n in ("x_sb", "x_sl", "r_sb", "r_sl")]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(kernel, sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


@pytest.mark.skipif(
    pl._interpreting(), reason="TRITON_INTERPRET=1: the kernels are interpreter functions, not compilable"
)
@pytest.mark.parametrize(
    "launch", [c for c in pl.FWD_CANDIDATES if c.stream or c.pairs], ids=lambda c: c.name
)
def test_new_forward_launches_compile_for_sm90(launch):
    """Every stream / pairs / packed candidate compiles for sm_90 (no GPU needed; the benchmark's case and
    one with a mask, reference logits, entropy, T != 1 and a partial tile; the row kernel also with per-row
    temperatures), with: no register spills;
    the tiles read as 16-byte vectors (cp.async with num_stages > 1); bf16x2 max exactly when packed
    applies (T == 1)."""
    import re

    kernel = pl._policy_fwd_stream_kernel if launch.stream else pl._policy_fwd_kernel
    variants = [{}, dict(HAS_MASK=True, REF_MODE=1, ENTROPY=True, HAS_T=True, V=151936)]
    if not launch.stream:  # per-row temperatures: the row kernel only (both branches of a row)
        variants.append(dict(ROW_T=True, V=151936))
    for consts in variants:
        k = _compile_fwd_sm90(
            kernel, launch.num_warps, launch.num_stages, PAIRS=launch.pairs, PACKED=launch.packed, **consts
        )
        ptx = k.asm["ptx"]
        packed_max = launch.packed and (consts.get("ROW_T", False) or not consts.get("HAS_T", False))
        assert ("max.NaN.bf16x2" in ptx) == packed_max, consts  # ROW_T: in its T == 1 branch
        if launch.num_stages > 1:
            assert "cp.async.cg.shared.global" in ptx, "tile loop not pipelined"
        else:
            assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), "tiles not read as 16-byte vectors"
        usage = cubin_resource_usage(k.asm["cubin"])
        if usage is not None:
            assert "STACK:0" in usage, usage  # no register spills


# ---------------------------------------------------------------------------------------------------
# PPO / GRPO wrapper vs the direct formula
# ---------------------------------------------------------------------------------------------------
def direct_ppo(ratio, adv, mask, clip_low, clip_high, dual, kl, kl_coef, ent, ent_coef, aggregation):
    r = ratio.double()
    a = adv.double()
    pg = torch.maximum(-a * r, -a * r.clamp(1 - clip_low, 1 + clip_high))
    if dual is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -a * dual), pg)
    per = pg + kl_coef * kl.double() - ent_coef * ent.double()
    m = mask.double()
    if aggregation == "token-mean":
        return (per * m).sum() / m.sum()
    sums, counts = (per * m).sum(-1), m.sum(-1)
    has = counts > 0
    per_seq = sums / counts.clamp(min=1) if aggregation == "sequence-mean" else sums
    return per_seq[has].mean()


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean", "sequence-sum"])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_loss_matches_direct_formula(aggregation, dual):
    g = gen(21)
    b, t, v = 4, 9, 257
    logits = torch.randn(b, t, v, generator=g) * 2
    ids = torch.randint(0, v, (b, t), generator=g)
    lp = pl.logprobs_reference(logits, ids)
    old = lp + torch.randn(b, t, generator=g) * 0.4  # ratios well outside [0.8, 1.28]
    ref_lp = lp + torch.randn(b, t, generator=g) * 0.1
    adv = torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[3] = False  # a sequence with no tokens
    x = logits.clone().requires_grad_(True)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual, kl_coef=0.05, entropy_coef=0.01)
    out = ppo_loss(x, ids, old, adv, mask, ref_logprobs=ref_lp, aggregation=aggregation, **kw)
    out.loss.backward()
    y = logits.clone().requires_grad_(True)
    ref = pl.policy_loss_reference(y, ids, old, mask, ref_logprobs=ref_lp, entropy=True)
    adv_t = adv[:, None].expand(b, t)
    want = direct_ppo(ref.ratio, adv_t, mask, 0.2, 0.28, dual, ref.kl, 0.05, ref.entropy, 0.01, aggregation)
    want.backward()
    assert abs(out.loss.item() - want.item()) < 1e-6
    assert torch.allclose(x.grad, y.grad, rtol=0, atol=1e-7)
    r = out.ratio[mask]
    a = adv_t[mask]
    clipped = ((r > 1.28) & (a > 0)) | ((r < 0.8) & (a < 0))
    assert clipped.any() and math.isclose(out.metrics["clip_frac"].item(), clipped.float().mean().item())
    if dual is not None:
        assert ((r > 3.0) & (a < 0)).any() == (out.metrics["dual_clip_frac"] > 0)


def test_clip_and_dual_clip_gradients():
    ratio = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.5, 5.0]).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    pg, clipped, dual = surrogate(ratio, adv, 0.2, 0.3, dual_clip=3.0)
    pg.sum().backward()
    # A > 0: the gradient stops above 1 + clip_high; A < 0: below 1 - clip_low and beyond dual_clip
    assert ratio.grad.tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0, 0.0]
    assert clipped.tolist() == [False, False, True, True, False, False]
    assert dual.tolist() == [False, False, False, False, False, True]
    assert pg[5].item() == 3.0
    with pytest.raises(ValueError, match="dual_clip"):
        surrogate(ratio, adv, 0.2, 0.2, dual_clip=1.0)


def _aggregate_before(per_token, mask, aggregation):
    """aggregate() as first written (a zeros_like per masking): the bits the rewrite must keep."""
    m = mask.to(per_token.dtype)
    vals = torch.where(mask, per_token, torch.zeros_like(per_token))
    if aggregation == "token-mean":
        return vals.sum() / m.sum().clamp(min=1.0)
    sums, counts = vals.sum(-1), m.sum(-1)
    has = counts > 0
    per_seq = sums / counts.clamp(min=1.0) if aggregation == "sequence-mean" else sums
    return torch.where(has, per_seq, torch.zeros_like(per_seq)).sum() / has.sum().clamp(min=1)


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean", "sequence-sum"])
def test_ppo_loss_keeps_the_bits_of_the_first_formulation(aggregation):
    """Fewer ops (one zero for every masking, the two fractions from one integer count, no mask for the
    fused op when none is given), the same bits: loss, its gradient and the metrics."""
    g = gen(41)
    b, t, v = 3, 7, 300
    logits = torch.randn(b, t, v, generator=g) * 2
    ids = torch.randint(0, v, (b, t), generator=g)
    old = pl.logprobs_reference(logits, ids) + torch.randn(b, t, generator=g) * 0.4
    adv = torch.randn(b, t, generator=g)
    ref_lp = old + torch.randn(b, t, generator=g) * 0.1
    for mask in (torch.rand(b, t, generator=g) > 0.3, None):
        x = logits.clone().requires_grad_(True)
        kw = dict(
            ref_logprobs=ref_lp, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0, aggregation=aggregation
        )
        out = ppo_loss(x, ids, old, adv, mask, **kw)
        out.loss.backward()
        y = logits.clone().requires_grad_(True)
        m = mask if mask is not None else torch.ones(b, t, dtype=torch.bool)
        ref = pl.policy_loss_reference(y, ids, old, m, ref_logprobs=ref_lp, entropy=True)
        pg, clipped, dual = surrogate(ref.ratio, adv, 0.2, 0.2, 3.0)
        per = torch.where(m, pg + 0.05 * ref.kl - 0.01 * ref.entropy, torch.zeros_like(pg))
        loss = _aggregate_before(per, m, aggregation)
        loss.backward()
        assert torch.equal(out.loss.view(torch.int32), loss.detach().view(torch.int32))
        assert torch.equal(out.per_token.detach(), per.detach())
        assert torch.equal(x.grad.view(torch.int32), y.grad.view(torch.int32))
        assert torch.equal(aggregate(per, m, aggregation), loss)
        n = m.sum().clamp(min=1)
        for name, flags in (("clip_frac", clipped), ("dual_clip_frac", dual)):
            want = torch.where(m, flags.float(), 0.0).sum() / n
            assert out.metrics[name].dtype == torch.float32
            assert torch.equal(out.metrics[name].view(torch.int32), want.view(torch.int32)), name
        unchecked = ppo_loss(logits, ids, old, adv, mask, validate_ids=False, **kw)
        assert torch.equal(unchecked.loss, out.loss)
    bad = ids.clone()
    bad[1, 2] = v
    with pytest.raises(ValueError, match=f"action id {v} outside"):
        ppo_loss(logits, bad, old, adv)


def test_packed_sequences_aggregate_like_padded_rows():
    g = gen(31)
    per = torch.randn(3, 5, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[1] = False
    seq_ids = torch.arange(3)[:, None].expand(3, 5)
    for agg in ("token-mean", "sequence-mean", "sequence-sum"):
        padded = aggregate(per, mask, agg)
        packed = aggregate(per[mask], torch.ones(int(mask.sum()), dtype=torch.bool), agg, seq_ids[mask], 3)
        assert torch.allclose(padded, packed, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per, mask, "mean")


# ---------------------------------------------------------------------------------------------------
# Launch options of the forward kernel (GPU): none changes a bit
# ---------------------------------------------------------------------------------------------------
def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN payloads aside (NaN where the other is NaN)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(
        a[~nan].view(torch.int32), b[~nan].view(torch.int32)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("launch", pl.FWD_CANDIDATES, ids=[c.name for c in pl.FWD_CANDIDATES])
@pytest.mark.parametrize("v", [4099, 4100, 151936])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_every_swept_forward_launch_is_bitwise_the_contract(launch, v, temperature, monkeypatch):
    """Every configuration the benchmark may pick, with masked rows, reference logits, entropy, T != 1
    and T == 1 (where packed applies), odd and even V (pairs), rows with NaN / +inf / -inf columns /
    all -inf / a range wider than the clamp: the original launch's bits (all six outputs) and the
    plain-PyTorch contract's. Stream launches run on a grid of `stream` programs (one per SM as far as
    the launcher knows), so that each program streams several rows."""
    monkeypatch.setattr(pl, "_sm_count", lambda device: 1)
    g = torch.Generator(device="cuda").manual_seed(v)
    n = 45  # not a multiple of any rows-per-program
    x = torch.randn(n, v, generator=g, device="cuda") * 3
    x[1, 7], x[2, v - 3], x[3] = math.nan, math.inf, -math.inf  # NaN outputs (all -inf: no finite max)
    x[4, :2048] = -math.inf  # a first tile of -inf only
    x[5, 100:900] = -math.inf  # -inf columns
    x[6] *= 40  # lanes below the clamp max(t, -86)
    x[7, v // 2] = 300.0  # the max grows late, by a lot
    logits = x.to(torch.bfloat16)
    ref_logits = (logits.float() + torch.randn(n, v, generator=g, device="cuda") * 0.5).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), generator=g, device="cuda")
    old = torch.randn(n, generator=g, device="cuda") * 0.1 - 8.0
    mask = torch.rand(n, generator=g, device="cuda") > 0.25
    mask[:8] = True
    args = (logits, ids, old, mask, ref_logits, None, temperature, 3, True, pl.CONTRACT_TILE, True)
    got = pl._forward(*args, launch)
    want = pl._forward(*args, pl.FwdLaunch())  # the original launch: one row per program
    for name, a, b in zip(("logp", "ratio", "kl", "ent", "lse", "ref_lp"), got, want, strict=True):
        if name == "ref_lp":  # written for unmasked rows only (the backward reads no other)
            a, b = a[mask], b[mask]
        assert _same_bits(a, b), name
    ref = pl.policy_loss_reference(logits, ids, old, mask, temperature, ref_logits=ref_logits, entropy=True)
    for name, a, b in zip(("logp", "ratio", "kl", "entropy"), got[:4], ref, strict=True):
        assert _same_bits(a, b.detach()), name
    # no mask, reference logprobs (the benchmark's case) and a 3-D view with a dropped position
    view = logits.view(5, 9, v)[:, :-1]
    ids3 = ids.view(5, 9)[:, :-1]
    args = (view, ids3.reshape(-1), old.view(5, 9)[:, :-1].reshape(-1), None, None, old[:40] + 0.1,
            temperature, 3, False, pl.CONTRACT_TILE, True)  # fmt: skip
    got = pl._forward(*args, launch)
    want = pl._forward(*args, pl.FwdLaunch())
    for name, a, b in zip(("logp", "ratio", "kl", "ent", "lse"), got, want, strict=False):
        assert _same_bits(a, b), name
