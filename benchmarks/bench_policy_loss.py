"""Fused policy ratio + KL from logits vs plain PyTorch vs Liger-Kernel's Triton GRPO loss (one process).

    python benchmarks/bench_policy_loss.py [--sweep [--only NAME ...] | --profile] [--n 8192]
        [--vocab 32768 151936 262144] [--out DIR]

Per vocabulary size, with bf16 logits [N, V] (temperature 1, k3 KL against reference logprobs):

* ``ours``: the Triton forward / backward kernels alone (``_forward`` / ``_backward``);
* ``ours+ref-logits``: the forward reading reference logits too (twice the bytes);
* ``ours autograd``: ``fused_policy_loss`` through autograd (ids unchecked) with a two-op loss;
* ``ours ppo_loss``: ``parity.ppo_loss.ppo_loss`` end to end through autograd (adds O(N) PyTorch ops and
  the ids check's host sync); ``ours ppo_loss unchecked ids``: the same with ``validate_ids=False``;
* ``torch``: ``log_softmax(x.float()).gather`` + ratio + k3, autograd backward;
* ``liger``: ``liger_kernel.ops.grpo_loss.GrpoLossFunction`` (token-level GRPO, beta=0.04), logits
  ``[1, N+1, V]`` as it requires;
* ``copy``: a device-to-device copy of the logits' bytes (the bandwidth ceiling: bytes read + written);
* at V = 151936 also ``T=0.7``, ``+entropy`` and ``T=0.7+entropy`` (with an entropy bonus in the loss)
  for ours and for plain PyTorch (what RL trainers compute: the division and the entropy add passes).

``--sweep`` first times, at every ``--vocab``, the forward launch configurations of
``policy_loss.FWD_CANDIDATES`` (warps, unroll, pipelined tile loop, rows per program, streamed rows on a
persistent grid ``g<programs per SM>``, bf16 word pairs ``p``, packed bf16x2 max/min ``h``; the contract
tile is fixed) and the backward's ``BWD_CANDIDATES``; ``--only`` restricts both to the named ones (e.g.
only forward names: no backward sweep, BWD_LAUNCH is printed unchanged). Each forward configuration's five
per-token outputs are compared bit for bit with the original launch's (one row per program, 4 warps),
whose logprobs are compared with the plain-PyTorch contract on all N rows. Per vocabulary class
(``policy_loss.v_class``) it picks the bitwise configuration with the best worst-case fraction of the
copy, uses it for the table, and prints ``FWD_LAUNCH`` / ``BWD_LAUNCH`` lines to paste into
parity/ops/policy_loss.py.
Before: 4 warps / unroll 1 / one row per program everywhere (swept at V = 151936 only): forward 0.85 of
the copy at V = 32768, 0.90 at 151936, 0.94 at 262144; backward block 16384 / 16 warps, 0.95.

The summary's ``bound@copy`` column is the physical limit of "x plain PyTorch": plain PyTorch's
measured fwd+bwd time over the time of 3*N*V*2 bytes at the copy's bandwidth (a fused forward reads
N*V*2 bytes, a fused backward reads and writes N*V*2 bytes each).

``--out DIR`` (default ``$OUT`` or .) gets ``bench_policy_loss.json`` and ``bench_policy_loss.txt``.

``--profile`` runs instead only ``torch.profiler`` over ``--profile-iters`` iterations of each step of
:func:`step_fns` (the kernels alone, ``fused_policy_loss`` through autograd, ``ppo_loss`` end to end
with and without its ids check) at ``--n`` and the first ``--vocab``: per step the top device
kernels/ops (``key_averages``), wall vs device-busy time, kernels, launches and host syncs per
iteration; ``bench_policy_loss_profile.txt`` and one Chrome trace per step in ``--out``::

    python benchmarks/bench_policy_loss.py --profile --n 8192 --vocab 32768 --out DIR

Times are medians of ``triton.testing.do_bench``; "x copy" is achieved bytes/s over the copy's
(forward: N*V*2 bytes read; backward: read + write). Peak scratch is the rise of
``torch.cuda.max_memory_allocated`` over the inputs during one forward + backward (including the
N*V dlogits the backward must return).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.ops import policy_loss as pl  # noqa: E402
from parity.ppo_loss import ppo_loss  # noqa: E402


class Tee:
    """stdout that also goes to a file (the --out directory's text copy of the run)."""

    def __init__(self, stream, path):
        self.stream, self.file = stream, open(path, "w")  # noqa: SIM115 (open for the whole run)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        self.file.flush()  # what a killed run printed is kept

    def flush(self):
        self.stream.flush()
        self.file.flush()


def ms(fn, rep=80):
    return do_bench(fn, warmup=20, rep=rep, return_mode="median")


def peak_gb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 1e9


def load_liger():
    try:
        from liger_kernel.ops.grpo_loss import GrpoLossFunction

        return GrpoLossFunction
    except Exception as exc:  # the package __init__ pulls optional backends: load the one file
        for root in sys.path:
            f = Path(root) / "liger_kernel" / "ops" / "grpo_loss.py"
            if f.exists():
                spec = importlib.util.spec_from_file_location("liger_grpo_loss", f)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                return mod.GrpoLossFunction
        print(f"liger-kernel not importable ({exc!r}): skipped")
        return None


def make_inputs(n, v, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(n, v, generator=g, device=device) * 2).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), generator=g, device=device)
    lp = pl._forward(x, ids, None, None, None, None, 1.0, 0, False, pl.CONTRACT_TILE, True)[0]
    old = lp + torch.randn(n, generator=g, device=device) * 0.05
    ref_lp = lp + torch.randn(n, generator=g, device=device) * 0.1
    adv = torch.randn(n, generator=g, device=device)
    return x, ids, lp, old, ref_lp, adv


