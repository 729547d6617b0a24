"""The Triton kernels of parity.ops.policy_loss under the Triton interpreter (CPU, numpy arithmetic).

The interpreter must be chosen before triton.jit decorates the kernels, so the checks run in a child
Python with ``TRITON_INTERPRET=1`` (this file's ``__main__``). There the native ``tl.fma`` would round
twice (numpy), so the kernels use their exact fp64 emulation of fma (FMA mode 2); everything else is
the kernel code that runs on the GPU. Forward outputs must be bitwise the plain-PyTorch contract.
"""

from __future__ import annotations

import math
import os

import torch

from tests.helpers import run_under_triton_interpreter


def test_kernels_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=900)
    assert "interpreter checks passed" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# Child process
# ---------------------------------------------------------------------------------------------------
def _poison_empty(*args, **kwargs):
    t = torch.empty(*args, **kwargs)
    return t.fill_(math.nan)


def _check_case(pl, seed, shape, v, dtype, temperature, ref_kind, entropy, masked, est):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v, generator=g) * 3).to(dtype)
    ref_logits = (logits.float() + torch.randn(*shape, v, generator=g) * 0.5).to(dtype)
    ids = torch.randint(0, v, shape, generator=g)
    old = torch.randn(shape, generator=g) * 0.1 - 6.0
    ref_lp = torch.randn(shape, generator=g) * 0.1 - 6.0
    mask = (torch.rand(shape, generator=g) > 0.3) if masked else None
    if masked:
        mask.view(-1)[0] = True
        ids[~mask] = v + 7  # masked rows' ids are never read
    kw = {"kl_estimator": est, "entropy": entropy}
    if ref_kind == "logits":
        kw["ref_logits"] = ref_logits
    elif ref_kind == "logprobs":
        kw["ref_logprobs"] = ref_lp
    x = logits.clone().requires_grad_(True)
    out = pl.fused_policy_loss(x, ids, old, mask, temperature, **kw)
    y = logits.clone().requires_grad_(True)
    ids_ref = ids if mask is None else torch.where(mask, ids, 0)
    ref = pl.policy_loss_reference(y, ids_ref, old, mask, temperature, **kw)
    for name in ("logp", "ratio", "kl", "entropy"):
        a, b = getattr(out, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert not torch.isnan(a).any(), f"{name}: unwritten (poisoned) outputs"
            assert torch.equal(a.view(torch.int32), b.detach().view(torch.int32)), f"{name} not bitwise"
    w = torch.randn(4, *shape, generator=g)

    def loss(o):
        total = (w[0] * o.logp + w[1] * o.ratio).sum()
        if o.kl is not None:
            total = total + (w[2] * o.kl).sum()
        if o.entropy is not None:
            total = total + (w[3] * o.entropy).sum()
        return total

    loss(out).backward()
    loss(ref).backward()
    assert not torch.isnan(x.grad).any(), "unwritten (poisoned) dlogits"
    assert x.grad.dtype == dtype
    err = ((x.grad.double() - y.grad.double()).norm() / y.grad.double().norm()).item()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert err < tol, (err, tol)
    if masked:
        assert (x.grad[~mask] == 0).all()
        assert (out.ratio[~mask] == 1).all() and (out.logp[~mask] == 0).all()
    tag = f"{tuple(shape)}x{v} {dtype} T={temperature} ref={ref_kind} H={entropy} mask={masked} {est}"
    return f"{tag}: grad {err:.1e}"


def _checks():
    from parity.ops import policy_loss as pl

    assert pl._fma_mode(True) == pl._FMA_EMULATED
    pl._empty = _poison_empty
    cases = [
        (1, (5,), 1000, torch.bfloat16, 1.0, "logits", True, True, "k3"),
        (2, (4,), 4099, torch.float32, 0.7, "logprobs", True, False, "k2"),
        (3, (2, 3), 300, torch.float16, 1.3, None, False, True, "k1"),
        (4, (3,), 4097, torch.bfloat16, 1.0, "logprobs", False, False, "k1"),
    ]
    for case in cases:
        print(_check_case(pl, *case), flush=True)

    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(6, 4099, generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(0, 4099, (6,), generator=g)
    # the fma-free variant of the contract and a smaller tile: still bitwise the reference
    for tile, fma, unroll in ((2048, False, 1), (4096, True, 1), (1024, True, 2)):
        launch = pl.FwdLaunch(unroll=unroll)  # two tiles' loads in flight, never other bits
        got = pl._forward(logits, ids, None, None, None, None, 0.8, 0, False, tile, fma, launch)[0]
        want = pl.logprobs_reference(logits, ids, 0.8, tile=tile, fma=fma)
        assert torch.equal(got, want), (tile, fma, unroll)
    # launch options never change a bit: several rows per program (a loop over rows, masked rows among
    # them), the pipelined tile loop, two tiles per step; every output and the gradient, as the defaults
    saved = dict(pl.FWD_LAUNCH)
    cfg = pl.FwdLaunch(num_warps=2, unroll=2, num_stages=3, rows=2)
    pl.FWD_LAUNCH.update(small=cfg, large=cfg)
    print(cfg.name, _check_case(pl, 5, (5,), 4099, torch.bfloat16, 0.8, "logits", True, True, "k3"))
    pl.FWD_LAUNCH.update(saved)
    cfg = pl.FwdLaunch(num_stages=2, rows=4)
    got = pl._forward(logits, ids, None, None, None, None, 1.0, 0, False, pl.CONTRACT_TILE, True, cfg)[0]
    assert torch.equal(got, pl.logprobs_reference(logits, ids)), cfg
    # ratio == 1 exactly when the old logprobs come from the same computation (or the reference)
    lp = pl.fused_logprobs(logits, ids)
    assert torch.equal(lp, pl.logprobs_reference(logits, ids))
    assert (pl.fused_policy_loss(logits, ids, lp).ratio == 1.0).all()
    # strided [B, L, V] rows (the last position dropped), in-place backward
    full = (torch.randn(2, 4, 700, generator=g) * 2).to(torch.bfloat16)
    view = full[:, :-1]
    ids3 = torch.randint(0, 700, (2, 3), generator=g)
    got = pl.fused_policy_loss(view, ids3, None).logp
    assert torch.equal(got, pl.logprobs_reference(view.contiguous(), ids3))
    xa = view.detach().clone().requires_grad_(True)
    old3 = torch.full((2, 3), -6.0)
    pl.fused_policy_loss(xa, ids3, old3).ratio.sum().backward()
    xb = view.detach().clone().requires_grad_(True)
    args = (ids3.reshape(-1), old3.reshape(-1), None, None, None, 1.0, 0, False, True, pl.CONTRACT_TILE, True)
    out = pl._FusedPolicyLoss.apply(xb, *args)
    (dx,) = torch.autograd.grad(out[1].sum(), xb)
    assert dx.data_ptr() == xb.data_ptr() and torch.equal(dx, xa.grad)
    # special rows: NaN / +inf / all -inf give NaN, never a silent value
    bad = torch.randn(3, 300, generator=g)
    bad[0, 3], bad[1, 4], bad[2] = math.nan, math.inf, -math.inf
    assert torch.isnan(pl.fused_logprobs(bad, torch.tensor([1, 2, 3]))).all()
    print("interpreter checks passed")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the pytest test above"
    _checks()
