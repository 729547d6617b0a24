"""The sidecar's HTTP API: a thin FastAPI layer over :class:`~weight_sync.sidecar.updater.Updater`.

Read-only (no token): ``GET /health``, ``/ready``, ``/version``, ``/metrics``, ``/model``,
``/update_weights/{id}``. Mutating (``Authorization: Bearer <token>``): ``POST /connect``,
``/update_weights``, ``/update_weights/{id}/commit``, ``/update_weights/{id}/cancel``.
Bodies are JSON only (never pickle), capped at ``max_request_bytes`` before they are parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from weight_sync.sidecar import errors
from weight_sync.sidecar.auth import check_bearer
from weight_sync.sidecar.updater import Updater
from weight_sync.sidecar.wire import ConnectRequest, UpdateWeightsRequest

log = logging.getLogger("truepolicy.sidecar")
ATTACH_RETRY_S = 2.0


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit`` bytes (declared or streamed), before parsing."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._reject(send, int(value))
        seen = 0
        rejected = False

        async def limited():
            nonlocal seen, rejected
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not rejected:
                    rejected = True
                    await self._reject(send, seen)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not rejected:  # the 413 went out already: drop whatever the app answers
                await send(message)

        await self.app(scope, limited, guarded_send)

    async def _reject(self, send, size: int):
        body = errors.TooLarge(f"request body of {size}+ bytes; the limit is {self.limit}").body()
        raw = body.model_dump_json().encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": raw})


def _error_response(exc: errors.SidecarError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.body().model_dump(exclude_none=True))


def create_app(updater: Updater, *, attach_in_background: bool = True) -> FastAPI:
    settings = updater.settings
    stop = threading.Event()

    def attach_loop():
        while not stop.is_set():
            try:
                updater.attach()
                return
            except errors.SidecarError as exc:
                log.info("waiting for SGLang: %s", exc.message)
            stop.wait(ATTACH_RETRY_S)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = None
        if attach_in_background:
            thread = threading.Thread(target=attach_loop, name="attach", daemon=True)
            thread.start()
        yield
        stop.set()

    app = FastAPI(title="truepolicy weight-sync sidecar", lifespan=lifespan, docs_url=None, redoc_url=None)

    def authorized(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), settings.token)

    auth = [Depends(authorized)]

    @app.exception_handler(errors.SidecarError)
    async def _sidecar_error(request, exc: errors.SidecarError):
        if exc.status >= 500:
            log.error("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        updater.metrics.failures.labels(error="invalid_request").inc()
        problems = [
            f"{'.'.join(str(x) for x in e.get('loc', ())[1:])}: {e.get('msg')}" for e in exc.errors()[:10]
        ]
        body = {"error": "invalid_request", "message": "; ".join(problems) or "invalid request body"}
        return JSONResponse(status_code=422, content=json.loads(json.dumps(body, default=str)))

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/ready")
    def ready():
        ok, reason = updater.ready()
        updater.metrics.ready.set(1 if ok else 0)
        version = updater.version_info().version
        return JSONResponse(
            status_code=200 if ok else 503, content={"ready": ok, "reason": reason, "version": version}
        )

    @app.get("/version")
    def version():
        return updater.version_info().model_dump()

    @app.get("/metrics")
    def metrics():
        return Response(updater.metrics.render(), media_type=updater.metrics.content_type)

    @app.get("/model")
    def model():
        served = updater.served_model()
        return {
            "model_path": served.model_path,
            "tensors": {n: {"shape": list(s.shape), "dtype": s.dtype} for n, s in served.tensors.items()},
        }

    @app.post("/connect", dependencies=auth)
    def connect(req: ConnectRequest):
        return updater.connect(req)

    @app.post("/update_weights", dependencies=auth)
    def update_weights(req: UpdateWeightsRequest):
        return updater.prepare(req).model_dump()

    @app.post("/update_weights/{transfer_id}/commit", dependencies=auth)
    async def commit(transfer_id: str):
        # The transfer runs to its end even if the caller goes away (a dead trainer must not leave
        # a half-done update behind): it runs in a thread the request only waits for.
        result = await asyncio.shield(asyncio.to_thread(updater.commit, transfer_id))
        return result.model_dump()

    @app.post("/update_weights/{transfer_id}/cancel", dependencies=auth)
    def cancel(transfer_id: str):
        return updater.cancel(transfer_id)

    @app.get("/update_weights")
    def last_transfer():
        return updater.last_result().model_dump()

    @app.get("/update_weights/{transfer_id}")
    def transfer(transfer_id: str):
        return updater.result(transfer_id).model_dump()

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    return app
