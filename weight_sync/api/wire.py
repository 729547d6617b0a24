"""JSON wire types of the HTTP API (the gRPC ones are protos/truepolicy/v1/rollout.proto).

Logprobs travel as JSON numbers: an fp32 value converted to a double and printed as the shortest
decimal that round-trips it, so ``numpy.float32(value)`` on the client has the server's exact bits.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingIn(_Strict):
    temperature: float = Field(description="0 means greedy")
    max_new_tokens: int
    n: int = 1
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = Field(default=None, description="reproducible samples in any batch")
    ignore_eos: bool = False


class GenerateIn(_Strict):
    prompt_token_ids: list[int]
    sampling: SamplingIn


class TokenOut(_Strict):
    id: int
    logprob: float


class GenerateChunkOut(_Strict):
    sample_index: int
    tokens: list[TokenOut]
    finish_reason: str | None
    weight_version: str


class ScoreItemIn(_Strict):
    token_ids: list[int]
    start: int


class ScoreIn(_Strict):
    items: list[ScoreItemIn]


class ScoreResultOut(_Strict):
    logprobs: list[float]
    weight_version: str


class ScoreOut(_Strict):
    results: list[ScoreResultOut]


class ErrorOut(_Strict):
    error: str
    message: str