def step_fns(x, ids, old, ref_lp, adv):
    """The forward + backward steps compared by the table and by ``--profile`` (k3 KL against reference
    logprobs, T = 1), from the kernels alone to ``ppo_loss`` end to end:

    * ``kernels``: ``_forward`` + ``_backward`` launched directly (no autograd, no checks);
    * ``ours_step``: ``fused_policy_loss`` (ids unchecked) + a two-op loss through autograd;
    * ``ppo_step``: ``ppo_loss`` (clipped surrogate, KL term, token-mean, metrics) + ``backward()``,
      as a trainer calls it (ids checked: one host sync);
    * ``ppo_step unchecked ids``: the same with ``validate_ids=False``.
    """
    n = ids.numel()
    g = torch.ones(n, device=x.device)

    def kernels():
        logp, ratio, _kl, ent, lse, _r = pl._forward(
            x, ids, old, None, None, ref_lp, 1.0, 3, False, pl.CONTRACT_TILE, True
        )
        return pl._backward(
            x, ids, None, lse, logp, ratio, ref_lp, ent, None, g, g, None, 1.0, 3, False, True
        )

    def ours_step():
        xg = x.detach().requires_grad_(True)
        out = pl.fused_policy_loss(xg, ids, old, ref_logprobs=ref_lp, validate_ids=False)
        (out.ratio * adv + out.kl).sum().backward()
        return xg.grad

    def ppo(validate_ids):
        def step():
            xg = x.detach().requires_grad_(True)
            out = ppo_loss(
                xg, ids, old, adv, ref_logprobs=ref_lp, kl_coef=0.04, clip_low=0.2, clip_high=0.28,
                validate_ids=validate_ids,
            )  # fmt: skip
            out.loss.backward()
            return xg.grad

        return step

    return {
        "kernels": kernels,
        "ours_step": ours_step,
        "ppo_step": ppo(True),
        "ppo_step unchecked ids": ppo(False),
    }


