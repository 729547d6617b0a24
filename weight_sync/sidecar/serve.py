"""Run the sidecar's two transports in one process: the HTTP app and the gRPC server.

HTTP (FastAPI on uvicorn, ``--http-port``): the control API (``app.py``) and the rollout/scoring
routes under ``/v1`` (``weight_sync.api.http_routes``). gRPC (``--grpc-port``):
``truepolicy.v1.RolloutService``, ``truepolicy.v1.WeightSyncService``, standard health checking and
reflection. One :class:`Updater` and one :class:`RolloutCore` behind both, one event loop.
"""

from __future__ import annotations

import grpc
import uvicorn
from fastapi import FastAPI

from truepolicy.v1 import weight_sync_pb2_grpc
from weight_sync.api.errors import ApiError, ErrorKind
from weight_sync.api.grpc_service import SERVICE_NAME as ROLLOUT_SERVICE
from weight_sync.api.grpc_service import add_services, mark_serving
from weight_sync.api.http_routes import install_error_handler, rollout_router
from weight_sync.api.rollout import Limits, RolloutCore, limits_for
from weight_sync.sidecar import errors
from weight_sync.sidecar.app import create_app
from weight_sync.sidecar.grpc_control import SERVICE_NAME as CONTROL_SERVICE
from weight_sync.sidecar.grpc_control import WeightSyncServicer
from weight_sync.sidecar.settings import Settings
from weight_sync.sidecar.updater import Updater

GRPC_GRACE_S = 5.0
# Score requests carry token ids; 64 MiB bounds one message (a million tokens is ~5 MB).
GRPC_MAX_MESSAGE_BYTES = 64 << 20


def served_limits(updater: Updater) -> Limits:
    """The served model's limits, once the updater knows which model SGLang serves."""
    try:
        return limits_for(updater.served_model().model_path)
    except errors.SidecarError as exc:
        raise ApiError(ErrorKind.UNAVAILABLE, f"the served model is not known yet: {exc.message}") from exc


def build_http_app(updater: Updater, core: RolloutCore) -> FastAPI:
    app = create_app(updater)
    install_error_handler(app)
    app.include_router(rollout_router(core))
    return app


def build_grpc_server(updater: Updater, core: RolloutCore, settings: Settings):
    """(server, health servicer); the server is bound to ``settings.grpc_port``, not started."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
        ]
    )
    weight_sync_pb2_grpc.add_WeightSyncServiceServicer_to_server(WeightSyncServicer(updater), server)
    health_servicer = add_services(server, core, other_services=(CONTROL_SERVICE,))
    server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")  # raises if the port is taken
    return server, health_servicer


async def serve(settings: Settings, log_level: str) -> None:
    updater = Updater(settings)
    core = RolloutCore(
        settings.sglang_url,
        lambda: served_limits(updater),
        score_batches_in_flight=settings.score_batches_in_flight,
    )
    grpc_server, health_servicer = build_grpc_server(updater, core, settings)
    config = uvicorn.Config(
        build_http_app(updater, core),
        host=settings.host,
        port=settings.http_port,
        log_level=log_level,
        access_log=log_level == "debug",
        timeout_graceful_shutdown=5,
    )
    await grpc_server.start()
    await mark_serving(health_servicer, (ROLLOUT_SERVICE, CONTROL_SERVICE))
    try:
        await uvicorn.Server(config).serve()
    finally:
        await grpc_server.stop(grace=GRPC_GRACE_S)
        await core.aclose()
