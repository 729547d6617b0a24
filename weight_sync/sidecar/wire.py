"""What travels over HTTP between the trainer's client and the sidecar (pydantic models).

Only JSON travels over HTTP; tensors travel over the ``torch.distributed`` process group as raw
bytes in flat ``uint8`` buckets. A manifest describes every tensor of one version: its checkpoint
name (the name SGLang's ``load_weights`` accepts), shape, dtype, and where its bytes lie in which
bucket. Nothing here is ever unpickled.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
GROUP_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ALIGN = 256  # byte alignment of every tensor in a bucket (fp32 views need 4; 256 keeps rows wide)

# The dtypes a weight can travel in, by their torch name (``str(torch.bfloat16) == "torch.bfloat16"``).
WIRE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=WIRE_DTYPES[dtype]).element_size()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorEntry(_Strict):
    """One tensor: ``bucket[offset : offset + nbytes].view(dtype).reshape(shape)`` on arrival."""

    name: str = Field(min_length=1, max_length=512)
    shape: tuple[int, ...] = Field(max_length=8)
    dtype: str
    bucket: int = Field(ge=0)
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)

    @field_validator("shape")
    @classmethod
    def _non_negative(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 0 for s in shape):
            raise ValueError(f"negative dimension in shape {list(shape)}")
        return shape

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, dtype: str) -> str:
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(WIRE_DTYPES)}")
        return dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class Quantization(_Strict):
    """What the sidecar does to the received weights before SGLang gets them.

    ``none``: they go as received. ``fp8_block``: 2-D projection weights selected by
    :class:`weight_sync.fp8.Fp8BlockPolicy` (plus ``extra_keep`` rules) become 128x128 block FP8 with
    ``*.weight_scale_inv`` scales, for a server that serves the block-FP8 checkpoint.
    """

    method: Literal["none", "fp8_block"] = "none"
    extra_keep: tuple[str, ...] = Field(default=(), max_length=64)


class Manifest(_Strict):
    tensors: list[TensorEntry] = Field(min_length=1)
    buckets: list[int] = Field(min_length=1)  # the size in bytes of each bucket, in sending order
    quantization: Quantization = Quantization()

    @property
    def total_bytes(self) -> int:
        return sum(self.buckets)


class UpdateWeightsRequest(_Strict):
    """``POST /update_weights``: validate and prepare one transfer (nothing moves yet)."""

    version: str
    group_id: str
    manifest: Manifest

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not VERSION_RE.match(v):
            raise ValueError("version must be 1-128 characters of [A-Za-z0-9._:+-], starting alphanumeric")
        return v


class ConnectRequest(_Strict):
    """``POST /connect``: join the trainer's process group (rank 0 is the trainer)."""

    store_host: str = Field(min_length=1, max_length=255)
    store_port: int = Field(ge=1, le=65535)
    group_id: str
    rank: int = Field(ge=1)
    world_size: int = Field(ge=2, le=4096)
    backend: Literal["gloo", "nccl"]
    timeout_s: float = Field(default=120.0, gt=0, le=3600)

    @field_validator("group_id")
    @classmethod
    def _group_id(cls, v: str) -> str:
        if not GROUP_ID_RE.match(v):
            raise ValueError("group_id must be 1-64 characters of [A-Za-z0-9_-]")
        return v


class PreparedTransfer(BaseModel):
    transfer_id: str
    version: str
    state: str
    buckets: int
    total_bytes: int


class Timings(BaseModel):
    receive_s: float = 0.0  # first bucket posted -> last bucket staged (incl. checks, FP8)
    pause_s: float = 0.0  # generation paused (retract) ...
    load_s: float = 0.0  # ... SGLang loading the staged weights ...
    flush_s: float = 0.0  # ... prefix-cache flush + version tag ...
    paused_s: float = 0.0  # ... until generation continued: the window rollouts wait
    total_s: float = 0.0  # commit received -> done


class TransferResult(BaseModel):
    transfer_id: str
    version: str
    state: str  # "done" or "failed"
    current_version: str | None  # what the server serves after this transfer
    bytes: int = 0
    bandwidth_gbps: float = 0.0  # received bytes / receive_s, GB/s
    cache_flushed: bool | None = None
    timings: Timings = Timings()
    error: ErrorBody | None = None


class ErrorBody(BaseModel):
    error: str  # a stable code, e.g. "unknown_tensor"
    message: str
    stage: str | None = None  # validate / receive / stage / apply / restore
    bucket: int | None = None
    tensor: str | None = None
    restored: bool | None = None  # apply failures: whether the previous version was put back
    current_version: str | None = None


TransferResult.model_rebuild()


class VersionInfo(BaseModel):
    version: str | None  # the version the server serves (None: unknown, SGLang not reached)
    previous: str | None
    source: str  # "sidecar" (pushed by this sidecar) or "server" (found on the server at start)
    pushes: int
