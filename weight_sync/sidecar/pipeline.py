"""The receive pipeline: buckets arrive into bounded, reused buffers and are staged, bucket k being
checked (and FP8-quantized) while bucket k+1 is already being received.

- ``quantization: none``: each bucket is received straight into its place in the staging buffer
  (no copy at all); staging bucket k = checking every floating tensor of it for NaN/Inf.
- ``quantization: fp8_block``: buckets holding a weight to quantize are received into a ring of two
  slots of the largest such bucket's size; staging bucket k = quantizing its weights from slot k % 2
  into the staging buffer (:func:`weight_sync.fp8.fill_bucket_from`: one grouped kernel launch per
  source dtype, which also flags non-finite blocks), the others copied as they are (one byte copy for
  the bucket). A bucket whose tensors are all kept as sent (an embedding or lm_head of its own, 1 GB
  each for Llama-3-8B) is received in place and only checked, as on the direct path: copying it from
  a slot cost a whole bucket's copy at the ends of the push, where nothing overlaps it (the first
  bucket's fill, the last one's drain; +1 ms of a ~45 ms push on 2x H200).

Finiteness (NaN/Inf) is computed on the device as each bucket is staged and checked with one host
synchronization at the end: a bad tensor fails the transfer, named with its bucket, after every
bucket was received, so the trainer's broadcasts complete and the group stays usable. On the
direct path one ``aminmax`` covers each run of adjacent same-dtype tensors (a whole bucket for a
bf16 model) instead of one per tensor; only when a run is not finite are its bucket's tensors
scanned one by one, to name the culprit exactly as a per-tensor check would.

In flight: on the direct path every bucket's receive is posted up front (each lands in its own
place of the staging buffer, nothing is reused), so the network never waits for the host or for
a check (see :func:`receive`). On the FP8 path receive k+1 is posted before bucket k is staged,
and k+2 (into k's ring slot) only after, so at most two buckets are in flight and the ring slots
are never overwritten while read. The staging buffer holds the whole new version (the atomicity
design: nothing reaches SGLang before every byte has arrived and passed the checks, see
updater.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from weight_sync.sidecar import errors
from weight_sync.sidecar.plan import PlannedBucket, TransferPlan
from weight_sync.sidecar.wire import WIRE_DTYPES

FLOATING = {torch.bfloat16, torch.float16, torch.float32}


@dataclass
class ReceiveStats:
    bytes: int = 0
    buckets: int = 0
    wait_s: float = 0.0  # blocked on the network
    stage_s: float = 0.0  # checking / quantizing
    total_s: float = 0.0


def allocate(nbytes: int, device: torch.device | str, shared: bool) -> torch.Tensor:
    """A flat uint8 buffer; on the CPU in shared memory when SGLang will read it (``shared``)."""
    buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    if shared and buf.device.type == "cpu":
        buf.share_memory_()
    return buf


def _view(buf: torch.Tensor, start: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
    return buf[start : start + nbytes].view(dtype).view(shape)


# A run checked by one aminmax is at most this long (a larger single tensor is one run of its own,
# as it always was): bounded reductions stay within 32-bit indexing (2^28 fp32 elements).
RUN_BYTES = 1 << 30


def _runs(entries) -> list[tuple[int, int, torch.dtype, tuple[str, ...]]]:
    """Maximal runs of floating tensors that lie back to back in the bucket with one dtype:
    ``(start, end, dtype, names)``. Bytes between two tensors (alignment padding, whatever the
    sender's slot held) never join a run, so a run's ``aminmax`` reads exactly its tensors' values
    and is non-finite exactly when one of them is."""
    runs: list[list] = []
    for e in sorted((e for e in entries if e.nbytes), key=lambda e: e.offset):
        dtype = WIRE_DTYPES[e.dtype]
        if dtype not in FLOATING:
            continue
        last = runs[-1] if runs else None
        if (
            last is not None
            and last[2] == dtype
            and last[1] == e.offset
            and e.offset + e.nbytes - last[0] <= RUN_BYTES
        ):
            last[1] = e.offset + e.nbytes
            last[3].append(e.name)
        else:
            runs.append([e.offset, e.offset + e.nbytes, dtype, [e.name]])
    return [(a, b, d, tuple(n)) for a, b, d, n in runs]


@dataclass
class BucketChecks:
    """Device-side finiteness of one staged bucket, not yet synchronized: ``ok[i]`` is True iff
    every value of the tensors ``groups[i]`` is finite (``ok`` is None when nothing is checked)."""

    groups: list[tuple[str, ...]]
    ok: torch.Tensor | None


def _run_checks(entries, src: torch.Tensor) -> BucketChecks:
    """One "all finite" flag per run (:func:`_runs`) of ``entries``, whose bytes are in ``src``.

    Why runs: a per-tensor check costs launches per tensor (~1,160 for Llama-3-8B's 291 tensors,
    several ms of host time per push) and many small reductions whose last partial waves use the
    SMs poorly while the next bucket is being received. A bf16 model is one run per bucket (its
    tensors are 256-byte multiples, so there is no padding between them; runs stop at
    ``RUN_BYTES``): one long ``aminmax`` at memory bandwidth per run, then three launches per bucket
    (stack, isfinite, all). NaN propagates through min/max and ±Inf is an extreme, so min and max
    decide, with no temporary (``isfinite(t).all()`` allocates a mask). The bytes read are the
    same as per tensor; only launches and tails go."""
    runs = _runs(entries)
    if not runs:
        return BucketChecks([], None)
    extremes = torch.stack([x for a, b, dtype, _ in runs for x in torch.aminmax(src[a:b].view(dtype))])
    return BucketChecks([names for *_, names in runs], torch.isfinite(extremes).view(-1, 2).all(dim=1))


def _bucket_views(entries, src: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(e.name, _view(src, e.offset, e.nbytes, WIRE_DTYPES[e.dtype], e.shape)) for e in entries]


def stage_bucket(bucket: PlannedBucket, src: torch.Tensor, staging: torch.Tensor) -> BucketChecks:
    """Stage bucket ``bucket`` whose bytes are in ``src``; return its device-side checks.

    In place (``fp8_fill`` is None): one flag per run of adjacent same-dtype tensors. FP8: the
    bucket's quantized weights in one grouped launch per source dtype and its kept tensors in one byte
    copy
    (:func:`weight_sync.fp8.fill_bucket_from`, planned once with the transfer plan), one flag per
    quantized weight (the kernel flags a block holding NaN/Inf and gives it a NaN scale) and one
    per run of kept tensors."""
    if bucket.fp8_fill is None:
        return _run_checks(bucket.entries, src)
    from weight_sync.fp8 import fill_bucket_from

    fill = bucket.fp8_fill
    quantized = set(fill.quantized)
    kept = _run_checks([e for e in bucket.entries if e.name not in quantized], src)
    bad = fill_bucket_from(staging, fill, src)
    oks = ([kept.ok] if kept.ok is not None else []) + ([bad == 0] if bad.numel() else [])
    return BucketChecks(kept.groups + [(n,) for n in fill.quantized], torch.cat(oks) if oks else None)


def _first_bad(bucket: PlannedBucket, checks: BucketChecks, ok: list[bool], src, staging) -> str:
    """The first tensor of ``bucket`` (in the bucket's order) with a non-finite value. A failed run
    is rescanned tensor by tensor from bytes still in place: buckets received in place are never
    overwritten, and in a ring bucket a run's tensors are kept ones, whose staged copies are checked."""
    bad: set[str] = set()
    for names, fine in zip(checks.groups, ok, strict=True):
        if fine:
            continue
        if len(names) == 1:
            bad.update(names)
            continue
        wanted = set(names)
        if bucket.fp8_plan is None:
            views = _bucket_views([e for e in bucket.entries if e.name in wanted], src)
        else:
            views = [
                (e.source, _view(staging, e.start_idx, e.numel, e.dtype, e.shape))
                for e in bucket.fp8_plan.entries
                if e.source in wanted
            ]
        bad.update(n for n, t in views if not bool(torch.isfinite(t).all()))
    return next(e.name for e in sorted(bucket.entries, key=lambda e: e.offset) if e.name in bad)


def _transfer_error(exc: BaseException, k: int) -> errors.SidecarError:
    text = str(exc)
    cls = errors.TransferTimeout if "timed out" in text.lower() or "timeout" in text.lower() else None
    cls = cls or errors.TransferFailed
    return cls(
        f"receiving bucket {k} failed: {text.splitlines()[0] if text else type(exc).__name__}; "
        "nothing was applied (the server keeps its version)",
        stage="receive",
        bucket=k,
    )


def receive(
    plan: TransferPlan,
    staging: torch.Tensor,
    ring: list[torch.Tensor] | None,
    post: Callable[[torch.Tensor], object],
    *,
    on_bucket: Callable[[int], None] | None = None,
) -> ReceiveStats:
    """Receive every bucket of ``plan`` with ``post(dst) -> work`` (``work.wait()`` blocks/raises)."""
    stats = ReceiveStats()
    t0 = time.perf_counter()
    n = len(plan.buckets)

    def dst(k: int) -> torch.Tensor:
        b = plan.buckets[k]
        if b.staging_base is not None:
            return staging[b.staging_base : b.staging_base + b.nbytes]
        return ring[k % 2][: b.nbytes]

    def start(k: int):
        try:
            return post(dst(k))
        except Exception as exc:
            raise _transfer_error(exc, k) from exc

    # How many buckets are in flight while bucket k is waited for and staged. Direct: all of them.
    # Each lands in its own place of the staging buffer, so nothing orders receive k+2 after the
    # staging of k; posting it after (as the ring needs) would make the receive wait twice for no
    # reason: ProcessGroupNCCL makes a collective's stream wait for everything already queued on the
    # current stream (the checks of bucket k), and the host must first have launched those checks.
    # Posted up front, the receives run back to back whatever the host or the checks do, and the
    # checks overlap the next receives. (The trainer's NCCL broadcasts are queued up front as well:
    # its waits only order streams, so this adds no timeout exposure.) FP8: two (the ring).
    depth = n if plan.direct else 2
    checks: list[BucketChecks] = []
    works: dict[int, object] = {}
    posted = 0
    for k in range(n):
        while posted < min(n, k + depth):
            works[posted] = start(posted)
            posted += 1
        t = time.perf_counter()
        try:
            works.pop(k).wait()
        except Exception as exc:
            raise _transfer_error(exc, k) from exc
        stats.wait_s += time.perf_counter() - t
        t = time.perf_counter()
        checks.append(stage_bucket(plan.buckets[k], dst(k), staging))
        stats.stage_s += time.perf_counter() - t
        stats.bytes += plan.buckets[k].nbytes
        stats.buckets += 1
        if on_bucket is not None:
            on_bucket(k)
    # One host synchronization for the whole transfer; every bucket was received even if an early
    # one holds a NaN, so the trainer's broadcasts completed and the group stays usable.
    oks = [c.ok for c in checks if c.ok is not None]
    if oks and not bool(torch.cat(oks).all()):
        k = next(k for k, c in enumerate(checks) if c.ok is not None and not bool(c.ok.all()))
        name = _first_bad(plan.buckets[k], checks[k], checks[k].ok.tolist(), dst(k), staging)
        raise errors.NonFinite(
            f"{name}: non-finite value(s) (NaN/Inf) in bucket {k}; nothing was applied",
            stage="stage",
            bucket=k,
            tensor=name,
        )
    if staging.device.type == "cuda":
        torch.cuda.current_stream(staging.device).synchronize()
    stats.total_s = time.perf_counter() - t0
    return stats