def check_bits(x, ids, tile, fma, rows=None, launch=None):
    """The forward's logprobs (``rows`` first rows, default all) == the plain-PyTorch contract, bitwise."""
    rows = rows or x.shape[0]
    got = pl._forward(x[:rows], ids[:rows], None, None, None, None, 1.0, 0, False, tile, fma, launch)[0]
    want = pl.logprobs_reference(x[:rows], ids[:rows], 1.0, tile=tile, fma=fma)
    return bool(torch.equal(got, want))


def compiled(kernel) -> dict:
    out = {}
    for cache in getattr(kernel, "device_caches", {}).values():
        out.update({id(k): k for k in cache[0].values()})
    return out


def regs_of(kernel, before) -> str:
    new = [k for key, k in compiled(kernel).items() if key not in before]
    if not new:
        return "-"
    k = new[0]
    return f"{getattr(k, 'n_regs', '?')}/{getattr(k, 'n_spills', '?')}/{getattr(k.metadata, 'shared', '?')}"


def same(a, b) -> bool:
    return all(
        (x is None and y is None)
        or (x is not None and y is not None and torch.equal(x.view(torch.int32), y.view(torch.int32)))
        for x, y in zip(a, b, strict=True)
    )


def sweep_vocab(n, v, copy_bw, results, fwd_cands, bwd_cands):
    """Forward and backward launch configurations at one V (none changes a forward bit: each one's five
    outputs are compared with the original launch's, whose logprobs are compared with the contract)."""
    x, ids, lp, old, ref_lp, adv = make_inputs(n, v, seed=1)
    nbytes = x.numel() * x.element_size()
    tile = pl.CONTRACT_TILE
    print(
        f"\n# sweep N={n} V={v} ({pl.v_class(v)}): forward (warps, unroll, stages, rows per program)",
        flush=True,
    )
    base = pl._forward(x, ids, old, None, None, ref_lp, 1.0, 3, False, tile, True, pl.FwdLaunch())
    contract_ok = check_bits(x, ids, tile, True, launch=pl.FwdLaunch())
    print(f"original launch w4u1s1r1: logprobs bitwise the contract on all {n} rows: {contract_ok}")
    fwd = {}
    for cfg in fwd_cands:
        try:
            kernel = pl._policy_fwd_stream_kernel if cfg.stream else pl._policy_fwd_kernel
            before = compiled(kernel)
            out = pl._forward(x, ids, old, None, None, ref_lp, 1.0, 3, False, tile, True, cfg)
            torch.cuda.synchronize()
            info = regs_of(kernel, before)  # "-": compiled by an earlier candidate (same constexprs)
            ok = contract_ok and same(out[:5], base[:5])
            t = ms(
                lambda cfg=cfg: pl._forward(x, ids, old, None, None, ref_lp, 1.0, 3, False, tile, True, cfg)
            )
        except Exception as exc:  # report and go on
            print(f"fwd {cfg.name}: failed {exc!r}"[:300])
            continue
        tbs = nbytes / t / 1e9
        fwd[cfg.name] = dict(ms=t, x_copy=tbs / copy_bw, bitwise=ok)
        print(f"fwd {cfg.name:>13} regs/spills/smem {info:>12}: {t:.3f} ms {tbs:.2f} TB/s "
              f"({tbs / copy_bw:.3f}x copy) bitwise={ok}", flush=True)  # fmt: skip
        results["sweep_fwd"].append(
            dict(V=v, launch=cfg.name, regs=info, ms=t, x_copy=tbs / copy_bw, bitwise=ok)
        )
    logp, ratio, kl, ent, lse, _r = base
    g = torch.randn(n, device="cuda")
    bwd = {}
    dx0 = None
    for cfg in bwd_cands:

        def run(cfg=cfg):
            return pl._backward(
                x, ids, None, lse, logp, ratio, ref_lp, ent, None, g, g, None, 1.0, 3, False, True, cfg
            )

        try:
            dx = run()
            if dx0 is None:
                dx0 = dx
            ok = bool(torch.equal(dx.view(torch.int16), dx0.view(torch.int16)))
            del dx
            t = ms(run)
        except Exception as exc:
            print(f"bwd {cfg.name}: failed {exc!r}"[:300])
            continue
        tbs = 2 * nbytes / t / 1e9
        bwd[cfg.name] = dict(ms=t, x_copy=tbs / copy_bw, same_as_first=ok)
        print(f"bwd {cfg.name:>10}: {t:.3f} ms {tbs:.2f} TB/s ({tbs / copy_bw:.3f}x copy) same dlogits={ok}")
        results["sweep_bwd"].append(dict(V=v, launch=cfg.name, ms=t, x_copy=tbs / copy_bw, same=ok))
    return fwd, bwd


