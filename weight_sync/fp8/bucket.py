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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from weight_sync.fp8.block_quant import check_finite_scales, fp8_block_quant
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
