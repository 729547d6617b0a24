"""Benchmark (GPU): the contract's paged attention and batch-invariant matmul against SGLang / cuBLAS.

Prints three tables (times from ``triton.testing.do_bench``, median, ms):

1. decode: ``paged_attention_decode`` ("ours": CUDA-core contract) and ``paged_attention_mma``'s
   ("mma": tensor cores, GPU-only definition) over a paged KV cache vs torch SDPA's flash backend over
   contiguous KV (the issue's baseline, goal <= 1.15x its time) and SGLang 0.5.15's triton
   ``decode_attention_fwd`` (its default 8 KV splits, and its deterministic mode's 256-token split
   tiles) at context 1k/4k/16k/32k, batch 1/8/64, Qwen3-8B-like heads (32 query / 8 kv heads, head dim
   128, bf16); ratios (same process), and the fraction of device-to-device copy bandwidth reached on
   the KV bytes.
2. extend: ``paged_attention_extend`` (ours, mma) vs SGLang's ``extend_attention_fwd`` (prefill 1k
   and 4k from scratch, 512 new tokens after a 4k cached prefix; batch 1) and, from scratch, SDPA
   flash (causal).
3. matmul: ``batch_invariant_mm`` (its M dispatch) vs cuBLAS ``F.linear`` at M = 1 .. 8192 (goal >= 0.9x
   cuBLAS); the short form of ``benchmarks/bench_batch_invariant_matmul.py`` (its ``--sweep`` tunes it).

``--only profile`` (not in the default run): the mma decode's per-kernel device times (torch.profiler)
next to the whole call's time and SDPA flash, at the rows where it trails flash most.
``--only partials`` (not in the default run): the mma decode partials' launch options (chunks per
program, stages) and PDL on / off from CUDA graphs, on randomly permuted and on in-order KV slots.

``--sweep`` adds the mma kernels' launch options (the decode fold's ``pam.FOLD_CANDIDATES`` timed
from CUDA graphs, extend stages: they never change the bits) to pick defaults per GPU;
``--only decode|extend|matmul|profile|partials``.

    python benchmarks/bench_paged_attention.py [--json out.json] [--quick] [--sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch
import triton

from parity.ops import paged_attention as pa
from parity.ops import paged_attention_mma as pam

DEV = "cuda"
HQ, HKV, D = 32, 8, 128
PARTIALS_SHAPES = ((16384, 1), (32768, 1), (4096, 8), (16384, 8), (32768, 8), (4096, 64))  # (ctx, batch)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_ms(nbytes: int) -> float:
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEV)
    b = torch.empty_like(a)
    return bench(lambda: b.copy_(a)) / 2  # a copy reads and writes: the time to stream nbytes once


def make_pool(bsz, ctx, dtype=torch.bfloat16):
    total = bsz * ctx
    k = torch.randn(total, HKV, D, device=DEV).to(dtype)
    v = torch.randn(total, HKV, D, device=DEV).to(dtype)
    perm = torch.randperm(total, device=DEV).int()
    req_to_token = perm.view(bsz, ctx)
    return k, v, req_to_token


def decode_batch(bsz, ctx):
    """A decode batch of ``bsz`` requests at context ``ctx``: ``(q, k, v, req_to_token, seq_lens,
    pool rows)`` (the pool of :func:`make_pool`, bf16 queries [B, HQ, D])."""
    k, v, r2t = make_pool(bsz, ctx)
    q = torch.randn(bsz, HQ, D, device=DEV).to(torch.bfloat16)
    seq = torch.full((bsz,), ctx, dtype=torch.int64, device=DEV)
    return q, k, v, r2t, seq, torch.arange(bsz, device=DEV)


def mma_decode(q, k, v, slots, seq, pools, ctx):
    """The mma decode of a :func:`decode_batch` (output buffer and chunk bound given: no host sync), as
    a call taking launch options."""
    return partial(
        pam.paged_attention_decode, q, k, v, slots, pools, seq, D**-0.5, out=torch.empty_like(q),
        max_chunks=-(-ctx // pam.CONTRACT_CHUNK),
    )  # fmt: skip


def sglang_decode(q, k, v, req_to_token, seq_lens, splits, o):
    from sglang.srt.layers.attention.triton_ops.decode_attention import decode_attention_fwd

    bsz = q.shape[0]
    kv_indptr = torch.zeros(bsz + 1, dtype=torch.int32, device=DEV)
    kv_indptr[1:] = torch.cumsum(seq_lens, 0)
    kv_indices = req_to_token[:, : int(seq_lens[0])].reshape(-1).long()
    num_splits = torch.full((bsz,), splits, dtype=torch.int32, device=DEV)
    logits = torch.empty(bsz, HQ, splits, D, dtype=torch.float32, device=DEV)
    lse = torch.empty(bsz, HQ, splits, dtype=torch.float32, device=DEV)
    return lambda: decode_attention_fwd(
        q, k, v, o, kv_indptr, kv_indices, logits, lse, num_splits, splits, D**-0.5, 1.0, 1.0
    )


def graph_ms(fn) -> float:
    """``fn``'s time replayed from a CUDA graph: how SGLang runs decode, with no host launch cost (at
    small sizes ``bench(fn)`` times the Python launcher, not the kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def flash_ms(q, k, v, causal: bool, graphed: bool = False) -> tuple[float, float | None, str]:
    """torch SDPA restricted to its flash backend (the issue's baseline), contiguous q ``[B, HQ, Lq, D]``
    and k / v ``[B, HKV, Lk, D]``; GQA through ``enable_gqa`` (no K/V copy per query head). Returns the
    time, the CUDA-graph replay time (``graphed``) and what ran; should flash refuse GQA here, the K/V
    heads are expanded (4x the KV bytes) and the label says so."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            kind = "flash"

            def fn():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        except RuntimeError:
            k, v = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
            kind = "flash-kv-expanded"

            def fn():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return bench(fn), graph_ms(fn) if graphed else None, kind


def contiguous_kv(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``pool[slots]`` (``[B, L]`` slot ids) as SDPA's contiguous ``[B, HKV, L, D]``."""
    return pool[slots.long()].transpose(1, 2).contiguous()