def choose(per_v: dict, cls_of, candidates, key_ok: str):
    """Per class, the configuration with the best worst-case fraction of the copy over the class's V."""
    chosen = {}
    by_name = {c.name: c for c in candidates}
    for cls in ("small", "large"):
        vs = [v for v in per_v if cls_of(v) == cls]
        if not vs:
            continue
        names = [c for c in by_name if all(c in per_v[v] and per_v[v][c].get(key_ok, True) for v in vs)]
        if names:
            best = max(names, key=lambda c: min(per_v[v][c]["x_copy"] for v in vs))
            chosen[cls] = by_name[best]
            worst = min(per_v[v][best]["x_copy"] for v in vs)
            print(f"{cls} (V in {vs}): {best}, worst-case {worst:.3f}x copy")
    return chosen


def sweep(n, vocabs, copy_bw, results, only=None):
    """``only``: candidate names (forward and backward) to sweep instead of all of them."""
    fwd_cands = [c for c in pl.FWD_CANDIDATES if only is None or c.name in only]
    bwd_cands = [c for c in pl.BWD_CANDIDATES if only is None or c.name in only]
    fwd_all, bwd_all = {}, {}
    for v in vocabs:
        try:
            fwd_all[v], bwd_all[v] = sweep_vocab(n, v, copy_bw, results, fwd_cands, bwd_cands)
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache()
    print("\n# sweep: forward choice per vocabulary class (bitwise configurations only)")
    fwd_choice = choose(fwd_all, pl.v_class, fwd_cands, "bitwise")
    print("# sweep: backward choice per vocabulary class")
    bwd_choice = choose(bwd_all, pl.v_class, bwd_cands, "same_as_first")
    pl.FWD_LAUNCH.update(fwd_choice)
    pl.BWD_LAUNCH.update(bwd_choice)
    print("suggested (parity/ops/policy_loss.py):")
    print("FWD_LAUNCH = {" + ", ".join(f'"{k}": {c!r}' for k, c in pl.FWD_LAUNCH.items()) + "}")
    print("BWD_LAUNCH = {" + ", ".join(f'"{k}": {c!r}' for k, c in pl.BWD_LAUNCH.items()) + "}")
    results["chosen"] = {
        "fwd": {k: c.name for k, c in pl.FWD_LAUNCH.items()},
        "bwd": {k: c.name for k, c in pl.BWD_LAUNCH.items()},
    }


def bench_liger(liger_fn, x, ids, old, ref_lp, adv, n, v, nbytes):
    xl = torch.empty(1, n + 1, v, dtype=x.dtype, device="cuda")
    xl[0, :n] = x
    xl[0, n] = 0
    lo, lr, li, la = old[None], ref_lp[None], ids[None], adv[:1]
    lm = torch.ones(1, n, dtype=torch.int32, device="cuda")

    def liger(xx):
        return liger_fn.apply(
            xx, lo, lr, li, la, lm, 1.0, 0.04, 0.2, 0.28, False, "grpo", None, True, "token"
        )

    with torch.no_grad():
        tfl = ms(lambda: liger(xl))
    xlg = xl.detach().requires_grad_(True)
    lloss = liger(xlg)[0]
    tbl = ms(lambda: torch.autograd.grad(lloss, xlg, retain_graph=True))
    lloss = None  # frees the graph (a `del` would orphan the lambda's name)

    def liger_step():
        xx = xl.detach().requires_grad_(True)
        liger(xx)[0].backward()
        return xx.grad

    out = dict(fwd=tfl, bwd=tbl, peak=peak_gb(liger_step), fwd_bytes=nbytes)
    return out


