"""Serve the rollout/scoring API over HTTP (FastAPI/uvicorn) and gRPC in one process.

``python -m weight_sync.api.server --sglang-url URL --model-path DIR --http-port P --grpc-port Q``.
The weight-sync sidecar hosts the same routes and servicer next to its control API.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn
from fastapi import FastAPI

from weight_sync.api.grpc_service import add_services, mark_serving
from weight_sync.api.http_routes import install_error_handler, rollout_router
from weight_sync.api.rollout import Limits, RolloutCore


@dataclass(frozen=True)
class ApiSettings:
    sglang_url: str
    model_path: Path
    host: str
    http_port: int
    grpc_port: int


def limits_for(model_path: Path) -> Limits:
    """Vocabulary size and context length of the served checkpoint."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return Limits(vocab_size=config.vocab_size, context_length=config.max_position_embeddings)


def build_app(core: RolloutCore) -> FastAPI:
    app = FastAPI(title="truepolicy rollout API", version="1")
    install_error_handler(app)
    app.include_router(rollout_router(core))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


async def serve(settings: ApiSettings) -> None:
    core = RolloutCore(settings.sglang_url, limits_for(settings.model_path))
    server = grpc.aio.server()
    health_servicer = add_services(server, core)
    server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    await server.start()
    await mark_serving(health_servicer)
    config = uvicorn.Config(
        build_app(core), host=settings.host, port=settings.http_port, log_level="warning", lifespan="off"
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await server.stop(grace=5)
        await core.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sglang-url", required=True)
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    opts = parser.parse_args(argv)
    asyncio.run(
        serve(ApiSettings(opts.sglang_url, opts.model_path, opts.host, opts.http_port, opts.grpc_port))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