def decode_table(quick: bool, sweep: bool = False):
    rows = []
    for ctx in (1024, 4096) if quick else (1024, 4096, 16384, 32768):
        for bsz in (1, 8) if quick else (1, 8, 64):
            q, k, v, r2t, seq, pools = decode_batch(bsz, ctx)
            o = torch.empty_like(q)
            chunks = -(-ctx // pa.CONTRACT_CHUNK)
            ours = bench(
                partial(
                    pa.paged_attention_decode, q, k, v, r2t, pools, seq, D**-0.5, out=o, max_chunks=chunks
                )
            )
            mma_fn = partial(pam.paged_attention_decode, q, k, v, r2t, pools, seq, D**-0.5, max_chunks=chunks)
            mma = bench(partial(mma_fn, out=o))
            sg8 = bench(sglang_decode(q, k, v, r2t, seq.int(), 8, torch.empty_like(q)))
            sg_det = bench(sglang_decode(q, k, v, r2t, seq.int(), -(-ctx // 256), torch.empty_like(q)))
            mma_graph = graph_ms(partial(mma_fn, out=o))
            flash, flash_graph, flash_kind = flash_ms(
                q[:, :, None], contiguous_kv(k, r2t), contiguous_kv(v, r2t), False, graphed=True
            )
            kv_bytes = 2 * bsz * ctx * HKV * D * 2
            copy = copy_ms(kv_bytes)
            row = dict(
                ctx=ctx, batch=bsz, ours=ours, mma=mma, sglang8=sg8, sglang_det=sg_det, flash=flash,
                flash_kind=flash_kind, mma_graph=mma_graph, flash_graph=flash_graph,
                copy_fraction=copy / ours, mma_copy_fraction=copy / mma,
                flash_copy_fraction=copy / flash,
            )  # fmt: skip
            if sweep:
                # the fold's launch options (pam.FOLD_CANDIDATES; default partials options), replayed
                # from a CUDA graph: the device time, which is what they change (the launcher's host time
                # would hide it at batch 1); "default" is the module's current fold
                row["mma_fold_sweep"] = fold = {}
                for name, launch in {"default": None, **pam.FOLD_CANDIDATES}.items():
                    try:
                        fold[name] = graph_ms(partial(mma_fn, out=o, fold=launch))
                    except Exception as exc:  # one launch failing (resources) must not hide the others
                        print(f"fold {name} at ctx {ctx} batch {bsz}: FAILED: {exc}", flush=True)
                        fold[name] = float("inf")
            rows.append(row)
    print(
        "\n== decode (ms): ours / mma (paged KV) vs torch SDPA flash (contiguous KV; goal: mma <= 1.15x) "
        "and SGLang triton decode_attention_fwd (Hq 32, Hkv 8, D 128, bf16); bw: fraction of copy bandwidth;"
        "\n   'g': replayed from a CUDA graph (as SGLang decodes: no host launch cost); "
        "g ratio = mma g / flash g"
    )
    print(
        f"{'ctx':>6} {'batch':>5} {'ours':>8} {'mma':>8} {'flash':>8} {'sgl 8sp':>8} {'sgl det':>8} "
        f"{'mma/fl':>7} {'ours/fl':>7} {'mma/8sp':>8} {'mma/det':>8} {'ours bw':>7} {'mma bw':>7} "
        f"{'fl bw':>6} {'mma g':>8} {'flash g':>8} {'g ratio':>7}"
    )
    for r in rows:
        print(
            f"{r['ctx']:>6} {r['batch']:>5} {r['ours']:8.4f} {r['mma']:8.4f} {r['flash']:8.4f} "
            f"{r['sglang8']:8.4f} {r['sglang_det']:8.4f} {r['mma'] / r['flash']:7.2f} "
            f"{r['ours'] / r['flash']:7.2f} {r['mma'] / r['sglang8']:8.2f} {r['mma'] / r['sglang_det']:8.2f} "
            f"{r['copy_fraction']:7.2f} {r['mma_copy_fraction']:7.2f} {r['flash_copy_fraction']:6.2f} "
            f"{r['mma_graph']:8.4f} {r['flash_graph']:8.4f} {r['mma_graph'] / r['flash_graph']:7.2f}"
            + ("" if r["flash_kind"] == "flash" else f"  ({r['flash_kind']})")
        )
        if "mma_fold_sweep" in r:
            fold = r["mma_fold_sweep"]
            best = min(fold, key=fold.get)
            print(
                f"{'':>13} mma fold sweep (graph): best {best} {fold[best]:.4f} ms "
                f"({fold[best] / r['flash_graph']:.2f}x flash g, default {fold['default']:.4f}); "
                + ", ".join(f"{name} {t:.4f}" for name, t in fold.items())
            )
    return rows


def extend_table(quick: bool, sweep: bool = False):
    from sglang.srt.layers.attention.triton_ops.extend_attention import extend_attention_fwd

    rows = []
    cases = [(0, 1024), (4096, 512)] if quick else [(0, 1024), (0, 4096), (4096, 512)]
    for prefix, new in cases:
        total = prefix + new
        k, v, r2t = make_pool(1, total)
        q = torch.randn(new, HQ, D, device=DEV).to(torch.bfloat16)
        o = torch.empty_like(q)
        pools = torch.zeros(1, dtype=torch.long, device=DEV)
        pre_t = torch.tensor([prefix], device=DEV)
        new_t = torch.tensor([new], device=DEV)
        ours = bench(partial(pa.paged_attention_extend, q, k, v, r2t, pools, pre_t, new_t, D**-0.5, out=o))
        mma_fn = partial(pam.paged_attention_extend, q, k, v, r2t, pools, pre_t, new_t, D**-0.5, out=o)
        mma = bench(mma_fn)
        new_slots = r2t[0, prefix:total].long()
        k_ext, v_ext = k[new_slots].contiguous(), v[new_slots].contiguous()
        qo_indptr = torch.tensor([0, new], dtype=torch.int32, device=DEV)
        kv_indptr = torch.tensor([0, prefix], dtype=torch.int32, device=DEV)
        kv_indices = r2t[0, :prefix].long().contiguous()
        o2 = torch.empty_like(q)
        args = (
            q,
            k_ext,
            v_ext,
            o2,
            k,
            v,
            qo_indptr,
            kv_indptr,
            kv_indices,
            None,
            True,
            None,
            new,
            1.0,
            1.0,
            D**-0.5,
        )
        sg = bench(partial(extend_attention_fwd, *args))
        row = dict(prefix=prefix, new=new, ours=ours, mma=mma, sglang=sg, flash=None)
        if prefix == 0:  # SDPA's is_causal aligns the mask top-left: only a prefill from scratch compares
            slots = r2t[:, :total]
            row["flash"], _, row["flash_kind"] = flash_ms(
                q.transpose(0, 1)[None].contiguous(), contiguous_kv(k, slots), contiguous_kv(v, slots), True
            )
        if sweep:
            row["mma_sweep"] = {f"s{st}": bench(partial(mma_fn, num_stages=st)) for st in (1, 2, 3, 4)}
        rows.append(row)
    print(
        "\n== extend (ms): ours / mma vs SGLang triton extend_attention_fwd and (prefill from scratch) torch "
        "SDPA flash, causal (batch 1)"
    )
    print(
        f"{'prefix':>6} {'new':>5} {'ours':>9} {'mma':>9} {'sglang':>9} {'flash':>9} {'ours/sgl':>8} "
        f"{'mma/sgl':>8} {'mma/fl':>7}"
    )
    for r in rows:
        fl = r["flash"]
        print(
            f"{r['prefix']:>6} {r['new']:>5} {r['ours']:9.3f} {r['mma']:9.3f} {r['sglang']:9.3f} "
            + (f"{fl:9.3f} " if fl is not None else f"{'-':>9} ")
            + f"{r['ours'] / r['sglang']:8.2f} {r['mma'] / r['sglang']:8.2f} "
            + (f"{r['mma'] / fl:7.2f}" if fl is not None else f"{'-':>7}")
            + ("" if r.get("flash_kind", "flash") == "flash" else f"  ({r['flash_kind']})")
        )
        if "mma_sweep" in r:
            print(f"{'':>12} mma sweep: " + ", ".join(f"{n} {t:.3f}" for n, t in r["mma_sweep"].items()))
    return rows


def matmul_table(quick: bool, sweep: bool = False):
    """The matmul table, measured by ``benchmarks/bench_batch_invariant_matmul.py`` (the matmul's own
    benchmark, with the candidate sweep and the dispatch proposal); here its short form."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_batch_invariant_matmul", Path(__file__).with_name("bench_batch_invariant_matmul.py")
    )
    bbm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bbm)
    shapes = (
        [(4096, 4096), (151936, 1024)]
        if quick
        else [(4096, 4096), (12288, 4096), (4096, 12288), (151936, 1024)]
    )
    rows = bbm.measure(shapes, (1, 8, 64, 256, 1024, 8192), check=False)
    print("\n== matmul (ms): batch-invariant Triton (dispatched) vs cuBLAS F.linear (bf16)")
    bbm.print_table(rows, sweep=False)
    return rows


def partials_table(quick: bool, sweep: bool = False):
    """The mma decode's partials launch options (groups per program, pipeline stages) and the fold as a
    programmatic dependent launch or not, each whole call replayed from a CUDA graph with the default
    fold launch, on the benchmark's randomly permuted slots and on slots in order (a fresh
    cache's allocation; the same K/V values), vs SDPA flash (contiguous KV) replayed likewise."""
    del sweep
    rows = []
    print(
        f"\n== decode partials options (ms, CUDA graph, fold {pam.FoldLaunch().name}): the module's "
        "default and the best option per slot layout, vs flash g"
    )
    for ctx, bsz in ((32768, 1), (16384, 8)) if quick else PARTIALS_SHAPES:
        q, k, v, r2t, seq, pools = decode_batch(bsz, ctx)
        _, flash_graph, _ = flash_ms(
            q[:, :, None], contiguous_kv(k, r2t), contiguous_kv(v, r2t), False, graphed=True
        )
        row = dict(ctx=ctx, batch=bsz, flash_graph=flash_graph)
        for layout, slots in (("random", r2t), ("in_order", torch.sort(r2t.view(-1)).values.view_as(r2t))):
            fn = mma_decode(q, k, v, slots, seq, pools, ctx)
            times = {"default": graph_ms(fn)}
            for gpp in (1, 2) if quick else (1, 2, 4, 8, 16, 32):
                for stages in (2, 3, 4):
                    for pdl in (False, True):
                        name = f"gpp{gpp}_s{stages}" + ("_pdl" if pdl else "")
                        times[name] = graph_ms(
                            partial(fn, groups_per_program=gpp, num_stages=stages, pdl=pdl)
                        )
            row[layout] = times
            best = min(times, key=times.get)
            print(
                f"ctx {ctx:>6} batch {bsz:>3} {layout:>8}: default {times['default']:.4f} "
                f"({times['default'] / flash_graph:.2f}x flash g {flash_graph:.4f}), best {best} "
                f"{times[best]:.4f} ({times[best] / flash_graph:.2f}x); "
                + ", ".join(f"{n} {t:.4f}" for n, t in times.items()),
                flush=True,
            )
        rows.append(row)
    return rows


def groups_table(quick: bool, sweep: bool = False):
    """The definition's group size (chunks folded in registers by one partials program before the
    serial fold; part of the contract: each gives other bits) for the mma decode, replayed from CUDA
    graphs, vs SDPA flash: the data for choosing ``CONTRACT_GROUP``."""
    del sweep
    groups = (1, 4, 8, 16)
    rows = []
    print(f"\n== decode by group size (ms, CUDA graph; module default {pam.CONTRACT_GROUP}) vs flash g")
    for ctx in (1024, 32768) if quick else (1024, 4096, 16384, 32768):
        for bsz in (1, 8) if quick else (1, 8, 64):
            q, k, v, r2t, seq, pools = decode_batch(bsz, ctx)
            _, flash_graph, _ = flash_ms(
                q[:, :, None], contiguous_kv(k, r2t), contiguous_kv(v, r2t), False, graphed=True
            )
            fn = mma_decode(q, k, v, r2t, seq, pools, ctx)
            times = {g: graph_ms(partial(fn, group=g)) for g in groups}
            rows.append(dict(ctx=ctx, batch=bsz, flash_graph=flash_graph, groups=times))
            print(
                f"ctx {ctx:>6} batch {bsz:>3}: flash g {flash_graph:.4f}; "
                + ", ".join(f"group {g} {t:.4f} ({t / flash_graph:.2f}x)" for g, t in times.items()),
                flush=True,
            )
    return rows


def kernel_times(fn, iters: int = 20) -> dict[str, float]:
    """Mean device time per call of each CUDA kernel ``fn`` launches (torch.profiler), in ms."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return {
        e.key: e.device_time_total / iters / 1e3
        for e in prof.key_averages()
        if e.device_time_total > 0 and not e.key.startswith(("Memcpy", "Memset"))
    }


def profile_table(quick: bool, sweep: bool = False):
    """Where the mma decode's time goes: its kernels' device times next to the whole call's time
    (``do_bench``, host launch included) and SDPA flash, at the rows where it trails flash most."""
    del sweep
    rows = []
    print("\n== decode profile (ms): mma kernels' device time per call vs the call (do_bench) and flash")
    for ctx, bsz in (
        ((1024, 8), (32768, 1)) if quick else ((1024, 1), (1024, 8), (16384, 8), (32768, 1), (32768, 8))
    ):
        q, k, v, r2t, seq, pools = decode_batch(bsz, ctx)
        fn = mma_decode(q, k, v, r2t, seq, pools, ctx)
        kernels = kernel_times(fn)
        call = bench(fn)
        flash, _, _ = flash_ms(q[:, :, None], contiguous_kv(k, r2t), contiguous_kv(v, r2t), False)
        rows.append(dict(ctx=ctx, batch=bsz, call=call, flash=flash, kernels=kernels))
        print(
            f"ctx {ctx:>6} batch {bsz:>3}: call {call:.4f}, flash {flash:.4f}, kernels "
            + ", ".join(f"{name[:40]} {t:.4f}" for name, t in kernels.items())
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["decode", "extend", "matmul", "profile", "partials", "groups"])
    ap.add_argument("--sweep", action="store_true", help="also time the mma kernels' launch options")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    out = {}
    tables = (("decode", decode_table), ("extend", extend_table), ("matmul", matmul_table))
    extra = (("profile", profile_table), ("partials", partials_table), ("groups", groups_table))
    for name, fn in (*tables, *extra):
        if args.only == name or (args.only is None and name not in dict(extra)):
            try:
                out[name] = fn(args.quick, args.sweep)
            except Exception as exc:  # report and go on: one table failing must not hide the others
                print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
                out[name] = f"failed: {exc}"
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
