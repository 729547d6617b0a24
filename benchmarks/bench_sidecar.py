"""Benchmark: the sidecar's pipeline (receive buffer → checks / FP8 → hand-off) vs a plain copy.

What is timed, for one complete version of a Qwen3-shaped model (checkpoint names and shapes):

- ``copy``: ``dst.copy_(src)`` of all the wire bytes at once (the floor for moving them once);
- ``pipeline:none``: ``weight_sync.sidecar.pipeline.receive`` with the buckets arriving by a
  device copy into their place in the staging buffer (standing in for the NCCL / gloo receive,
  which is not measured here: 2-GPU NCCL throughput is its own issue), every tensor checked for
  NaN/Inf, then the hand-off (the IPC payload SGLang would get: CUDA IPC or shared-memory handles);
- ``pipeline:fp8_block``: the same with the buckets arriving into the two ring slots and quantized to
  block FP8 into the staging buffer (``weight_sync.fp8.fill_bucket_from``: one grouped kernel launch
  per bucket on a GPU, the PyTorch reference on the CPU);
- ``pipeline:fp8_block:per-weight`` (baseline of the grouped launch, same process): the staging as it
  was before, one quantization launch per weight (``fill_bucket``) and one finiteness check per tensor.

``stage host s`` is the host time spent staging (launching the checks / quantization) per version:
when it exceeds the time the GPU needs for the receives, the host paces the pipeline.

GB/s = wire bytes (bf16, as the trainer sends them) / seconds; medians over ``--repeats`` runs.

    python benchmarks/bench_sidecar.py [--device cpu|cuda] [--size small|medium|large|llama8b] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weight_sync.sidecar import pipeline  # noqa: E402
from weight_sync.sidecar.pipeline import BucketChecks, allocate, receive  # noqa: E402
from weight_sync.sidecar.plan import layout_buckets, validate  # noqa: E402
from weight_sync.sidecar.served import ServedModel, TensorSpec  # noqa: E402
from weight_sync.sidecar.sglang_api import serialize_named_tensors  # noqa: E402
from weight_sync.sidecar.wire import WIRE_DTYPES, Quantization  # noqa: E402

# hidden, intermediate, layers, vocab, kv heads x head_dim: 0.12 / 0.65 / 3.4 GB of bf16
SIZES = {
    "small": (1024, 3072, 2, 16384, 4 * 128),
    "medium": (2048, 6144, 4, 32768, 4 * 128),
    "large": (4096, 12288, 6, 65536, 8 * 128),
    "llama8b": (4096, 14336, 32, 128256, 8 * 128),  # Llama-3-8B's shapes (+ Qwen3's q/k norms): 16 GB
}


def qwen3_specs(hidden: int, inter: int, layers: int, vocab: int, kv: int) -> list[tuple[str, tuple, str]]:
    specs = [("model.embed_tokens.weight", (vocab, hidden), "bfloat16")]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,), "bfloat16"),
            (p + "self_attn.q_proj.weight", (hidden, hidden), "bfloat16"),
            (p + "self_attn.k_proj.weight", (kv, hidden), "bfloat16"),
            (p + "self_attn.v_proj.weight", (kv, hidden), "bfloat16"),
            (p + "self_attn.o_proj.weight", (hidden, hidden), "bfloat16"),
            (p + "self_attn.q_norm.weight", (128,), "bfloat16"),
            (p + "self_attn.k_norm.weight", (128,), "bfloat16"),
            (p + "post_attention_layernorm.weight", (hidden,), "bfloat16"),
            (p + "mlp.gate_proj.weight", (inter, hidden), "bfloat16"),
            (p + "mlp.up_proj.weight", (inter, hidden), "bfloat16"),
            (p + "mlp.down_proj.weight", (hidden, inter), "bfloat16"),
        ]
    specs += [("model.norm.weight", (hidden,), "bfloat16"), ("lm_head.weight", (vocab, hidden), "bfloat16")]
    return specs


def served_for(specs, method: str) -> ServedModel:
    if method == "none":
        return ServedModel("bench", {n: TensorSpec(s, d) for n, s, d in specs})
    from weight_sync.fp8 import DEFAULT_POLICY

    out = {}
    for n, s, d in specs:
        for t in DEFAULT_POLICY.specs(n, s, WIRE_DTYPES[d]):
            out[t.name] = TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
    return ServedModel("bench", out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Done:
    def wait(self):
        return True


def stage_per_weight(bucket, src: torch.Tensor, staging: torch.Tensor) -> BucketChecks:
    """The FP8 staging before grouped launches (the baseline row): one quantization launch per weight
    (``fill_bucket``), one finiteness check per kept tensor and per scale tensor."""
    from weight_sync.fp8 import fill_bucket

    views = {
        e.name: src[e.offset : e.offset + e.nbytes].view(WIRE_DTYPES[e.dtype]).view(e.shape)
        for e in bucket.entries
    }
    fill_bucket(staging, bucket.fp8_plan, views.__getitem__, check=False)
    quantized = {e.source for e in bucket.fp8_plan.entries if e.role == "fp8_weight"}
    groups, flags = [], []
    for name, t in views.items():
        if name not in quantized:
            groups.append((name,))
            flags.append(torch.isfinite(torch.stack(torch.aminmax(t))).all())
    for e in bucket.fp8_plan.entries:
        if e.role == "fp8_scale":
            groups.append((e.source,))
            flags.append(torch.isfinite(staging[e.start_idx : e.end_idx].view(torch.float32)).all())
    return BucketChecks(groups, torch.stack(flags))


def bench_pipeline(specs, what: str, device: torch.device, bucket_bytes: int, repeats: int) -> dict:
    method, _, variant = what.partition(":")
    manifest = layout_buckets(specs, bucket_bytes, Quantization(method=method))
    plan = validate(manifest, served_for(specs, method))
    g = torch.Generator(device=device).manual_seed(0)
    sources = []
    for k, size in enumerate(manifest.buckets):
        src = torch.zeros(size, dtype=torch.uint8, device=device)
        for e in (e for e in manifest.tensors if e.bucket == k):
            view = src[e.offset : e.offset + e.nbytes].view(WIRE_DTYPES[e.dtype])
            view.copy_(torch.randn(view.shape, generator=g, device=device) * 0.02)
        sources.append(src)
    staging = allocate(plan.staging_nbytes, device, shared=device.type == "cpu")
    ring = None if plan.direct else [allocate(plan.ring_bytes, device, shared=False) for _ in range(2)]
    if device.type == "cuda":
        try:
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

            monkey_patch_torch_reductions()
        except ImportError:
            pass  # torch's own CUDA IPC reduction: same handles, device named by index
    times, handoff, stage = [], [], []
    real_stage = pipeline.stage_bucket
    if variant == "per-weight":
        pipeline.stage_bucket = stage_per_weight
    elif variant:
        raise SystemExit(f"unknown variant {what}")
    try:
        for _ in range(repeats + 1):  # the first run warms up (allocations, kernel compilation)
            it = iter(sources)

            def post(dst, it=it):
                dst.copy_(next(it), non_blocking=True)
                return _Done()

            sync(device)
            t0 = time.perf_counter()
            stats = receive(plan, staging, ring, post)
            sync(device)
            t1 = time.perf_counter()
            named = [(t.name, staging[t.start : t.end].view(t.dtype).view(t.shape)) for t in plan.staged]
            payload = serialize_named_tensors(named)
            t2 = time.perf_counter()
            times.append(t2 - t0)
            handoff.append(t2 - t1)
            stage.append(stats.stage_s)
    finally:
        pipeline.stage_bucket = real_stage
    times, handoff, stage = times[1:], handoff[1:], stage[1:]
    seconds = statistics.median(times)
    return {
        "what": f"pipeline:{what}",
        "wire_bytes": manifest.total_bytes,
        "staged_bytes": plan.staging_nbytes,
        "buckets": len(manifest.buckets),
        "seconds": seconds,
        "handoff_seconds": statistics.median(handoff),
        "stage_host_seconds": statistics.median(stage),
        "payload_bytes": len(payload),
        "gbps": manifest.total_bytes / seconds / 1e9,
    }


def bench_copy(nbytes: int, device: torch.device, repeats: int) -> dict:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times[1:])
    return {"what": "copy", "wire_bytes": nbytes, "seconds": seconds, "gbps": nbytes / seconds / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="default: large on cuda, small on cpu"
    )
    ap.add_argument("--bucket-mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="none,fp8_block,fp8_block:per-weight")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.multiprocessing.set_sharing_strategy("file_system")
    size = args.size or ("large" if device.type == "cuda" else "small")
    specs = qwen3_specs(*SIZES[size])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, model {size}, bucket {args.bucket_mib} MiB, torch {torch.__version__}", flush=True)
    rows = []
    for method in args.methods.split(","):
        rows.append(bench_pipeline(specs, method, device, args.bucket_mib << 20, args.repeats))
    rows.insert(0, bench_copy(rows[0]["wire_bytes"], device, args.repeats))
    copy = rows[0]["seconds"]
    print(
        f"{'what':>29} {'GB':>7} {'buckets':>7} {'seconds':>9} {'GB/s':>8} {'of copy':>8} {'hand-off s':>10} "
        f"{'stage host s':>12}"
    )
    for r in rows:
        r["of_copy"] = copy / r["seconds"]
        print(
            f"{r['what']:>29} {r['wire_bytes'] / 1e9:>7.3f} {r.get('buckets', 1):>7} {r['seconds']:>9.4f} "
            f"{r['gbps']:>8.2f} {r['of_copy']:>8.3f} {r.get('handoff_seconds', 0.0):>10.4f} "
            f"{r.get('stage_host_seconds', 0.0):>12.4f}"
        )
    by = {r["what"]: r for r in rows}
    grouped, per_weight = by.get("pipeline:fp8_block"), by.get("pipeline:fp8_block:per-weight")
    if grouped and per_weight:
        print(
            f"FP8 staging: grouped launches {grouped['seconds']:.4f} s per version vs per-weight "
            f"{per_weight['seconds']:.4f} s ({per_weight['seconds'] / grouped['seconds']:.2f}x); host time "
            f"{grouped['stage_host_seconds'] * 1e3:.1f} vs {per_weight['stage_host_seconds'] * 1e3:.1f} ms"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": name, "size": size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
