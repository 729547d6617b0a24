"""Benchmark (GPU): the batch-invariant matmul (``parity.ops.batch_invariant_matmul``) vs cuBLAS.

For each weight shape (N, K) and M (bf16, ``y = x @ W^T``): cuBLAS ``F.linear`` and the kernel under
its M dispatch (``config_for``), times from ``triton.testing.do_bench`` (median, ms; L2 flushed
before each call, which also hides the host's launch overhead as CUDA graphs do in SGLang's decode),
the ratio cublas / ours (the issue's goal: >= 0.9 at every M), and whether the dispatched output is
bitwise the canonical ``CONFIG``'s.

``--sweep`` also times every member of ``CANDIDATES`` -- the pointer kernel's, with its wide K steps
where they divide K, and the persistent TMA kernel's (names ending in ``tma``, ``tma sub``,
``tma ws``) -- on every input, checks each bitwise
against ``CONFIG`` on that input (a member that differs is reported, and never proposed: the dispatch
is only sound within a family of equal bits), prints per M range of ``DISPATCH`` the member with the
best worst-case ratio over the shapes, as a pasteable ``DISPATCH`` table (plus ``SHAPE_DISPATCH`` rows
for shapes that gain >= 5 % from a table of their own; the wide K steps only there, never in
``DISPATCH``, which serves any K), and probes a few configurations outside the family (another
BLOCK_K, mma.sync) for bitwise equality -- informational, never proposed.

``--graph`` times each product as decode runs it under SGLang's CUDA graphs (:class:`GraphTimer`):
replays of one graph over distinct weights, no L2 flush and no launch per product.

    python benchmarks/bench_batch_invariant_matmul.py [--quick] [--sweep] [--graph] [--json out.json]
        [--ms 1,16] [--shapes 4096x4096,151936x1024]

A full ``--sweep`` is 7 shapes x 9 M x 24 timings (the pointer members took about 3 minutes on an H100,
compilation included; the TMA members add about as much again). ``--shapes`` splits it into parts;
each part's proposal covers only its shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial

import torch
import triton
from cuda_timing import graph_us

from parity.ops import batch_invariant_matmul as bm

DEV = "cuda"
SHAPES = [
    (4096, 4096), (12288, 4096), (4096, 12288), (151936, 1024), (14336, 4096), (4096, 14336), (1024, 4096),
]  # fmt: skip
MS = (1, 4, 16, 64, 128, 256, 1024, 4096, 8192)
QUICK_SHAPES = [(4096, 4096), (151936, 1024), (1024, 4096)]
QUICK_MS = (1, 16, 128, 1024, 8192)
GAIN_FOR_SHAPE_TABLE = 1.05
# not candidates (informational): BLOCK_K 32 (another K order), 128 (a wide step; at K = 1000 with a
# padded tail the family does not claim), and mma.sync (2 warps, BLOCK_M 32)
PROBES = (
    bm.MatmulConfig(64, 128, 32, 8, 4, 4),
    bm.MatmulConfig(64, 128, 128, 8, 4, 3),
    bm.MatmulConfig(64, 128, 64, 8, 2, 3),
    bm.MatmulConfig(32, 128, 64, 8, 4, 3),
)
PROBE_CASES = ((4096, 4096, 1), (4096, 4096, 256), (1001, 1000, 300))


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


GRAPH_WEIGHT_BYTES = 512 << 20  # the weights one graph streams: several times any L2 (H200: 60 MiB)
GRAPH_REPLAYS = 20


class GraphTimer:
    """Decode as SGLang runs it: one CUDA graph of ``L`` products ``x @ W_i^T``, each with its own
    weight ``W_i`` (``L`` such that the weights total ``GRAPH_WEIGHT_BYTES``, so every product reads its
    weight from HBM, as a layer's projection does, with L2 warm only with what the graph itself left),
    replayed back to back; the time per product is the replays' time over ``L``. No launch overhead and
    no L2 flush between products (``do_bench`` flushes L2 before each call and times each launch on its
    own, which for the 10-30 us products of a small model's decode is as much the flush's tail and the
    launch as the product)."""

    def __init__(self, w: torch.Tensor):
        layers = max(2, GRAPH_WEIGHT_BYTES // (w.numel() * w.element_size()))
        self.weights = [w] + [w.roll(i, dims=0) for i in range(1, layers)]

    def __call__(self, fn, x: torch.Tensor) -> float:
        def products() -> None:
            for w in self.weights:
                fn(x, w)

        # one graph replay is one product per weight: ms per product
        return graph_us(products, 1, GRAPH_REPLAYS) / (1e3 * len(self.weights))


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int16) != b.view(torch.int16)).sum())


def _time(fn, x: torch.Tensor, w: torch.Tensor, timer: GraphTimer | None) -> float:
    return timer(fn, x) if timer is not None else bench(partial(fn, x, w))


def measure(shapes, ms, sweep: bool = False, check: bool = True, graph: bool = False) -> list[dict]:
    """One row per (shape, M): cublas / ours ms, the dispatched member, its bits against ``CONFIG``
    (``check``), and with ``sweep`` every candidate's time and bits. ``graph``: times from
    :class:`GraphTimer` instead of ``do_bench``."""
    rows = []
    for n, k in shapes:
        t0 = time.monotonic()
        g = torch.Generator(device=DEV).manual_seed(n + k)
        w = (torch.randn(n, k, generator=g, device=DEV) * k**-0.5).to(torch.bfloat16)
        timer = GraphTimer(w) if graph else None
        for m in ms:
            x = torch.randn(m, k, generator=g, device=DEV).to(torch.bfloat16)
            time_of = partial(_time, x=x, w=w, timer=timer)
            chosen = bm.config_for(m, n, k)
            row = dict(n=n, k=k, m=m, config=chosen.name)
            row["cublas"] = time_of(torch.nn.functional.linear)
            row["ours"] = time_of(bm.batch_invariant_mm)
            ref = None
            if check or sweep:
                ref = bm.batch_invariant_mm(x, w, config=bm.CONFIG)
                row["ours_differing"] = _differing(bm.batch_invariant_mm(x, w), ref)
            if sweep:
                cands = {}
                for c in (c for c in bm.CANDIDATES if bm.serves_k(c, k)):
                    diff = _differing(bm.batch_invariant_mm(x, w, config=c), ref)
                    cands[c.name] = dict(ms=time_of(partial(bm.batch_invariant_mm, config=c)), differing=diff)
                row["candidates"] = cands
            del ref
            rows.append(row)
        print(f"  N={n} K={k}: {time.monotonic() - t0:.0f} s", flush=True)
    return rows


def print_table(rows, sweep: bool) -> None:
    head = (
        f"{'N':>7} {'K':>6} {'M':>5} {'cublas':>8} {'ours':>8} {'cub/ours':>8}  {'bits':>5}  {'config':<27}"
    )
    if sweep:
        head += f" {'best candidate':<27} {'ms':>8} {'cub/best':>8}"
    print(head)
    for r in rows:
        bits = "" if "ours_differing" not in r else ("ok" if r["ours_differing"] == 0 else "DIFF")
        line = (
            f"{r['n']:>7} {r['k']:>6} {r['m']:>5} {r['cublas']:8.4f} {r['ours']:8.4f} "
            f"{r['cublas'] / r['ours']:8.2f}  {bits:>5}  {r['config']:<27}"
        )
        if sweep:
            ok = {name: c for name, c in r["candidates"].items() if c["differing"] == 0}
            if ok:
                best = min(ok, key=lambda name: ok[name]["ms"])
                line += f" {best:<27} {ok[best]['ms']:8.4f} {r['cublas'] / ok[best]['ms']:8.2f}"
        print(line)
    ratios = [(r["cublas"] / r["ours"], r) for r in rows]
    for label, sel in (("M <= 256", lambda r: r["m"] <= 256), ("M > 256", lambda r: r["m"] > 256)):
        part = [(q, r) for q, r in ratios if sel(r)]
        if part:
            q, r = min(part, key=lambda t: t[0])
            print(
                f"worst cublas/ours under the dispatch, {label}: {q:.2f} (N={r['n']} K={r['k']} M={r['m']})"
            )


def _ranges():
    """(lo, hi] M ranges of the current DISPATCH (hi None: unbounded)."""
    out, lo = [], 0
    for bound, _ in bm.DISPATCH:
        out.append((lo, bound))
        lo = bound if bound is not None else lo
    return out


def _in(m, lo, hi) -> bool:
    return m > lo and (hi is None or m <= hi)


def _src(c: bm.MatmulConfig) -> str:
    """The member as the module's tables spell it: ``_c(...)`` (pointer kernel), ``_w(...)`` (pointer
    kernel, a wide K step), ``_t(...)`` (TMA)."""
    if c.group_m != 8:
        return repr(c)
    if c.block_k != bm.FAMILY_BLOCK_K:
        return f"_w({c.block_m}, {c.block_n}, {c.block_k}, {c.num_warps}, {c.num_stages})"
    args = f"{c.block_m}, {c.block_n}, {c.num_warps}, {c.num_stages}"
    if c.kernel == "ptr":
        return f"_c({args})"
    return f"_t({args}" + ", sub=True" * c.epilogue_subtile + ", ws=True" * c.warp_specialize + ")"


def _pick(rows, names):
    """The candidate with the best worst-case cublas/candidate ratio over ``rows`` (ties: geometric
    mean), with that worst ratio and the row where it occurs."""
    best = None
    for name in names:
        qs = [(r["cublas"] / r["candidates"][name]["ms"], r) for r in rows]
        worst = min(qs, key=lambda t: t[0])
        gmean = float(torch.tensor([q for q, _ in qs]).log().mean().exp())
        key = (round(worst[0], 3), gmean)
        if best is None or key > best[0]:
            best = (key, name, worst)
    return best[1], best[2]


def _emit(table, indent: str = "    ") -> str:
    """Rows (bound, name, note) -> source lines, adjacent ranges with the same member merged."""
    merged = []
    for bound, name, note in table:
        if merged and merged[-1][1] == name:
            merged[-1] = (bound, name, merged[-1][2] + "; " + note)
        else:
            merged.append((bound, name, note))
    by_name = {c.name: c for c in bm.CANDIDATES}
    return "\n".join(f"{indent}({bound}, {_src(by_name[name])}),  # {note}" for bound, name, note in merged)


def propose(rows) -> dict:
    """Per M range: the best member by worst-case ratio over the shapes (and per shape where that
    gains >= 5 %); members that differed from CONFIG on any input are excluded everywhere."""
    differing = sorted({n for r in rows for n, c in r["candidates"].items() if c["differing"]})
    by_name = {c.name: c for c in bm.CANDIDATES}
    if differing:
        print("\n!! FAMILY CLAIM FAILED: these candidates differ bitwise from CONFIG on some input:")
        for r in rows:
            for name, c in r["candidates"].items():
                if c["differing"]:
                    print(f"   {name}: N={r['n']} K={r['k']} M={r['m']}: {c['differing']} elements differ")
    names = [c.name for c in bm.CANDIDATES if c.name not in differing]
    any_k = [name for name in names if by_name[name].block_k == bm.FAMILY_BLOCK_K]  # DISPATCH: any K
    table, current = [], dict(bm.DISPATCH)
    summary = []
    for lo, hi in _ranges():
        part = [r for r in rows if _in(r["m"], lo, hi)]
        if not part:
            table.append((hi, current[hi].name, f"M {lo + 1}..{hi or 'inf'}: no data, current kept"))
            continue
        name, (q, r) = _pick(part, any_k)
        cur_q = min(x["cublas"] / x["ours"] for x in part)
        note = (
            f"M {lo + 1}..{hi or 'inf'}: worst {q:.2f} at N={r['n']} K={r['k']} M={r['m']} (now {cur_q:.2f})"
        )
        table.append((hi, name, note))
        summary.append(dict(lo=lo, hi=hi, best=name, worst=q, current_worst=cur_q))
    shape_tables = {}
    for n, k in sorted({(r["n"], r["k"]) for r in rows}):
        own, gain = [], False
        for (lo, hi), (_, global_name, _) in zip(_ranges(), table, strict=True):
            part = [r for r in rows if (r["n"], r["k"]) == (n, k) and _in(r["m"], lo, hi)]
            if not part:
                own.append((hi, global_name, "no data"))
                continue
            name, (q, r) = _pick(part, [name for name in names if bm.serves_k(by_name[name], k)])
            q_global = min(x["cublas"] / x["candidates"][global_name]["ms"] for x in part)
            gain |= q >= GAIN_FOR_SHAPE_TABLE * q_global
            own.append((hi, name, f"worst {q:.2f} (global pick {q_global:.2f})"))
        if gain:
            shape_tables[(n, k)] = own
    print("\n== proposed dispatch (paste into parity/ops/batch_invariant_matmul.py)")
    print("DISPATCH: tuple[tuple[int | None, MatmulConfig], ...] = (\n" + _emit(table) + "\n)")
    if shape_tables:
        print("SHAPE_DISPATCH: dict[tuple[int, int], tuple[tuple[int | None, MatmulConfig], ...]] = {")
        for (n, k), own in shape_tables.items():
            print(f"    ({n}, {k}): (\n" + _emit(own, indent=" " * 8))
            print("    ),")
        print("}")
    else:
        print("SHAPE_DISPATCH = {}  # no shape gains >= 5 % from a table of its own")
    return dict(
        dispatch=[(hi, name, note) for hi, name, note in table],
        shape_dispatch={f"{n}x{k}": own for (n, k), own in shape_tables.items()},
        ranges=summary,
        differing=differing,
    )


def probes() -> list[dict]:
    """Configurations outside the family, bitwise against CONFIG (informational: could the family be
    wider? A 'same' here is not a proof, and these are never proposed)."""
    out = []
    print("\n== probes outside the family (bitwise vs CONFIG; informational)")
    for n, k, m in PROBE_CASES:
        g = torch.Generator(device=DEV).manual_seed(n * 31 + m)
        w = (torch.randn(n, k, generator=g, device=DEV) * k**-0.5).to(torch.bfloat16)
        x = torch.randn(m, k, generator=g, device=DEV).to(torch.bfloat16)
        ref = bm.batch_invariant_mm(x, w, config=bm.CONFIG)
        for c in PROBES:
            try:
                diff = _differing(bm.batch_invariant_mm(x, w, config=c), ref)
                what = "same bits" if diff == 0 else f"{diff} of {ref.numel()} differ"
            except Exception as exc:  # a probe that does not compile must not stop the report
                diff, what = None, f"failed: {type(exc).__name__}: {exc}"[:200]
            print(f"  N={n} K={k} M={m} {c.name}: {what}")
            out.append(dict(n=n, k=k, m=m, config=c.name, differing=diff, result=what))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, M {QUICK_MS}")
    ap.add_argument(
        "--sweep", action="store_true", help="time and bit-check every candidate, propose a table"
    )
    ap.add_argument("--ms", help="comma-separated M values (default: 1,4,16,64,128,256,1024,4096,8192)")
    ap.add_argument("--shapes", help="comma-separated NxK weight shapes (default: the issue's 7)")
    ap.add_argument("--graph", action="store_true", help="time inside CUDA graphs over distinct "
                    "weights (decode as SGLang runs it; see GraphTimer) instead of do_bench")  # fmt: skip
    args = ap.parse_args()
    t0 = time.monotonic()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    if args.shapes:
        shapes = [tuple(int(d) for d in v.split("x")) for v in args.shapes.split(",")]
    else:
        shapes = QUICK_SHAPES if args.quick else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else (QUICK_MS if args.quick else MS)
    print(f"canonical CONFIG {bm.CONFIG.name}; {len(bm.CANDIDATES)} candidates; dispatch:")
    for bound, c in bm.DISPATCH:
        print(f"  M <= {bound if bound is not None else 'inf'}: {c.name}")
    rows = measure(shapes, ms, sweep=args.sweep, graph=args.graph)
    timing = "CUDA graphs over distinct weights" if args.graph else "do_bench, L2 flushed"
    print(f"\n== matmul (ms, {timing}): batch-invariant Triton (dispatched) vs cuBLAS F.linear, bf16")
    print_table(rows, args.sweep)
    out = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        config=bm.CONFIG.name, dispatch=[(b, c.name) for b, c in bm.DISPATCH], rows=rows,
        timing="graph" if args.graph else "do_bench",
    )  # fmt: skip
    if args.sweep:
        out["proposal"] = propose(rows)
        out["probes"] = probes()
    bad = [r for r in rows if r.get("ours_differing")]
    if bad:
        print(f"\n!! the dispatched output differs from CONFIG's in {len(bad)} cases (see 'bits')")
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
