"""Every error the sidecar reports, with its HTTP status and gRPC code: one table, one place.

The updater raises :class:`SidecarError` subclasses; the app turns each into its status code and an
:class:`~weight_sync.sidecar.wire.ErrorBody` (stable ``error`` code, message, and where it failed).
4xx: the request was refused and nothing changed. 5xx: something failed after it was accepted; the
body says whether the previous version was restored.
"""

from __future__ import annotations

import grpc

from weight_sync.sidecar.wire import ErrorBody

G = grpc.StatusCode


class SidecarError(Exception):
    status = 500
    grpc_code = G.INTERNAL
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        bucket: int | None = None,
        tensor: str | None = None,
        restored: bool | None = None,
        current_version: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.bucket = bucket
        self.tensor = tensor
        self.restored = restored
        self.current_version = current_version

    def body(self) -> ErrorBody:
        return ErrorBody(
            error=self.code,
            message=self.message,
            stage=self.stage,
            bucket=self.bucket,
            tensor=self.tensor,
            restored=self.restored,
            current_version=self.current_version,
        )


# --- 4xx: refused, nothing changed -------------------------------------------------------------
class BadRequest(SidecarError):
    status, grpc_code, code = 400, G.INVALID_ARGUMENT, "bad_request"


class Unauthorized(SidecarError):
    status, grpc_code, code = 401, G.UNAUTHENTICATED, "unauthorized"


class NotFound(SidecarError):
    status, grpc_code, code = 404, G.NOT_FOUND, "not_found"


class Conflict(SidecarError):
    """Another transfer holds the updater, or the transfer is not in the state the call needs."""

    status, grpc_code, code = 409, G.FAILED_PRECONDITION, "conflict"


class NotConnected(Conflict):
    """No process group with the trainer, or a different one than the manifest names."""

    code = "not_connected"


class TooLarge(SidecarError):
    status, grpc_code, code = 413, G.RESOURCE_EXHAUSTED, "too_large"


class ManifestError(SidecarError):
    """The manifest does not describe the served model (or is not self-consistent)."""

    status, grpc_code, code = 422, G.INVALID_ARGUMENT, "invalid_manifest"


class UnknownTensor(ManifestError):
    code = "unknown_tensor"


class MissingTensor(ManifestError):
    code = "missing_tensor"


class ShapeMismatch(ManifestError):
    code = "shape_mismatch"


class DtypeMismatch(ManifestError):
    code = "dtype_mismatch"


class BadLayout(ManifestError):
    code = "bad_layout"


class NonFinite(SidecarError):
    """A received weight holds NaN or Inf: the transfer is dropped before SGLang sees anything."""

    status, grpc_code, code = 422, G.INVALID_ARGUMENT, "non_finite_weight"


# --- 5xx: accepted, then failed ----------------------------------------------------------------
class TransferFailed(SidecarError):
    """The process group failed or timed out while receiving (e.g. the trainer died)."""

    status, grpc_code, code = 502, G.ABORTED, "transfer_failed"


class TransferTimeout(TransferFailed):
    status, grpc_code, code = 504, G.DEADLINE_EXCEEDED, "transfer_timeout"


class ServerError(SidecarError):
    """SGLang refused or failed a call while the update was applied."""

    status, grpc_code, code = 502, G.UNAVAILABLE, "sglang_error"


class CacheNotFlushed(ServerError):
    """SGLang kept its prefix cache (requests were waiting): serving the new weights would reuse KV
    computed with the old ones, so the previous version was put back. Retry, or see
    server_patches/serving.py."""

    status, grpc_code, code = 503, G.UNAVAILABLE, "prefix_cache_not_flushed"


class NotReady(SidecarError):
    status, grpc_code, code = 503, G.UNAVAILABLE, "not_ready"


def status_of(exc: BaseException) -> int:
    return exc.status if isinstance(exc, SidecarError) else 500
