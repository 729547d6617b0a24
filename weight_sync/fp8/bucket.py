"""Quantize straight into a flat transfer bucket: one pass per weight, no temporary, no extra copy.

The sidecar ships weights in flat ``uint8`` buckets (one NCCL broadcast / one IPC handle per bucket).
:func:`plan_bucket` lays out every tensor the policy produces for a set of parameters at aligned
byte offsets; :func:`fill_bucket` runs the quantization kernel with its outputs pointed at those
offsets (views of the bucket), so the FP8 bytes and the fp32 scales are written where they travel.
Kept (bf16) tensors are copied in once, which they would be anyway.

The layout is SGLang's own flattened-bucket format (``sglang.srt.weight_sync.tensor_bucket``):
each entry has ``name, shape, dtype, start_idx, end_idx, numel`` in bytes of the uint8 bucket, and
SGLang rebuilds a tensor as ``bucket[start_idx:end_idx].view(dtype).reshape(shape)``; so a filled
bucket can go to ``update_weights_from_tensor(load_format="flattened_bucket")`` as it is
(:func:`sglang_metadata`). Entries start at multiples of ``align`` bytes (256 by default): ``view``
to fp32 needs 4-byte alignment, and aligned rows keep the kernel's stores full-width.

Non-finite weights: the kernel marks a block holding NaN/Inf with a NaN scale; :func:`fill_bucket`
checks every scale with one host synchronization at the end and raises
:class:`~weight_sync.fp8.block_quant.NonFiniteWeightError` naming the tensor and the first bad block.

From one flat source buffer (the sidecar's receive path: a bucket of bf16 weights lands in a ring
slot), :func:`plan_fill` + :func:`fill_bucket_from` do the same work with a handful of launches per
bucket instead of one or more per tensor: every groupable weight of a source dtype in one grouped
quantization launch (:mod:`weight_sync.fp8.block_quant_grouped`), the kept tensors in one
``_foreach_copy_`` of byte ranges, and per-weight non-finite flags left on the device for the
caller's single synchronization. The host time per bucket no longer grows with its tensor count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from weight_sync.fp8.block_quant import check_finite_scales, fp8_block_quant
from weight_sync.fp8.block_quant_grouped import (
    GroupedQuant,
    GroupedWeight,
    fp8_block_quant_grouped,
    groupable,
    plan_grouped,
)
from weight_sync.fp8.policy import DEFAULT_POLICY, Fp8BlockPolicy, TensorSpec

DEFAULT_ALIGN = 256


@dataclass(frozen=True)
class BucketEntry:
    """One tensor in the bucket (field names and meaning as SGLang's FlattenedTensorMetadata)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start_idx: int  # byte offset in the uint8 bucket
    end_idx: int  # start_idx + numel
    numel: int  # bytes
    source: str
    role: str  # "fp8_weight", "fp8_scale" or "passthrough"


@dataclass(frozen=True)
class BucketPlan:
    entries: tuple[BucketEntry, ...]
    nbytes: int
    align: int

    def sources(self) -> list[str]:
        return list(dict.fromkeys(e.source for e in self.entries))

    def by_source(self) -> dict[str, list[BucketEntry]]:
        out: dict[str, list[BucketEntry]] = {}
        for e in self.entries:
            out.setdefault(e.source, []).append(e)
        return out

    def allocate(self, device: torch.device | str) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, device=device)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def plan_bucket(
    named_params: Iterable[tuple[str, tuple[int, ...] | torch.Size, torch.dtype]],
    policy: Fp8BlockPolicy = DEFAULT_POLICY,
    *,
    align: int = DEFAULT_ALIGN,
    start: int = 0,
) -> BucketPlan:
    """Lay out what ``policy`` pushes for ``named_params`` (name, shape, source dtype) from ``start``."""
    if align <= 0 or align % 16:
        raise ValueError(f"align must be a positive multiple of 16 bytes, got {align}")
    offset = start
    entries = []
    specs: list[TensorSpec] = policy.plan(named_params)
    for spec in specs:
        offset = -(-offset // align) * align
        size = _nbytes(spec.shape, spec.dtype)
        entries.append(
            BucketEntry(
                spec.name, spec.shape, spec.dtype, offset, offset + size, size, spec.source, spec.role
            )
        )
        offset += size
    return BucketPlan(tuple(entries), offset, align)


def bucket_view(bucket: torch.Tensor, entry: BucketEntry) -> torch.Tensor:
    """The entry's tensor as a view of the bucket (no copy)."""
    return bucket[entry.start_idx : entry.end_idx].view(entry.dtype).view(entry.shape)


def fill_bucket(
    bucket: torch.Tensor,
    plan: BucketPlan,
    tensors: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
    *,
    check: bool = True,
) -> None:
    """Write every planned tensor into ``bucket``: quantized ones by the kernel, in place.

    ``tensors`` maps each source parameter name to its (bf16) tensor, on the bucket's device.
    """
    if bucket.dtype != torch.uint8 or bucket.dim() != 1 or not bucket.is_contiguous():
        raise ValueError("bucket must be a contiguous 1-D uint8 tensor")
    if bucket.numel() < plan.nbytes:
        raise ValueError(f"bucket holds {bucket.numel()} bytes, the plan needs {plan.nbytes}")
    get = tensors if callable(tensors) else tensors.__getitem__
    pending: list[tuple[str, torch.Tensor, tuple[int, int]]] = []
    for source, entries in plan.by_source().items():
        src = get(source)
        roles = {e.role: e for e in entries}
        if "fp8_weight" in roles:
            w_entry, s_entry = roles["fp8_weight"], roles["fp8_scale"]
            if tuple(src.shape) != w_entry.shape:
                raise ValueError(f"{source}: shape {list(src.shape)} != planned {list(w_entry.shape)}")
            q = bucket_view(bucket, w_entry)
            s = bucket_view(bucket, s_entry)
            fp8_block_quant(src, name=source, out=q, scale_out=s, check=False)
            pending.append((source, s, w_entry.shape))
        else:
            (entry,) = entries
            if tuple(src.shape) != entry.shape:
                raise ValueError(f"{source}: shape {list(src.shape)} != planned {list(entry.shape)}")
            bucket_view(bucket, entry).copy_(src)
    if check and pending:
        # One host synchronization for the whole bucket; name the culprit only on failure.
        ok = torch.stack([torch.isfinite(s).all() for _, s, _ in pending])
        if not bool(ok.all()):
            for source, s, shape in pending:
                check_finite_scales(source, s, shape)


@dataclass(frozen=True)
class SourceTensor:
    """Where a source tensor lies in a flat source buffer."""

    offset: int  # bytes
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class SingleQuant:
    """A weight the grouped launch cannot take (see ``groupable``): one launch of its own."""

    source: str
    src: SourceTensor
    weight: BucketEntry
    scale: BucketEntry


@dataclass(frozen=True)
class BucketFill:
    """How :func:`fill_bucket_from` fills a bucket plan from one source buffer (built once per plan)."""

    grouped: tuple[GroupedQuant, ...]  # one launch per source dtype
    single: tuple[SingleQuant, ...]
    copies: tuple[tuple[SourceTensor, BucketEntry], ...]  # kept tensors: byte copies
    quantized: tuple[str, ...]  # source names, in the order of fill_bucket_from's flags


def plan_fill(plan: BucketPlan, sources: Mapping[str, SourceTensor]) -> BucketFill:
    """Plan filling ``plan`` from a buffer holding its sources at ``sources`` (by source name)."""
    by_dtype: dict[torch.dtype, list[GroupedWeight]] = {}
    single: list[SingleQuant] = []
    copies: list[tuple[SourceTensor, BucketEntry]] = []
    for source, entries in plan.by_source().items():
        src = sources[source]
        roles = {e.role: e for e in entries}
        if "fp8_weight" in roles:
            w, sc = roles["fp8_weight"], roles["fp8_scale"]
            if tuple(src.shape) != w.shape:
                raise ValueError(f"{source}: shape {list(src.shape)} != planned {list(w.shape)}")
            if groupable(w.shape, src.dtype, src.offset, w.start_idx, sc.start_idx):
                by_dtype.setdefault(src.dtype, []).append(
                    GroupedWeight(source, w.shape, src.offset, w.start_idx, sc.start_idx)
                )
            else:
                single.append(SingleQuant(source, src, w, sc))
        else:
            (entry,) = entries
            if tuple(src.shape) != entry.shape or src.dtype != entry.dtype:
                raise ValueError(
                    f"{source}: {list(src.shape)} {src.dtype} != planned {list(entry.shape)} {entry.dtype}"
                )
            copies.append((src, entry))
    grouped = tuple(plan_grouped(ws, dtype) for dtype, ws in by_dtype.items())
    quantized = tuple(w.name for g in grouped for w in g.weights) + tuple(q.source for q in single)
    return BucketFill(grouped, tuple(single), tuple(copies), quantized)


def fill_bucket_from(bucket: torch.Tensor, fill: BucketFill, src: torch.Tensor) -> torch.Tensor:
    """Fill ``bucket`` from the flat uint8 buffer ``src`` as ``fill`` says; returns one ``int32`` flag
    per quantized weight (``fill.quantized`` order; 1: a block held NaN/Inf and has a NaN scale), on
    the device and not synchronized: the caller checks them (and may name the first bad block with
    :func:`~weight_sync.fp8.block_quant.check_finite_scales`)."""
    flags = [fp8_block_quant_grouped(src, bucket, g) for g in fill.grouped]
    for q in fill.single:
        n = _nbytes(q.src.shape, q.src.dtype)
        w = src[q.src.offset : q.src.offset + n].view(q.src.dtype).view(q.src.shape)
        _, scale = fp8_block_quant(
            w,
            name=q.source,
            out=bucket_view(bucket, q.weight),
            scale_out=bucket_view(bucket, q.scale),
            check=False,
        )
        flags.append((~torch.isfinite(scale)).any().to(torch.int32).reshape(1))
    if fill.copies:
        torch._foreach_copy_(
            [bucket[e.start_idx : e.end_idx] for _, e in fill.copies],
            [src[s.offset : s.offset + e.numel] for s, e in fill.copies],
        )
    if not flags:
        return torch.zeros(0, dtype=torch.int32, device=bucket.device)
    return torch.cat(flags) if len(flags) > 1 else flags[0]


def sglang_metadata(plan: BucketPlan) -> list:
    """The plan as ``sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata`` objects."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    return [
        FlattenedTensorMetadata(
            name=e.name,
            shape=torch.Size(e.shape),
            dtype=e.dtype,
            start_idx=e.start_idx,
            end_idx=e.end_idx,
            numel=e.numel,
        )
        for e in plan.entries
    ]
