"""The Triton kernels of parity.ops.policy_loss on a CUDA GPU (skipped without one)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from parity.ops import policy_loss as pl

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture
def poison(monkeypatch):
    """Every output of the op starts as NaN: a NaN left afterwards is an element never written."""

    def empty(*args, **kwargs):
        return torch.empty(*args, **kwargs).fill_(math.nan)

    monkeypatch.setattr(pl, "_empty", empty)


def inputs(seed, n, v, dtype, scale=3.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, device=DEV) * scale).to(dtype)
    ref_logits = (logits.float() + torch.randn(n, v, generator=g, device=DEV) * 0.5).to(dtype)
    ids = torch.randint(0, v, (n,), generator=g, device=DEV)
    old = torch.randn(n, generator=g, device=DEV) * 0.1 - 8.0
    mask = torch.rand(n, generator=g, device=DEV) > 0.25
    mask[0] = True
    return logits, ref_logits, ids, old, mask


def bits(t):
    return t.detach().contiguous().view(torch.int32)


@pytest.mark.parametrize(
    "n,v,dtype,temperature",
    [(37, 1000, torch.bfloat16, 1.0), (37, 4099, torch.float32, 0.7), (16, 32773, torch.float16, 1.0),
     (8, 151936, torch.bfloat16, 1.0), (4, 262144, torch.bfloat16, 0.9)],
)  # fmt: skip
def test_forward_is_bitwise_the_contract_on_gpu_and_cpu(poison, n, v, dtype, temperature):
    logits, ref_logits, ids, old, mask = inputs(n * v, n, v, dtype)
    out = pl.fused_policy_loss(logits, ids, old, mask, temperature, ref_logits=ref_logits, entropy=True)
    ref_gpu = pl.policy_loss_reference(
        logits, ids, old, mask, temperature, ref_logits=ref_logits, entropy=True
    )
    cpu = [t.cpu() for t in (logits, ids, old, mask, ref_logits)]
    ref_cpu = pl.policy_loss_reference(*cpu[:4], temperature, ref_logits=cpu[4], entropy=True)
    for name in ("logp", "ratio", "kl", "entropy"):
        got = getattr(out, name)
        assert not torch.isnan(got).any(), f"{name}: unwritten elements"
        assert torch.equal(bits(got), bits(getattr(ref_gpu, name))), f"{name}: kernel != GPU reference"
        assert torch.equal(bits(got).cpu(), bits(getattr(ref_cpu, name))), f"{name}: kernel != CPU reference"
    # the fma-free variant of the contract, logprobs only
    lp = pl._forward(logits, ids, None, None, None, None, temperature, 0, False, pl.CONTRACT_TILE, False)[0]
    assert torch.equal(lp.cpu(), pl.logprobs_reference(cpu[0], cpu[1], temperature, fma=False))


@pytest.mark.parametrize("tile", [1024, 4096, 8192])
@pytest.mark.parametrize("n,v,temperature", [(37, 4099, 0.7), (8, 151936, 1.0)])
def test_other_tiles_are_bitwise_their_reference(poison, tile, n, v, temperature):
    logits, _r, ids, old, mask = inputs(tile + v, n, v, torch.bfloat16)
    args = (logits, ids, old, mask, None, None, temperature, 0, True, tile, True)
    logp, _ratio, _kl, ent, _lse, _ref = pl._forward(*args)
    ref = pl.policy_loss_reference(logits, ids, old, mask, temperature, entropy=True, tile=tile)
    assert torch.equal(bits(logp), bits(ref.logp)) and torch.equal(bits(ent), bits(ref.entropy))


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators_and_ref_logprobs_bitwise(poison, est):
    logits, _r, ids, old, mask = inputs(5, 37, 4099, torch.bfloat16)
    ref_lp = old + torch.randn_like(old) * 0.3
    out = pl.fused_policy_loss(logits, ids, old, mask, ref_logprobs=ref_lp, kl_estimator=est)
    ref = pl.policy_loss_reference(logits.cpu(), ids.cpu(), old.cpu(), mask.cpu(), ref_logprobs=ref_lp.cpu(),
                                   kl_estimator=est)  # fmt: skip
    assert torch.equal(bits(out.kl).cpu(), bits(ref.kl)) and torch.equal(
        bits(out.ratio).cpu(), bits(ref.ratio)
    )


@pytest.mark.parametrize(
    "n,v,dtype,temperature,tol",
    [
        (37, 1000, torch.float32, 0.7, 2e-5),
        (37, 4099, torch.bfloat16, 1.0, 1e-2),
        (9, 151936, torch.float16, 1.0, 3e-3),
    ],
)
def test_values_and_grads_vs_float64(poison, n, v, dtype, temperature, tol):
    logits, ref_logits, ids, old, mask = inputs(n + v, n, v, dtype, scale=2.0)
    x = logits.clone().requires_grad_(True)
    r = ref_logits.clone().requires_grad_(True)
    out = pl.fused_policy_loss(x, ids, old, mask, temperature, ref_logits=r, entropy=True)
    xd = logits.double().requires_grad_(True)
    t = float(np.float32(temperature))
    lsm = torch.log_softmax(xd / t, -1)
    logp = lsm.gather(-1, ids[:, None])[:, 0]
    ratio = torch.exp(logp - old.double())
    d = torch.log_softmax(ref_logits.double() / t, -1).gather(-1, ids[:, None])[:, 0] - logp
    kl = torch.expm1(d) - d
    ent = -(lsm.exp() * lsm).sum(-1)
    m = mask
    assert ((out.logp.double() - logp).abs()[m] <= 1e-6 + 3e-7 * logp.abs()[m]).all()
    assert ((out.ratio.double() / ratio - 1).abs()[m] <= 3e-6).all()
    assert ((out.kl.double() - kl).abs()[m] <= 1e-6 + 1e-5 * kl.abs()[m]).all()
    assert ((out.entropy.double() - ent).abs()[m] <= 2e-5).all()
    w = torch.randn(4, n, device=DEV)
    (w[0] * out.logp + w[1] * out.ratio + w[2] * out.kl + w[3] * out.entropy).sum().backward()
    wd = w.double() * m.double()
    (wd[0] * logp + wd[1] * ratio + wd[2] * kl + wd[3] * ent).sum().backward()
    assert x.grad.dtype == dtype and not torch.isnan(x.grad).any()
    assert r.grad is None
    assert (x.grad[~m] == 0).all()
    err = (x.grad.double() - xd.grad).norm() / xd.grad.norm()
    assert err < tol


def test_ratio_is_exactly_one_on_policy():
    logits, _r, ids, _o, _m = inputs(7, 64, 151936, torch.bfloat16)
    old_cpu = pl.logprobs_reference(logits.cpu(), ids.cpu())  # e.g. the rollout side, computed on a CPU
    out = pl.fused_policy_loss(logits, ids, old_cpu.to(DEV))
    assert (out.ratio == 1.0).all()
    assert torch.equal(pl.fused_logprobs(logits, ids).cpu(), old_cpu)


def test_strided_rows_and_inplace_backward():
    g = torch.Generator(device=DEV).manual_seed(3)
    full = (torch.randn(3, 6, 32768, generator=g, device=DEV) * 2).to(torch.bfloat16)
    view = full[:, :-1]  # [B, L, V] with the last position dropped: no copy
    ids = torch.randint(0, 32768, (3, 5), generator=g, device=DEV)
    old = torch.full((3, 5), -9.0, device=DEV)
    a = view.detach().clone().requires_grad_(True)
    out_a = pl.fused_policy_loss(a, ids, old, entropy=True)
    b = view.detach().requires_grad_(True)
    out_b = pl.fused_policy_loss(b, ids, old, entropy=True)
    assert torch.equal(out_a.logp, out_b.logp) and torch.equal(out_a.entropy, out_b.entropy)
    (out_a.ratio.sum() + out_a.entropy.sum()).backward()
    (out_b.ratio.sum() + out_b.entropy.sum()).backward()
    assert torch.equal(a.grad, b.grad)
    c = view.detach().clone().requires_grad_(True)
    out_c = pl.fused_policy_loss(c, ids, old, entropy=True, inplace_backward=True)
    (dc,) = torch.autograd.grad(out_c.ratio.sum() + out_c.entropy.sum(), c)
    assert dc.data_ptr() == c.data_ptr() and torch.equal(dc, a.grad)


def test_int64_offsets_beyond_two_to_the_31():
    n, v = 14200, 151936
    assert n * v > 2**31
    g = torch.Generator(device=DEV).manual_seed(4)
    logits = (torch.randn(n, v, generator=g, device=DEV) * 2).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), generator=g, device=DEV)
    x = logits.requires_grad_(True)
    out = pl.fused_policy_loss(x, ids, None)
    gl = torch.randn(n, device=DEV)
    (out.logp * gl).sum().backward()
    for rows in (slice(0, 3), slice(n - 3, n)):
        y = logits[rows].detach().clone().requires_grad_(True)
        ref = pl.policy_loss_reference(y, ids[rows], None)
        assert torch.equal(out.logp[rows], ref.logp.detach())
        (ref.logp * gl[rows]).sum().backward()
        assert torch.allclose(x.grad[rows].float(), y.grad.float(), rtol=1e-2, atol=1e-6)


def test_invalid_ids_raise_on_gpu():
    logits, _r, ids, old, mask = inputs(8, 8, 1000, torch.bfloat16)
    ids[3] = 1000
    mask[3] = True
    with pytest.raises(ValueError, match="outside"):
        pl.fused_policy_loss(logits, ids, old, mask)
    mask[3] = False
    pl.fused_policy_loss(logits, ids, old, mask)


def test_ppo_loss_end_to_end_passes_and_syncs_on_gpu():
    """ppo_loss + backward(): the only [N, V] aten op is the dlogits allocation, which autograd takes as
    .grad (none with the in-place backward), no zero-filled gradients, and the ids check's result comes
    back by an asynchronous copy (no blocking .item()). -inf logits give zero gradients, never NaN."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from parity.ppo_loss import ppo_loss

    n, v = 64, 32768
    logits, _r, ids, old, _m = inputs(12, n, v, torch.bfloat16)
    ref_lp = old + 0.1
    adv = torch.randn(n, device=DEV)
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.04, clip_low=0.2, clip_high=0.28)
    views = ("view", "_unsafe_view", "reshape", "expand", "detach", "alias", "unbind", "select", "slice")

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names, self.big = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            self.names.append(name)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(o, torch.Tensor) and o.numel() >= n * v for o in outs) and not any(
                name.startswith(f"aten.{w}.") for w in views
            ):
                self.big.append(name)
            return out

    ppo_loss(logits.clone().requires_grad_(True), ids, old, adv, **kw).loss.backward()  # compile
    for inplace in (False, True):
        x = logits.clone().requires_grad_(True)
        with Ops() as ops:
            ppo_loss(x, ids, old, adv, inplace_backward=inplace, **kw).loss.backward()
        assert ops.big == ([] if inplace else ["aten.empty.memory_format"]), ops.big
        assert "aten.zeros.default" not in ops.names
        assert "aten._local_scalar_dense.default" not in ops.names
        if inplace:
            assert x.grad.data_ptr() == x.data_ptr()
    xi = logits.float()
    xi[:, -7:] = -math.inf
    x = xi.requires_grad_(True)
    ppo_loss(x, ids, old, adv, **kw).loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, -7:] == 0).all()


def test_ppo_loss_ids_check_on_gpu():
    from parity.ppo_loss import ppo_loss

    logits, _r, ids, old, mask = inputs(13, 16, 1000, torch.bfloat16)
    adv = torch.randn(16, device=DEV)
    x = logits.clone().requires_grad_(True)
    a = ppo_loss(x, ids, old, adv, mask)
    a.loss.backward()
    y = logits.clone().requires_grad_(True)
    b = ppo_loss(y, ids, old, adv, mask, validate_ids=False)
    b.loss.backward()
    assert torch.equal(bits(a.per_token), bits(b.per_token)) and torch.equal(x.grad, y.grad)
    for bad in (-1, 1000):
        ids2 = ids.clone()
        ids2[3] = bad
        mask[3] = True
        with pytest.raises(ValueError, match=f"action id {bad} outside"):
            ppo_loss(logits, ids2, old, adv, mask)
        with pytest.raises(ValueError, match="outside"):
            ppo_loss(logits, ids2, old, adv)
        with pytest.raises(ValueError, match="outside"):
            pl.fused_logprobs(logits, ids2)
        mask[3] = False
        ppo_loss(logits, ids2, old, adv, mask)
    torch.cuda.synchronize()  # the clamped ids kept every launch in bounds
