"""Benchmark (GPU): the MoE contract's experts (``parity.ops.moe_experts``) against the plain loop.

A Qwen3-30B-A3B-like MoE layer (hidden 2048, 128 experts, top-8, moe_intermediate 768, bf16), the
experts part of the layer (routing given: ``parity.moe.route`` of random router logits), at 1, 16,
128, 1024 and 4096 tokens. Times from ``triton.testing.do_bench`` (median, ms):

- ``grouped``: the contract, one Triton launch per projection over all experts (the default);
- ``loop``: the contract, the batch-invariant kernel once per active expert (host sync for counts);
- ``cublas``: the plain per-expert loop, ``parity.moe.experts`` (``F.linear`` = cuBLAS per expert, the
  fp32 slot-order combine): batch-dependent bits, the speed the contract gives up;
- ``hf``: HF transformers' own ``Qwen3MoeExperts`` forward (one-hot loop, bf16 ``index_add_``);
- ``sglang``: SGLang's Triton ``fused_experts`` (what the server runs unpatched), if importable;
- ``route``: ``parity.moe.route`` (fp32 softmax + stable sort over 128 experts), for scale.

Ratios are ``cublas / x`` (> 1: faster than the plain loop) and ``grouped / sglang``. The table also
says whether ``grouped`` and ``loop`` gave the same bits (they must) and how far the contract is from
the cuBLAS loop (it is not bitwise that: another summation order).

    python benchmarks/bench_moe.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch
import triton

from parity import moe
from parity.ops import batch_invariant_matmul as bim
from parity.ops import moe_experts as me

DEV = "cuda"
HIDDEN, EXPERTS, TOP_K, INTER = 2048, 128, 8, 768
TOKENS = (1, 16, 128, 1024, 4096)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def make_layer(seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    router = (torch.randn(EXPERTS, HIDDEN, generator=g, device=DEV) * HIDDEN**-0.5).to(torch.bfloat16)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g, device=DEV) * HIDDEN**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=g, device=DEV) * INTER**-0.5).to(torch.bfloat16)
    return router, w13, w2


def hf_experts(w13, w2):
    """HF transformers' ``Qwen3MoeExperts`` holding the same weights (its default implementation)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from parity.tiny_models import tiny_config

    config = tiny_config(
        "qwen3_moe",
        dict(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=EXPERTS, num_experts_per_tok=TOP_K),
    )
    with torch.device("meta"):
        module = Qwen3MoeExperts(config)
    module.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return module


def sglang_fused_experts(x, weights, ids, logits, w13, w2):
    """SGLang 0.5.15's Triton ``fused_experts`` (out of place), or None when it cannot be imported."""
    try:
        from sglang.srt.layers.moe.fused_moe_triton import fused_experts
        from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
        from sglang.srt.layers.moe.topk import StandardTopKOutput
    except Exception as exc:  # no sgl_kernel on this host, ...
        print(f"sglang fused_experts not importable: {type(exc).__name__}: {exc}", flush=True)
        return None
    # fused_experts reads SGLang's global server args (a CUDA server's, for a tiny local MoE checkpoint).
    import tempfile
    from pathlib import Path

    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    from parity.tiny_models import build_tiny_model

    path = build_tiny_model("qwen3_moe", cache_dir=Path(tempfile.gettempdir()) / "truepolicy-bench-models")
    server_args = ServerArgs(model_path=str(path), device="cuda", skip_tokenizer_init=True)
    set_global_server_args_for_scheduler(server_args)
    config = MoeRunnerConfig(
        num_experts=EXPERTS, num_local_experts=EXPERTS, hidden_size=HIDDEN,
        intermediate_size_per_partition=INTER, top_k=TOP_K, params_dtype=torch.bfloat16,
        activation="silu", inplace=False,
    )  # fmt: skip
    run = partial(fused_experts, x, w13, w2, StandardTopKOutput(weights, ids.to(torch.int32), logits), config)
    try:
        run()
    except Exception as exc:  # e.g. an sgl_kernel without the MoE ops
        print(f"sglang fused_experts failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None
    return run


def table(quick: bool):
    router, w13, w2 = make_layer()
    hf = hf_experts(w13, w2)
    rows = []
    for tokens in TOKENS[:4] if quick else TOKENS:
        x = torch.randn(tokens, HIDDEN, device=DEV).to(torch.bfloat16)
        with torch.no_grad():
            logits = bim.batch_invariant_linear(x, router)
            weights, ids = moe.route(logits, TOP_K, True)
            grouped = me.moe_experts(x, weights, ids, w13, w2, impl="grouped")
            loop = me.moe_experts(x, weights, ids, w13, w2, impl="loop")
            plain = moe.experts(x, weights, ids, w13, w2)
            r = dict(tokens=tokens, active_experts=int(torch.unique(ids).numel()))
            r["same_bits"] = bool(torch.equal(grouped.view(torch.int16), loop.view(torch.int16)))
            r["max_abs_vs_cublas"] = (grouped.float() - plain.float()).abs().max().item()
            r["grouped"] = bench(partial(me.moe_experts, x, weights, ids, w13, w2, impl="grouped"))
            r["loop"] = bench(partial(me.moe_experts, x, weights, ids, w13, w2, impl="loop"))
            r["cublas"] = bench(partial(moe.experts, x, weights, ids, w13, w2))
            r["hf"] = bench(partial(hf, x, ids, weights.to(torch.bfloat16)))
            sgl = sglang_fused_experts(x, weights, ids, logits, w13, w2)
            r["sglang"] = bench(sgl) if sgl is not None else None
            r["route"] = bench(partial(moe.route, logits, TOP_K, True))
        rows.append(r)
        print(r, flush=True)
    print(
        f"\n== MoE experts (ms, median): hidden {HIDDEN}, {EXPERTS} experts, top-{TOP_K}, "
        f"moe_intermediate {INTER}, bf16; matmul config {bim.CONFIG}"
    )
    head = ["tokens", "active", "grouped", "loop", "cublas", "hf", "sglang", "route"]
    head += ["cub/grp", "cub/loop", "grp/sgl", "grp==loop", "max|Δ| cub"]
    print(" ".join(f"{h:>9}" for h in head))
    for r in rows:
        sgl = r["sglang"]
        cells = [
            f"{r['tokens']:>9}", f"{r['active_experts']:>9}", f"{r['grouped']:9.4f}", f"{r['loop']:9.4f}",
            f"{r['cublas']:9.4f}", f"{r['hf']:9.4f}", f"{sgl:9.4f}" if sgl else f"{'n/a':>9}",
            f"{r['route']:9.4f}", f"{r['cublas'] / r['grouped']:9.2f}", f"{r['cublas'] / r['loop']:9.2f}",
            f"{r['grouped'] / sgl:9.2f}" if sgl else f"{'n/a':>9}",
            f"{'yes' if r['same_bits'] else 'NO':>9}", f"{r['max_abs_vs_cublas']:9.2e}",
        ]  # fmt: skip
        print(" ".join(cells))
    fastest = [min(("grouped", "loop"), key=lambda k, r=r: r[k]) for r in rows]
    print(
        "faster contract implementation per size:",
        dict(zip([r["tokens"] for r in rows], fastest, strict=True)),
    )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="up to 1024 tokens")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    rows = table(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["same_bits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
