"""gRPC transport of the sidecar's control API (``truepolicy.v1.WeightSyncService``).

A thin servicer over the same :class:`~weight_sync.sidecar.updater.Updater` as the HTTP app: proto
messages become the pydantic wire models (so both transports validate alike), updater errors become
their gRPC code from ``errors.py`` with the stable error code in the trailing metadata
``truepolicy-error``. The updater's calls block (a commit waits for the whole transfer), so they run
in worker threads; a commit runs to its end even if the caller goes away, as over HTTP.
"""

from __future__ import annotations

import asyncio

from pydantic import ValidationError

from truepolicy.v1 import weight_sync_pb2 as pb
from truepolicy.v1 import weight_sync_pb2_grpc as pb_grpc
from weight_sync.sidecar import errors
from weight_sync.sidecar.auth import check_bearer
from weight_sync.sidecar.updater import Updater
from weight_sync.sidecar.wire import ConnectRequest, TransferResult, UpdateWeightsRequest

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WeightSyncService"].full_name
ERROR_METADATA_KEY = "truepolicy-error"
DEFAULT_CONNECT_TIMEOUT_S = 120.0

_BACKENDS = {pb.BACKEND_GLOO: "gloo", pb.BACKEND_NCCL: "nccl"}
_DTYPES = {
    pb.DTYPE_BFLOAT16: "bfloat16", pb.DTYPE_FLOAT16: "float16", pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT8_E4M3FN: "float8_e4m3fn", pb.DTYPE_INT64: "int64", pb.DTYPE_INT32: "int32",
    pb.DTYPE_UINT8: "uint8", pb.DTYPE_BOOL: "bool",
}  # fmt: skip
_QUANTIZATION = {
    pb.QUANTIZATION_METHOD_UNSPECIFIED: "none",
    pb.QUANTIZATION_METHOD_NONE: "none",
    pb.QUANTIZATION_METHOD_FP8_BLOCK: "fp8_block",
}


def _enum(table: dict, value: int, field: str) -> str:
    if value not in table:
        raise errors.BadRequest(f"{field} must be set to a known value, got {value}")
    return table[value]


def connect_from_proto(m: pb.ConnectRequest) -> ConnectRequest:
    return ConnectRequest(
        store_host=m.store_host, store_port=m.store_port, group_id=m.group_id, rank=m.rank,
        world_size=m.world_size, backend=_enum(_BACKENDS, m.backend, "backend"),
        timeout_s=m.timeout_s if m.timeout_s > 0 else DEFAULT_CONNECT_TIMEOUT_S,
    )  # fmt: skip


def update_from_proto(m: pb.UpdateWeightsRequest) -> UpdateWeightsRequest:
    manifest = m.manifest
    return UpdateWeightsRequest(
        version=m.version,
        group_id=m.group_id,
        manifest={
            "tensors": [
                {
                    "name": t.name,
                    "shape": tuple(t.shape),
                    "bucket": t.bucket,
                    "offset": t.offset,
                    "nbytes": t.nbytes,
                    "dtype": _enum(_DTYPES, t.dtype, f"{t.name}.dtype"),
                }  # fmt: skip
                for t in manifest.tensors
            ],
            "buckets": list(manifest.buckets),
            "quantization": {
                "method": _enum(_QUANTIZATION, manifest.quantization.method, "quantization.method"),
                "extra_keep": tuple(manifest.quantization.extra_keep),
            },
        },
    )


def result_to_proto(r: TransferResult) -> pb.TransferResult:
    t = r.timings
    return pb.TransferResult(
        transfer_id=r.transfer_id, version=r.version, state=r.state, current_version=r.current_version or "",
        bytes=r.bytes, bandwidth_gbps=r.bandwidth_gbps, cache_flushed=bool(r.cache_flushed),
        timings=pb.Timings(
            receive_s=t.receive_s, pause_s=t.pause_s, load_s=t.load_s, flush_s=t.flush_s,
            paused_s=t.paused_s, total_s=t.total_s,
        ),
    )  # fmt: skip


class WeightSyncServicer(pb_grpc.WeightSyncServiceServicer):
    def __init__(self, updater: Updater) -> None:
        self.updater = updater

    async def _call(self, context, fn, *, mutating: bool, shield: bool = False):
        """Run ``fn`` in a thread; abort the RPC with the error's gRPC code if it raises."""
        try:
            if mutating:
                metadata = dict(context.invocation_metadata() or ())
                check_bearer(metadata.get("authorization"), self.updater.settings.token)
            work = asyncio.to_thread(fn)
            return await (asyncio.shield(work) if shield else work)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:10]
            )
            error = errors.BadRequest(problems or "invalid request")
        except errors.SidecarError as exc:
            error = exc
        context.set_trailing_metadata(((ERROR_METADATA_KEY, error.code),))
        await context.abort(error.grpc_code, error.message)

    async def Connect(self, request, context):  # noqa: N802 (gRPC method name)
        done = await self._call(
            context, lambda: self.updater.connect(connect_from_proto(request)), mutating=True
        )
        return pb.ConnectResponse(group_id=done["group_id"], rank=done["rank"])

    async def UpdateWeights(self, request, context):  # noqa: N802
        prepared = await self._call(
            context, lambda: self.updater.prepare(update_from_proto(request)), mutating=True
        )
        return pb.PreparedTransfer(
            transfer_id=prepared.transfer_id, version=prepared.version, state=prepared.state,
            buckets=prepared.buckets, total_bytes=prepared.total_bytes,
        )  # fmt: skip

    async def CommitUpdate(self, request, context):  # noqa: N802
        result = await self._call(
            context, lambda: self.updater.commit(request.transfer_id), mutating=True, shield=True
        )
        return result_to_proto(result)

    async def CancelUpdate(self, request, context):  # noqa: N802
        await self._call(context, lambda: self.updater.cancel(request.transfer_id), mutating=True)
        return pb.CancelUpdateResponse(transfer_id=request.transfer_id)

    async def GetVersion(self, request, context):  # noqa: N802
        info = await self._call(context, self.updater.version_info, mutating=False)
        return pb.VersionInfo(
            version=info.version or "", previous=info.previous or "", source=info.source, pushes=info.pushes
        )
