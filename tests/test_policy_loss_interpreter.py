"""The Triton kernels of parity.ops.policy_loss under the Triton interpreter (CPU, numpy arithmetic).

The interpreter must be chosen before triton.jit decorates the kernels, so the checks run in a child
Python with ``TRITON_INTERPRET=1`` (this file's ``__main__``). There the native ``tl.fma`` would round
twice (numpy), so the kernels use their exact fp64 emulation of fma (FMA mode 2); everything else is
the kernel code that runs on the GPU. Forward outputs must be bitwise the plain-PyTorch contract.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys

import torch

from tests.helpers import ROOT, run_under_triton_interpreter


def test_kernels_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=900)
    assert "interpreter checks passed" in proc.stdout


def test_benchmark_help_and_profile_smoke(tmp_path):
    """benchmarks/bench_policy_loss.py: --help on the CPU, --sweep --only's check of the names, and
    --profile's code path (CPU profiler, the kernels under the interpreter, tiny sizes)."""
    script = ROOT / "benchmarks" / "bench_policy_loss.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    proc = run([sys.executable, str(script), "--help"])
    assert proc.returncode == 0 and "--profile" in proc.stdout, proc.stderr[-4000:]
    proc = run([sys.executable, str(script), "--sweep", "--only", "w1u1s3r1ph", "w9"])  # before any GPU work
    assert proc.returncode == 2 and "BWD_CANDIDATES: ['w9']" in proc.stderr, proc.stderr[-4000:]
    args = ["--profile", "--device", "cpu", "--n", "4", "--vocab", "300", "--profile-iters", "1"]
    proc = run([sys.executable, "-W", "ignore", str(script), *args, "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "profile summary" in proc.stdout
    for step in ("kernels", "ours_step", "ppo_step", "ppo_step_unchecked_ids"):
        assert (tmp_path / f"trace_{step}.json").stat().st_size > 0
    assert (tmp_path / "bench_policy_loss_profile.txt").exists()


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


class _BigOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops, outside the two kernel launches, whose output has >= ``numel`` elements
    (views and detach excepted: they move no data) and every op's name."""

    VIEWS = ("view", "_unsafe_view", "reshape", "expand", "detach", "alias", "unbind", "select", "slice")

    def __init__(self, numel):
        super().__init__()
        self.numel, self.big, self.names, self.quiet = numel, [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.quiet:  # inside a kernel launch: the interpreter's own copies of its arguments
            return out
        name = str(func)
        self.names.append(name)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        big = any(isinstance(o, torch.Tensor) and o.numel() >= self.numel for o in outs)
        if big and not any(name.startswith(f"aten.{v}.") for v in self.VIEWS):
            self.big.append(name)
        return out


def _quiet_launches(pl, mode):
    """Wrap the kernels so that ``mode`` ignores what the interpreter does inside a launch: (forward,
    stream forward, backward)."""

    class Quiet:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                mode.quiet = True
                try:
                    return launch(*args, **kwargs)
                finally:
                    mode.quiet = False

            return run

    return Quiet(pl._policy_fwd_kernel), Quiet(pl._policy_fwd_stream_kernel), Quiet(pl._policy_bwd_kernel)


def _ppo_checks(pl):
    """ppo_loss through the kernels: no [N, V] pass outside them, None (not zeros) for the gradients of
    unused outputs, the same bits as before that change, finite gradients at -inf logits."""
    from parity.ppo_loss import ppo_loss

    g = torch.Generator().manual_seed(11)
    n, v = 12, 2100
    logits = (torch.randn(n, v, generator=g) * 3).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), generator=g)
    old = pl.fused_logprobs(logits, ids) + torch.randn(n, generator=g) * 0.3
    ref_lp = old + torch.randn(n, generator=g) * 0.2
    adv = torch.randn(n, generator=g)
    kw = dict(ref_logprobs=ref_lp, kl_coef=0.04, clip_low=0.2, clip_high=0.28)

    def step(mask=None, inplace=False, x=None, **extra):
        x = logits.clone().requires_grad_(True) if x is None else x
        out = ppo_loss(x, ids, old, adv, mask, inplace_backward=inplace, **kw, **extra)
        out.loss.backward()
        return x, out

    # The only [N, V] op outside the kernels is the dlogits allocation, which autograd takes as .grad
    # (no copy); with the in-place backward there is none at all: .grad is the logits' own storage.
    # No zero fill for the gradients of logp / entropy (unused by the loss), no host sync but the ids check.
    for inplace in (False, True):
        mode = _BigOps(n * v)
        saved = pl._policy_fwd_kernel, pl._policy_fwd_stream_kernel, pl._policy_bwd_kernel, pl._empty
        pl._policy_fwd_kernel, pl._policy_fwd_stream_kernel, pl._policy_bwd_kernel = _quiet_launches(pl, mode)
        pl._empty = torch.empty  # not the poisoning allocator (a fill of every output)
        x = logits.clone().requires_grad_(True)
        try:
            with mode:
                step(inplace=inplace, x=x)
        finally:
            pl._policy_fwd_kernel, pl._policy_fwd_stream_kernel, pl._policy_bwd_kernel, pl._empty = saved
        assert mode.big == ([] if inplace else ["aten.empty.memory_format"]), (inplace, mode.big)
        assert mode.names.count("aten.zeros.default") == 0, "zero-filled gradients of unused outputs"
        assert mode.names.count("aten._local_scalar_dense.default") <= 2  # at most: the ids' min and max
        if inplace:
            assert x.grad.data_ptr() == x.data_ptr()
    x0, out0 = step()
    # an all-True mask gives the bits of no mask (values, metrics, dlogits)
    x1, out1 = step(torch.ones(n, dtype=torch.bool), validate_ids=False)
    assert torch.equal(x0.grad.view(torch.int16), x1.grad.view(torch.int16))
    for name in ("loss", "per_token", "logp", "ratio", "kl"):
        a, b = getattr(out0, name), getattr(out1, name)
        assert torch.equal(a.detach().view(torch.int32), b.detach().view(torch.int32)), name
    for name, m in out0.metrics.items():
        assert m.dtype == torch.float32 and torch.equal(m, out1.metrics[name]), name
    # the backward with None for the unused outputs' gradients == with zeros for them (what autograd
    # passed before): bitwise, on finite logits
    fwd = pl._forward(logits, ids, old, None, None, ref_lp, 1.0, 3, False, pl.CONTRACT_TILE, True)
    logp, ratio, _kl, ent, lse, _r = fwd
    gr, gk, z = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.zeros(n)
    args = (logits, ids, None, lse, logp, ratio, ref_lp, ent)
    d_none = pl._backward(*args, None, gr, gk, None, 1.0, 3, False, True)
    d_zero = pl._backward(*args, z, gr, gk, z, 1.0, 3, False, True)
    assert torch.equal(d_none.view(torch.int16), d_zero.view(torch.int16))
    # -inf logits (a masked-out vocabulary tail): zero gradient there, never NaN
    xi = logits.float()
    xi[:, -5:] = -math.inf
    x = xi.clone().requires_grad_(True)
    ppo_loss(x, ids, old, adv, **kw).loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, -5:] == 0).all()
    # invalid ids: still a ValueError from ppo_loss (after the launch), not with a mask over them
    bad = ids.clone()
    bad[3] = v
    for fn in (
        lambda: ppo_loss(logits, bad, old, adv, **kw),
        lambda: pl.fused_policy_loss(logits, bad, old),
        lambda: pl.fused_logprobs(logits, bad),
    ):
        try:
            fn()
        except ValueError as exc:
            assert f"action id {v} outside" in str(exc)
        else:
            raise AssertionError("an unmasked id outside [0, V) must raise")
    keep = torch.ones(n, dtype=torch.bool)
    keep[3] = False
    ppo_loss(logits, bad, old, adv, keep, **kw)
    print("ppo_loss checks passed", flush=True)


