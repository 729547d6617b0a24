"""Typed Python clients of the rollout/scoring API: gRPC (``RolloutGrpcClient``) and HTTP
(``RolloutHttpClient``), with one interface and the core's data types."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence

import grpc
import requests

from truepolicy.v1 import rollout_pb2, rollout_pb2_grpc
from weight_sync.api.rollout import GeneratedChunk, Sampling, ScoreItem, ScoreResult

_FINISH = {
    rollout_pb2.FINISH_REASON_UNSPECIFIED: None,
    rollout_pb2.FINISH_REASON_LENGTH: "length",
    rollout_pb2.FINISH_REASON_STOP: "stop",
    rollout_pb2.FINISH_REASON_ABORT: "abort",
}


class RolloutApiError(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _sampling_proto(s: Sampling) -> rollout_pb2.SamplingParams:
    proto = rollout_pb2.SamplingParams(
        temperature=s.temperature, max_new_tokens=s.max_new_tokens, n=s.n, ignore_eos=s.ignore_eos
    )
    if s.top_p is not None:
        proto.top_p = s.top_p
    if s.top_k is not None:
        proto.top_k = s.top_k
    if s.seed is not None:
        proto.seed = s.seed
    return proto


class RolloutGrpcClient:
    def __init__(self, target: str, timeout: float = 600.0) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = rollout_pb2_grpc.RolloutServiceStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[GeneratedChunk]:
        request = rollout_pb2.GenerateRequest(
            prompt_token_ids=list(prompt), sampling=_sampling_proto(sampling)
        )
        try:
            for r in self._stub.Generate(request, timeout=self.timeout):
                yield GeneratedChunk(
                    sample_index=r.sample_index,
                    tokens=[(t.id, t.logprob) for t in r.tokens],
                    finish_reason=_FINISH[r.finish_reason],
                    weight_version=r.weight_version,
                )
        except grpc.RpcError as exc:
            raise RolloutApiError(exc.code().name, exc.details()) from exc

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        request = rollout_pb2.ScoreRequest(
            items=[rollout_pb2.ScoreItem(token_ids=i.token_ids, start=i.start) for i in items]
        )
        try:
            response = self._stub.Score(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise RolloutApiError(exc.code().name, exc.details()) from exc
        return [
            ScoreResult(logprobs=list(r.logprobs), weight_version=r.weight_version) for r in response.results
        ]


class RolloutHttpClient:
    def __init__(self, base_url: str, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    @staticmethod
    def _raise(resp: requests.Response) -> None:
        if resp.status_code != 200:
            try:
                body = resp.json()
                raise RolloutApiError(
                    body.get("error", str(resp.status_code)), body.get("message", resp.text)
                )
            except ValueError:
                raise RolloutApiError(str(resp.status_code), resp.text) from None

    def generate(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[GeneratedChunk]:
        body = {"prompt_token_ids": list(prompt), "sampling": dataclasses.asdict(sampling)}
        with requests.post(
            f"{self.base_url}/v1/generate", json=body, stream=True, timeout=self.timeout
        ) as resp:
            self._raise(resp)
            for line in resp.iter_lines():
                if not line:
                    continue
                out = json.loads(line)
                if "error" in out:
                    raise RolloutApiError(out["error"], out["message"])
                yield GeneratedChunk(
                    sample_index=out["sample_index"],
                    tokens=[(t["id"], t["logprob"]) for t in out["tokens"]],
                    finish_reason=out["finish_reason"],
                    weight_version=out["weight_version"],
                )

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        body = {"items": [{"token_ids": i.token_ids, "start": i.start} for i in items]}
        resp = requests.post(f"{self.base_url}/v1/score", json=body, timeout=self.timeout)
        self._raise(resp)
        return [
            ScoreResult(logprobs=r["logprobs"], weight_version=r["weight_version"])
            for r in resp.json()["results"]
        ]
