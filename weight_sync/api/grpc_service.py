"""gRPC transport of the rollout/scoring API: a thin servicer over ``RolloutCore``, with the
standard health-checking and reflection services."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from truepolicy.v1 import rollout_pb2, rollout_pb2_grpc
from weight_sync.api.errors import ApiError
from weight_sync.api.rollout import RolloutCore, Sampling, ScoreItem

FINISH = {
    None: rollout_pb2.FINISH_REASON_UNSPECIFIED,
    "length": rollout_pb2.FINISH_REASON_LENGTH,
    "stop": rollout_pb2.FINISH_REASON_STOP,
    "abort": rollout_pb2.FINISH_REASON_ABORT,
}
SERVICE_NAME = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name


def sampling_from_proto(s: rollout_pb2.SamplingParams) -> Sampling:
    return Sampling(
        temperature=s.temperature,
        max_new_tokens=s.max_new_tokens,
        n=s.n or 1,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        seed=s.seed if s.HasField("seed") else None,
        ignore_eos=s.ignore_eos,
    )


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, core: RolloutCore) -> None:
        self.core = core

    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        try:
            async for c in self.core.generate(
                list(request.prompt_token_ids), sampling_from_proto(request.sampling)
            ):
                yield rollout_pb2.GenerateResponse(
                    sample_index=c.sample_index,
                    tokens=[rollout_pb2.Token(id=t, logprob=lp) for t, lp in c.tokens],
                    finish_reason=FINISH.get(c.finish_reason, rollout_pb2.FINISH_REASON_STOP),
                    weight_version=c.weight_version,
                )
        except ApiError as exc:
            await context.abort(exc.kind.grpc_code, exc.message)

    async def Score(self, request, context):  # noqa: N802 (gRPC method name)
        items = [ScoreItem(token_ids=list(i.token_ids), start=i.start) for i in request.items]
        try:
            results = await self.core.score(items)
        except ApiError as exc:
            await context.abort(exc.kind.grpc_code, exc.message)
        return rollout_pb2.ScoreResponse(
            results=[
                rollout_pb2.ScoreResult(logprobs=r.logprobs, weight_version=r.weight_version) for r in results
            ]
        )


def add_services(
    server: grpc.aio.Server, core: RolloutCore, other_services: tuple[str, ...] = ()
) -> health.HealthServicer:
    """The rollout service plus health checking and reflection, which also cover ``other_services``
    (full names of services the caller added to ``server`` itself)."""
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        SERVICE_NAME,
        *other_services,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    return health_servicer


async def mark_serving(health_servicer, services: tuple[str, ...]) -> None:
    for name in ("", *services):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