def typical_trainer(x, ids, old, ref_lp, adv, g, nbytes, temperature=0.7, ent_coef=0.01):
    """T != 1 and an entropy bonus (what RL trainers compute): ours vs the same in plain PyTorch."""
    tile = pl.CONTRACT_TILE

    def fwd():
        return pl._forward(x, ids, old, None, None, ref_lp, temperature, 3, True, tile, True)

    logp, ratio, kl, ent, lse, _r = fwd()
    ge = torch.full_like(g, -ent_coef)

    def bwd():
        return pl._backward(
            x, ids, None, lse, logp, ratio, ref_lp, ent, None, g, g, ge, temperature, 3, False, True
        )

    out = {"ours T=0.7+entropy": dict(fwd=ms(fwd), bwd=ms(bwd), fwd_bytes=nbytes, group="T=0.7+entropy")}

    def graph(xx):
        lsm = torch.log_softmax(xx.float() / temperature, -1)
        lpt = lsm.gather(-1, ids[:, None])[:, 0]
        h = -(lsm.exp() * lsm).sum(-1)
        d = ref_lp - lpt
        return (torch.exp(lpt - old) * adv + (torch.exp(d) - d - 1) - ent_coef * h).sum()

    def tfwd():
        with torch.no_grad():
            return graph(x)

    xg = x.detach().requires_grad_(True)
    loss = graph(xg)
    tb = ms(lambda: torch.autograd.grad(loss, xg, retain_graph=True), rep=200)
    xg = loss = None

    def step():
        xx = x.detach().requires_grad_(True)
        graph(xx).backward()
        return xx.grad

    out["torch T=0.7+entropy"] = dict(
        fwd=ms(tfwd, rep=200), bwd=tb, peak=peak_gb(step), fwd_bytes=nbytes, group="T=0.7+entropy"
    )
    return out


