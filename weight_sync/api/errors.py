"""API errors and their status codes: the one place where failures become HTTP and gRPC statuses."""

from __future__ import annotations

from enum import Enum

import grpc


class ErrorKind(Enum):
    INVALID_ARGUMENT = (400, grpc.StatusCode.INVALID_ARGUMENT)
    UNAUTHENTICATED = (401, grpc.StatusCode.UNAUTHENTICATED)
    PERMISSION_DENIED = (403, grpc.StatusCode.PERMISSION_DENIED)
    NOT_FOUND = (404, grpc.StatusCode.NOT_FOUND)
    CONFLICT = (409, grpc.StatusCode.ABORTED)
    PAYLOAD_TOO_LARGE = (413, grpc.StatusCode.RESOURCE_EXHAUSTED)
    UNAVAILABLE = (503, grpc.StatusCode.UNAVAILABLE)
    UPSTREAM = (502, grpc.StatusCode.UNAVAILABLE)
    INTERNAL = (500, grpc.StatusCode.INTERNAL)

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[1]


class ApiError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def invalid(message: str) -> ApiError:
    return ApiError(ErrorKind.INVALID_ARGUMENT, message)
