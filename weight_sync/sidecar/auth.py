"""Bearer-token check shared by the sidecar's HTTP and gRPC APIs (mutating calls only)."""

from __future__ import annotations

import hmac

from weight_sync.sidecar import errors


def check_bearer(header: str | None, token: str | None) -> None:
    """Raise :class:`errors.Unauthorized` unless ``header`` is ``Bearer <token>`` (no token: open)."""
    if token is None:
        return
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise errors.Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise errors.Unauthorized("wrong bearer token")
