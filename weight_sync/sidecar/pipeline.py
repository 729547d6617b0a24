"""The receive pipeline: buckets arrive into bounded, reused buffers and are staged, bucket k being
checked (and FP8-quantized) while bucket k+1 is already being received.

- ``quantization: none``: each bucket is received straight into its place in the staging buffer
  (no copy at all); staging bucket k = checking every floating tensor of it for NaN/Inf.
- ``quantization: fp8_block``: buckets are received into a ring of two slots of the largest
  bucket's size; staging bucket k = quantizing its weights from slot k % 2 into the staging buffer
  with the FP8 kernel (:func:`weight_sync.fp8.fill_bucket`, which also rejects non-finite blocks),
  the others copied as they are.

Finiteness (NaN/Inf) is computed on the device per tensor as each bucket is staged and checked
with one host synchronization at the end: a bad tensor fails the transfer, named with its bucket,
after every bucket was received, so the trainer's broadcasts complete and the group stays usable.
Receive k+1 is posted before bucket k is staged, and k+2 (into k's ring slot) only after, so at
most two buckets are in flight and the ring slots are never overwritten while read. The staging
buffer holds the whole new version (the atomicity design: nothing reaches SGLang before every byte
has arrived and passed the checks, see updater.py).
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


def _finite_flags(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """A device-side "all finite" flag per floating tensor (no host sync).

    NaN propagates through min/max and ±Inf is an extreme, so one ``aminmax`` pass decides, with no
    temporary (``isfinite(t).all()`` allocates a mask and was ~30x slower on the CPU).
    """
    return [
        (n, torch.isfinite(torch.stack(torch.aminmax(t))).all())
        for n, t in named
        if t.dtype in FLOATING and t.numel()
    ]


def stage_bucket(
    bucket: PlannedBucket, src: torch.Tensor, staging: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    """Stage bucket ``bucket`` whose bytes are in ``src`` (FP8: quantize into ``staging``); return
    the finiteness flags of its tensors, still on the device."""
    views = [(e.name, _view(src, e.offset, e.nbytes, WIRE_DTYPES[e.dtype], e.shape)) for e in bucket.entries]
    if bucket.fp8_plan is None:
        return _finite_flags(views)
    from weight_sync.fp8 import fill_bucket

    quantized = {e.source for e in bucket.fp8_plan.entries if e.role == "fp8_weight"}
    flags = _finite_flags([(n, t) for n, t in views if n not in quantized])
    by_name = dict(views)
    fill_bucket(staging, bucket.fp8_plan, by_name.__getitem__, check=False)
    # The kernel gives a block holding NaN/Inf a NaN scale.
    for e in bucket.fp8_plan.entries:
        if e.role == "fp8_scale":
            scale = _view(staging, e.start_idx, e.numel, e.dtype, e.shape)
            flags.append((e.source, torch.isfinite(scale).all()))
    return flags


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

    checks: list[tuple[int, str, torch.Tensor]] = []
    works = {0: start(0)}
    for k in range(n):
        if k + 1 < n:
            works[k + 1] = start(k + 1)
        t = time.perf_counter()
        try:
            works.pop(k).wait()
        except Exception as exc:
            raise _transfer_error(exc, k) from exc
        stats.wait_s += time.perf_counter() - t
        t = time.perf_counter()
        checks += [(k, name, flag) for name, flag in stage_bucket(plan.buckets[k], dst(k), staging)]
        stats.stage_s += time.perf_counter() - t
        stats.bytes += plan.buckets[k].nbytes
        stats.buckets += 1
        if on_bucket is not None:
            on_bucket(k)
    # One host synchronization for the whole transfer; every bucket was received even if an early
    # one holds a NaN, so the trainer's broadcasts completed and the group stays usable.
    if checks and not bool(torch.stack([flag for _, _, flag in checks]).all()):
        k, name = next((k, name) for k, name, flag in checks if not bool(flag))
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
