"""HTTP transport of the rollout/scoring API: a thin FastAPI router over ``RolloutCore``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from weight_sync.api import wire
from weight_sync.api.errors import ApiError
from weight_sync.api.rollout import RolloutCore, Sampling, ScoreItem


def sampling_from_wire(s: wire.SamplingIn) -> Sampling:
    return Sampling(
        temperature=s.temperature, max_new_tokens=s.max_new_tokens, n=s.n, top_p=s.top_p,
        top_k=s.top_k, seed=s.seed, ignore_eos=s.ignore_eos,
    )  # fmt: skip


def rollout_router(core: RolloutCore) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/score", response_model=wire.ScoreOut)
    async def score(body: wire.ScoreIn) -> wire.ScoreOut:
        results = await core.score([ScoreItem(token_ids=i.token_ids, start=i.start) for i in body.items])
        return wire.ScoreOut(
            results=[
                wire.ScoreResultOut(logprobs=r.logprobs, weight_version=r.weight_version) for r in results
            ]
        )

    @router.post("/generate", response_class=StreamingResponse)
    async def generate(body: wire.GenerateIn) -> StreamingResponse:
        sampling = sampling_from_wire(body.sampling)
        core.validate_generate(body.prompt_token_ids, sampling)  # errors before the stream starts

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for c in core.generate(body.prompt_token_ids, sampling):
                    out = wire.GenerateChunkOut(
                        sample_index=c.sample_index,
                        tokens=[wire.TokenOut(id=t, logprob=lp) for t, lp in c.tokens],
                        finish_reason=c.finish_reason,
                        weight_version=c.weight_version,
                    )
                    yield (out.model_dump_json() + "\n").encode()
            except ApiError as exc:  # mid-stream: the status is already sent; report in-band
                yield (
                    wire.ErrorOut(error=exc.kind.name, message=exc.message).model_dump_json() + "\n"
                ).encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return router


def install_error_handler(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        body = wire.ErrorOut(error=exc.kind.name, message=exc.message)
        return JSONResponse(status_code=exc.kind.http_status, content=body.model_dump())