def _same_bits(a, b):
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(
        a[~nan].view(torch.int32), b[~nan].view(torch.int32)
    )


def _special_rows(v, g):
    """bf16 rows with NaN / +inf / all -inf (NaN outputs), a first tile of -inf, -inf columns, a range
    wider than the clamp max(t, -86), a max that grows late by a lot, subnormal-sized values."""
    x = torch.randn(9, v, generator=g) * 3
    x[0, 5], x[1, v - 2], x[2] = math.nan, math.inf, -math.inf
    x[3, : min(2048, v - 1)] = -math.inf
    x[4, 100:300] = -math.inf
    x[5] *= 40
    x[6, v // 2] = 200.0
    x[7] = torch.randn(v, generator=g) * 1e-39
    return x.to(torch.bfloat16)


def _new_launch_checks(pl):
    """Every stream / pairs / packed candidate of FWD_CANDIDATES: all six forward outputs bitwise the
    original launch's (and the logprobs the plain-PyTorch contract's), with masks, reference logits or
    logprobs, entropy, T == 1 (packed applies) and T != 1, even V (pairs apply), full and partial
    tiles, strided [B, L, V] rows, special values; V < TILE, fp32 and the gradient through autograd.

    The interpreter runs one program per grid point whatever num_warps / num_stages, and the stream
    width only sets the grid, so the candidates are checked per distinct program (kernel, pairs, packed,
    unroll, rows), on a grid of 3 stream programs (the SM count is 1 here): each program streams several
    rows, masked ones among them."""
    new = [c for c in pl.FWD_CANDIDATES if c.stream or c.pairs]
    assert len(new) >= 8
    programs = {}
    extra = pl.FwdLaunch(unroll=2, rows=2, pairs=True, packed=True)  # not swept: two tiles per step, pairs
    for c in [*new, extra]:
        key = (c.stream > 0, c.pairs, c.packed, c.unroll, c.rows)
        programs.setdefault(key, (dataclasses.replace(c, stream=min(c.stream, 3)), []))[1].append(c.name)
    g = torch.Generator().manual_seed(17)
    cases = []  # (inputs, the original launch's outputs, live rows, with reference logits)
    # V: 2 full tiles + a partial one (TILE 1024); 2 full tiles; a full tile + a partial one
    for v, tile, temperature, ref_kind, entropy, masked, rows in (
        (2500, 1024, 1.0, "logits", True, True, "strided"),
        (4096, 2048, 1.0, "logprobs", False, False, "special"),
        (2050, 2048, 0.8, "logprobs", True, True, "special"),
    ):
        if rows == "strided":
            logits = (torch.randn(2, 5, v, generator=g) * 3).to(torch.bfloat16)[:, :-1]  # [2, 4, V] view
        else:
            logits = torch.cat([(torch.randn(2, v, generator=g) * 3).to(torch.bfloat16), _special_rows(v, g)])
        shape = logits.shape[:-1]
        m = math.prod(shape)
        ids = torch.randint(0, v, (m,), generator=g)
        live = torch.ones(m, dtype=torch.bool)
        if masked:
            live = torch.rand(m, generator=g) > 0.3
            live[:2] = True
            ids[~live] = v + 7  # masked rows' ids are never used
        ref_logits = (logits.float() + torch.randn(logits.shape, generator=g) * 0.5).to(torch.bfloat16)
        old = torch.randn(m, generator=g) * 0.1 - 6.0
        args = (
            logits, ids, old, live if masked else None, ref_logits if ref_kind == "logits" else None,
            old + 0.1 if ref_kind == "logprobs" else None, temperature, 3, entropy, tile, True,
        )  # fmt: skip
        want = pl._forward(*args, pl.FwdLaunch())
        ref = pl.logprobs_reference(logits, torch.where(live, ids, 0).view(shape), temperature, tile=tile)
        assert _same_bits(want[0][live], ref.reshape(m)[live])
        cases.append((args, want, live, ref_kind == "logits"))
    for cfg, names in programs.values():
        for args, want, live, ref_logits in cases:
            got = pl._forward(*args, cfg)
            for name, a, b in zip(("logp", "ratio", "kl", "ent", "lse", "ref_lp"), got, want, strict=True):
                if name == "ref_lp":  # written for unmasked rows, with reference logits only
                    if not ref_logits:
                        continue
                    a, b = a[live], b[live]
                assert _same_bits(a, b), (cfg.name, name, args[0].shape, args[6])
        print(f"{cfg.name} bitwise (the program of {', '.join(names)})", flush=True)
    # the first program through fused_policy_loss (FWD_LAUNCH) with the gradient, also at V < TILE (the
    # stream kernel falls back to one row per program) and with fp32 logits (pairs do not apply)
    saved = dict(pl.FWD_LAUNCH)
    cfg = next(iter(programs.values()))[0]
    pl.FWD_LAUNCH.update(small=cfg, large=cfg)
    try:
        print(cfg.name, _check_case(pl, 33, (2, 5), 2050, torch.bfloat16, 1.0, "logits", True, True, "k1"))
        print(cfg.name, _check_case(pl, 31, (2, 3), 300, torch.bfloat16, 1.0, "logits", True, True, "k3"))
        print(cfg.name, _check_case(pl, 32, (5,), 2051, torch.float32, 0.7, "logprobs", True, False, "k2"))
    finally:
        pl.FWD_LAUNCH.update(saved)


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
    _new_launch_checks(pl)
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
    _ppo_checks(pl)
    print("interpreter checks passed")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the pytest test above"
    _checks()
