"""Fused policy ratio + KL from logits vs plain PyTorch vs Liger-Kernel's Triton GRPO loss (one process).

    python benchmarks/bench_policy_loss.py [--sweep] [--n 8192] [--vocab 32768 151936 262144] [--out DIR]

Per vocabulary size, with bf16 logits [N, V] (temperature 1, k3 KL against reference logprobs):

* ``ours``: the Triton forward / backward kernels alone (``_forward`` / ``_backward``);
* ``ours+ref-logits``: the forward reading reference logits too (twice the bytes);
* ``ours ppo_loss``: ``parity.ppo_loss.ppo_loss`` end to end through autograd (adds O(N) PyTorch ops);
* ``torch``: ``log_softmax(x.float()).gather`` + ratio + k3, autograd backward;
* ``liger``: ``liger_kernel.ops.grpo_loss.GrpoLossFunction`` (token-level GRPO, beta=0.04), logits
  ``[1, N+1, V]`` as it requires;
* ``copy``: a device-to-device copy of the logits' bytes (the bandwidth ceiling: bytes read + written);
* at V = 151936 also ``T=0.7``, ``+entropy`` and ``T=0.7+entropy`` (with an entropy bonus in the loss)
  for ours and for plain PyTorch (what RL trainers compute: the division and the entropy add passes).

``--sweep`` first times forward launch configurations (contract tile, warps, unroll; each checked
bitwise against the plain-PyTorch contract) and backward blocks, and uses the fastest for the table.
Measured on an H100 (2 runs of 2026-11): tile 2048 / 4 warps / unroll 1, backward block 16384 /
16 warps -- the defaults of parity/ops/policy_loss.py.

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
import traceback
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.ops import policy_loss as pl  # noqa: E402
from parity.ppo_loss import ppo_loss  # noqa: E402


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


def make_inputs(n, v, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(n, v, generator=g, device="cuda") * 2).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), generator=g, device="cuda")
    lp = pl._forward(x, ids, None, None, None, None, 1.0, 0, False, pl.CONTRACT_TILE, True)[0]
    old = lp + torch.randn(n, generator=g, device="cuda") * 0.05
    ref_lp = lp + torch.randn(n, generator=g, device="cuda") * 0.1
    adv = torch.randn(n, generator=g, device="cuda")
    return x, ids, lp, old, ref_lp, adv


def check_bits(x, ids, tile, fma, rows=64):
    got = pl._forward(x[:rows], ids[:rows], None, None, None, None, 1.0, 0, False, tile, fma)[0]
    want = pl.logprobs_reference(x[:rows], ids[:rows], 1.0, tile=tile, fma=fma)
    return bool(torch.equal(got, want))


def sweep(n, v, copy_bw, results):
    """Forward/backward launch configurations (none changes the forward's bits; TILE is the contract's)."""
    x, ids, lp, old, ref_lp, adv = make_inputs(n, v, seed=1)
    nbytes = x.numel() * x.element_size()
    print(f"\n# sweep N={n} V={v}: forward (TILE, FMA, UNROLL, warps) and backward (BLOCK, warps)")
    best = None
    for tile, fma, unroll, nw in [
        (4096, True, 1, 4), (4096, True, 2, 4), (4096, True, 2, 8), (4096, True, 1, 2),
        (2048, True, 1, 4), (2048, True, 2, 4), (2048, True, 1, 2), (2048, True, 2, 2), (2048, True, 1, 1),
        (1024, True, 1, 1), (1024, True, 1, 2), (4096, False, 1, 4),
    ]:  # fmt: skip
        pl.FWD_UNROLL, pl.FWD_NUM_WARPS = unroll, nw
        t = ms(
            lambda tile=tile, fma=fma: pl._forward(x, ids, old, None, None, ref_lp, 1.0, 3, False, tile, fma)
        )
        ok = check_bits(x, ids, tile, fma)
        tbs = nbytes / t / 1e9
        print(f"fwd tile={tile} fma={int(fma)} unroll={unroll} warps={nw:2d}: {t:.3f} ms {tbs:.2f} TB/s "
              f"({tbs / copy_bw:.2f}x copy) bitwise={ok}")  # fmt: skip
        results["sweep_fwd"].append(dict(tile=tile, fma=fma, unroll=unroll, warps=nw, ms=t, bitwise=ok))
        if fma == pl.CONTRACT_FMA and ok and (best is None or t < best[0]):
            best = (t, unroll, nw, tile)
    pl.FWD_UNROLL, pl.FWD_NUM_WARPS, pl.CONTRACT_TILE = best[1], best[2], best[3]
    logp, ratio, kl, ent, lse, _r = pl._forward(
        x, ids, old, None, None, ref_lp, 1.0, 3, False, pl.CONTRACT_TILE, True
    )
    g = torch.randn(n, device="cuda")
    bbest = None
    for block, nw in [(4096, 8), (8192, 8), (8192, 16), (16384, 16)]:
        pl.BWD_BLOCK, pl.BWD_NUM_WARPS = block, nw
        t = ms(
            lambda: pl._backward(
                x, ids, None, lse, logp, ratio, ref_lp, ent, None, g, g, None, 1.0, 3, False, True
            )
        )
        tbs = 2 * nbytes / t / 1e9
        print(f"bwd block={block:5d} warps={nw:2d}: {t:.3f} ms {tbs:.2f} TB/s ({tbs / copy_bw:.2f}x copy)")
        results["sweep_bwd"].append(dict(block=block, warps=nw, ms=t))
        if bbest is None or t < bbest[0]:
            bbest = (t, block, nw)
    pl.BWD_BLOCK, pl.BWD_NUM_WARPS = bbest[1], bbest[2]
    print(
        f"chosen: forward tile={best[3]} unroll={best[1]} warps={best[2]}; "
        f"backward block={bbest[1]} warps={bbest[2]}"
    )
    results["chosen"] = dict(
        tile=best[3], fwd_unroll=best[1], fwd_warps=best[2], bwd_block=bbest[1], bwd_warps=bbest[2]
    )


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

    def ours_step():
        xg = x.detach().requires_grad_(True)
        out = pl.fused_policy_loss(xg, ids, old, ref_logprobs=ref_lp, validate_ids=False)
        (out.ratio * adv + out.kl).sum().backward()
        return xg.grad

    res["ours"] = dict(fwd=tf, bwd=tb, peak=peak_gb(ours_step), fwd_bytes=nbytes, bitwise=bits)

    def ppo_step():
        xg = x.detach().requires_grad_(True)
        out = ppo_loss(xg, ids, old, adv, ref_logprobs=ref_lp, kl_coef=0.04, clip_low=0.2, clip_high=0.28)
        out.loss.backward()
        return xg.grad

    res["ours ppo_loss"] = dict(fwdbwd=ms(ppo_step), peak=peak_gb(ppo_step))

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
    print(
        f"V={v}: ours fwd {tf:.3f} ms bwd {tb:.3f} ms ({t_ref / (tf + tb):.1f}x torch) bitwise={bits}",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936, 262144])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
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
            sweep(args.n, 151936, copy_bw, results)
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
    print(f"contract tile {pl.CONTRACT_TILE}, forward warps {pl.FWD_NUM_WARPS} unroll {pl.FWD_UNROLL}")
    print("| V | op | fwd ms | bwd ms | fwd+bwd ms | fwd x copy | bwd x copy | vs torch | peak scratch GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    torch_t = {(r["V"], r.get("group")): r["fwdbwd"] for r in results["rows"] if r["op"].startswith("torch")}

    def f(val, fmt):
        return format(val, fmt) if isinstance(val, (int, float)) else "-"

    for r in results["rows"]:
        base = torch_t.get((r["V"], r.get("group")))
        speed = base / r["fwdbwd"] if r.get("fwdbwd") and base else None
        cells = [r["V"], r["op"], f(r.get("fwd"), ".3f"), f(r.get("bwd"), ".3f"), f(r.get("fwdbwd"), ".3f")]
        cells += [
            f(r.get("fwd_x_copy"), ".2f"),
            f(r.get("bwd_x_copy"), ".2f"),
            f(speed, ".1f"),
            f(r.get("peak"), ".2f"),
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_policy_loss.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