def run_vocab(n, v, liger_fn, copy_bw, rows, results):
    x, ids, lp, old, ref_lp, adv = make_inputs(n, v)
    nbytes = x.numel() * x.element_size()
    res = {}

    # ours: kernels alone
    def fwd(temperature=1.0, entropy=False, ref_logits=None):
        lp = ref_lp if ref_logits is None else None
        return pl._forward(x, ids, old, None, ref_logits, lp, temperature, 3, entropy, pl.CONTRACT_TILE, True)

    logp, ratio, kl, ent, lse, _r = fwd()
    g = torch.randn(n, device="cuda")

    def bwd(temperature=1.0):
        return pl._backward(
            x, ids, None, lse, logp, ratio, ref_lp, ent, None, g, g, None, temperature, 3, False, True
        )

    tf, tb = ms(fwd), ms(bwd)
    bits = check_bits(x, ids, pl.CONTRACT_TILE, True)

    steps = step_fns(x, ids, old, ref_lp, adv)
    ours_step, ppo_step = steps["ours_step"], steps["ppo_step"]
    res["ours"] = dict(fwd=tf, bwd=tb, peak=peak_gb(ours_step), fwd_bytes=nbytes, bitwise=bits, nbytes=nbytes)
    # through autograd: the op alone, then ppo_loss end to end (its ids check: one host sync per call)
    res["ours autograd"] = dict(fwdbwd=ms(ours_step))
    res["ours ppo_loss"] = dict(fwdbwd=ms(ppo_step), peak=peak_gb(ppo_step))
    res["ours ppo_loss unchecked ids"] = dict(fwdbwd=ms(steps["ppo_step unchecked ids"]))

    # ours with reference logits (reads 2 N V in the forward)
    rx = (x.float() + torch.randn_like(x, dtype=torch.float32) * 0.1).to(torch.bfloat16)
    res["ours+ref-logits"] = dict(fwd=ms(lambda: fwd(ref_logits=rx)), fwd_bytes=2 * nbytes)
    rx = None
    if v == 151936:
        t07 = dict(fwd=ms(lambda: fwd(0.7)), bwd=ms(lambda: bwd(0.7)), fwd_bytes=nbytes, group="T=0.7")
        res["ours T=0.7"] = t07
        res["ours +entropy"] = dict(fwd=ms(lambda: fwd(entropy=True)), fwd_bytes=nbytes, group="H")
        try:
            res.update(typical_trainer(x, ids, old, ref_lp, adv, g, nbytes))
        except Exception:
            traceback.print_exc()

    # plain PyTorch
    def torch_fwd():
        with torch.no_grad():
            lpt = torch.log_softmax(x.float(), -1).gather(-1, ids[:, None])[:, 0]
            r = torch.exp(lpt - old)
            d = ref_lp - lpt
            return r, torch.exp(d) - d - 1

    def torch_graph():
        xg = x.detach().requires_grad_(True)
        lpt = torch.log_softmax(xg.float(), -1).gather(-1, ids[:, None])[:, 0]
        d = ref_lp - lpt
        loss = (torch.exp(lpt - old) * adv + (torch.exp(d) - d - 1)).sum()
        return xg, loss

    def torch_step():
        xg, loss = torch_graph()
        loss.backward()
        return xg.grad

    xg, loss = torch_graph()
    tbt = ms(lambda: torch.autograd.grad(loss, xg, retain_graph=True), rep=200)
    xg = loss = None
    res["torch"] = dict(fwd=ms(torch_fwd, rep=200), bwd=tbt, peak=peak_gb(torch_step), fwd_bytes=nbytes)

    # Liger-Kernel GRPO loss (token level, reduce=True)
    if liger_fn is not None:
        try:
            res["liger"] = bench_liger(liger_fn, x, ids, old, ref_lp, adv, n, v, nbytes)
        except Exception:  # report and go on: the other rows still count
            traceback.print_exc()
    for name, r in res.items():
        fwdbwd = r.get("fwdbwd", r.get("fwd", 0) + r.get("bwd", 0) if "bwd" in r else None)
        r["fwdbwd"] = fwdbwd
        row = dict(V=v, op=name, **r)
        if "fwd" in r:
            row["fwd_x_copy"] = r["fwd_bytes"] / r["fwd"] / 1e9 / copy_bw
        if "bwd" in r:
            row["bwd_x_copy"] = 2 * nbytes / r["bwd"] / 1e9 / copy_bw
        rows.append(row)
    t_ref = res["torch"]["fwd"] + res["torch"]["bwd"]
    fl, bl = pl.FWD_LAUNCH[pl.v_class(v)].name, pl.BWD_LAUNCH[pl.v_class(v)].name
    print(
        f"V={v}: ours fwd {tf:.3f} ms ({nbytes / tf / 1e9 / copy_bw:.3f}x copy, {fl}) "
        f"bwd {tb:.3f} ms ({2 * nbytes / tb / 1e9 / copy_bw:.3f}x copy, {bl}) "
        f"({t_ref / (tf + tb):.1f}x torch) bitwise={bits}",
        flush=True,
    )


_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
_SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize")  # a step's own; not the final device sync


def profile_steps(n, v, iters, out_dir, device="cuda", rows=20):
    """``--profile``: torch.profiler over ``iters`` iterations of each of :func:`step_fns`'s steps at one
    size. Per step: the device-time table of its kernels and ops (``key_averages``, ``rows`` rows), a
    Chrome trace (``trace_<step>.json`` in ``out_dir``) and one summary line: wall time per iteration
    back to back, do_bench's median (what the table reports), host time inside the step, device busy
    time, kernels / copies, kernel launches and host syncs per iteration. ``ppo_step`` also gets its host
    table (self CPU time). Device busy far below the wall time means the host (launches, syncs) sets it.
    ``device="cpu"`` (under ``TRITON_INTERPRET=1``) only checks that this code runs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    x, ids, _lp, old, ref_lp, adv = make_inputs(n, v, device=device)
    steps = step_fns(x, ids, old, ref_lp, adv)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    summary = []
    for name, fn in steps.items():
        for _ in range(3):  # compile, warm the caching allocator
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        wall = (time.perf_counter() - t0) / iters * 1e3
        median = ms(fn) if cuda else float("nan")
        with torch_profile(activities=activities) as prof:
            for _ in range(iters):
                with record_function(name):
                    fn()
            sync()
        events = prof.events()
        dev = [  # kernels, copies, memsets (not the GPU-side ranges of record_function)
            e for e in events
            if e.device_type == DeviceType.CUDA and e.name != name and not getattr(e, "is_user_annotation", 0)
        ]  # fmt: skip
        busy = sum(e.time_range.elapsed_us() for e in dev) / iters / 1e3
        host = [
            e.time_range.elapsed_us() for e in events if e.name == name and e.device_type == DeviceType.CPU
        ]
        host_ms = sum(host) / max(len(host), 1) / 1e3
        launches = sum(e.name in _LAUNCHES for e in events) / iters
        syncs = sum(e.name in _SYNCS for e in events) / iters
        line = (
            f"{name}: wall {wall:.3f} ms/iter back to back, do_bench median {median:.3f} ms, "
            f"host {host_ms:.3f} ms in the step, device busy {busy:.3f} ms in {len(dev) / iters:.0f} "
            f"kernels/copies, {launches:.0f} launches, {syncs:.0f} host syncs per iteration"
        )
        summary.append(line)
        print(f"\n## {line}\n{prof.key_averages().table(sort_by=sort_by, row_limit=rows)}", flush=True)
        if name == "ppo_step" and cuda:
            host_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            print(f"### {name}: host side\n{host_table}")
        prof.export_chrome_trace(str(Path(out_dir) / f"trace_{name.replace(' ', '_')}.json"))
    print(f"\n## profile summary (N={n}, V={v}, bf16, {iters} iterations per step)")
    for line in summary:
        print(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936, 262144])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument(
        "--only", nargs="+", metavar="NAME",
        help="--sweep only these FWD_CANDIDATES / BWD_CANDIDATES names (e.g. w1u1s3r1ph b32768w32)",
    )  # fmt: skip
    ap.add_argument(
        "--profile", action="store_true",
        help="only torch.profiler over a few iterations of each step (kernels, ours_step, ppo_step) at --n "
        "and the first --vocab: top device kernels/ops per step, traces in --out",
    )  # fmt: skip
    ap.add_argument("--profile-iters", type=int, default=5)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: --profile smoke test "
                    "under TRITON_INTERPRET=1 (tiny sizes)")  # fmt: skip
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.only:
        known = {c.name for c in (*pl.FWD_CANDIDATES, *pl.BWD_CANDIDATES)}
        unknown = sorted(set(args.only) - known)
        if unknown:
            ap.error(f"--only: not in FWD_CANDIDATES / BWD_CANDIDATES: {unknown}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.profile:
        if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--device cpu needs TRITON_INTERPRET=1")
        sys.stdout = Tee(sys.stdout, Path(args.out) / "bench_policy_loss_profile.txt")
        if args.device == "cuda":
            props = torch.cuda.get_device_properties(0)
            print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}")
        profile_steps(args.n, args.vocab[0], args.profile_iters, args.out, args.device)
        return
    if args.device != "cuda":
        ap.error("the benchmark runs on cuda (--device cpu is for --profile)")
    sys.stdout = Tee(sys.stdout, Path(args.out) / "bench_policy_loss.txt")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}")
    results = {"device": props.name, "sweep_fwd": [], "sweep_bwd": [], "rows": []}

    nbytes = args.n * 151936 * 2
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t_copy = ms(lambda: dst.copy_(src))
    copy_bw = 2 * nbytes / t_copy / 1e9
    results["copy"] = dict(bytes=nbytes, ms=t_copy, tbs=copy_bw)
    print(f"copy {nbytes / 1e9:.2f} GB: {t_copy:.3f} ms = {copy_bw:.2f} TB/s (read + write)")
    src = dst = None

    if args.sweep:
        try:
            sweep(args.n, args.vocab, copy_bw, results, set(args.only) if args.only else None)
        except Exception:
            traceback.print_exc()
    liger_fn = load_liger()
    for v in args.vocab:
        try:
            run_vocab(args.n, v, liger_fn, copy_bw, results["rows"], results)
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache()

    print(f"\n## N={args.n}, bf16, T=1, k3 vs reference logprobs; copy {copy_bw:.2f} TB/s; {props.name}")
    launches = ", ".join(
        f"V {'<=' if cls == 'small' else '>'} {pl.SMALL_V_MAX}: "
        f"fwd {pl.FWD_LAUNCH[cls].name} bwd {pl.BWD_LAUNCH[cls].name}"
        for cls in ("small", "large")
    )
    print(f"contract tile {pl.CONTRACT_TILE}; launch ({launches})")
    print(
        "| V | op | fwd ms | bwd ms | fwd+bwd ms | fwd x copy | bwd x copy | vs torch | bound@copy "
        "| peak scratch GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    torch_t = {(r["V"], r.get("group")): r["fwdbwd"] for r in results["rows"] if r["op"].startswith("torch")}
    # The physical bound of "x plain PyTorch": a fused forward (reads N V 2 bytes) and backward (reads and
    # writes N V 2 bytes) both at the copy's bandwidth take 3 N V 2 bytes / copy TB/s; plain PyTorch's
    # measured fwd+bwd over that time is the most any fused kernel pair could reach.
    ideal = {r["V"]: 3 * r["nbytes"] / (copy_bw * 1e9) for r in results["rows"] if "nbytes" in r}
    bound = {key: t / ideal[key[0]] for key, t in torch_t.items() if t and key[0] in ideal}
    results["bound_at_copy"] = {f"{v}/{grp or 'T=1'}": b for (v, grp), b in bound.items()}

    def f(val, fmt):
        return format(val, fmt) if isinstance(val, (int, float)) else "-"

    for r in results["rows"]:
        key = (r["V"], r.get("group"))
        base = torch_t.get(key)
        speed = base / r["fwdbwd"] if r.get("fwdbwd") and base else None
        cells = [r["V"], r["op"], f(r.get("fwd"), ".3f"), f(r.get("bwd"), ".3f"), f(r.get("fwdbwd"), ".3f")]
        cells += [
            f(r.get("fwd_x_copy"), ".2f"),
            f(r.get("bwd_x_copy"), ".2f"),
            f(speed, ".1f"),
            f(bound.get(key) if r.get("fwdbwd") else None, ".1f"),
            f(r.get("peak"), ".2f"),
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print("bound@copy: plain PyTorch's fwd+bwd over 3*N*V*2 bytes at the copy's bandwidth (fused forward")
    print("reads N*V*2 bytes, fused backward reads and writes N*V*2 each): the largest 'x torch' any fused")
    print("forward + backward can reach.")
    for r in results["rows"]:
        if r["op"] == "ours" and (r["V"], None) in bound:
            b = bound[(r["V"], None)]
            speed = torch_t[(r["V"], None)] / r["fwdbwd"]
            print(
                f"V={r['V']}: ours {speed:.1f}x plain PyTorch (fwd+bwd, T=1); "
                f"bound at copy bandwidth: {b:.1f}x (ours is {speed / b:.0%} of it)"
            )
    (Path(args.out) / "bench_policy_loss.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
