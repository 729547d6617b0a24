"""The rollout/scoring core: validates requests and forwards them to the patched SGLang server.

``RolloutCore`` is the one object behind both transports (``weight_sync.api.grpc_service`` and
``weight_sync.api.http_routes``). Logprobs are the fp32 values SGLang returned (JSON carries the
exact value of an fp32 as the shortest decimal that round-trips the double it converts to), each
result tagged with the weight version that computed it (per token, as the plugin's
``weight_version_per_token`` patch reports it).

Score batching: concurrent ``score`` calls are coalesced by ``ScoreBatcher``, continuous-batching
style with no timers: while one batch is at the server, new items queue; when it returns, everything
queued goes out as the next batch.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from server_patches.serving import WEIGHT_VERSION_KEY
from weight_sync.api.errors import ApiError, ErrorKind, invalid


@dataclass(frozen=True)
class Sampling:
    temperature: float
    max_new_tokens: int
    n: int = 1
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class GeneratedChunk:
    sample_index: int
    tokens: list[tuple[int, float]]  # (token id, fp32 logprob)
    finish_reason: str | None  # "length" | "stop" | "abort" on a sample's last chunk
    weight_version: str


@dataclass(frozen=True)
class ScoreItem:
    token_ids: list[int]
    start: int


@dataclass(frozen=True)
class ScoreResult:
    logprobs: list[float]
    weight_version: str


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    context_length: int  # prompt + generated tokens, and a scored sequence's length
    max_score_items: int = 1024
    max_score_tokens: int = 1 << 20  # total tokens of one Score call
    max_samples: int = 64


def limits_for(model_path: str) -> Limits:
    """Vocabulary size and context length of the checkpoint the server runs."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return Limits(vocab_size=config.vocab_size, context_length=config.max_position_embeddings)


SCORE_BATCHES_IN_FLIGHT = 4  # see ScoreBatcher


def _token_versions(meta: dict, count: int) -> list[str]:
    """Per output token, the weight version that computed it (the plugin's ``weight_version_per_token``
    patch; SGLang's own ``meta_info["weight_version"]`` is read when the chunk is processed, which can
    be after an update). ``count``: the number of output tokens SGLang reported."""
    versions = meta.get(WEIGHT_VERSION_KEY)
    if not isinstance(versions, list) or len(versions) != count:
        raise ApiError(
            ErrorKind.INTERNAL,
            f"SGLang reported no per-token weight versions ({WEIGHT_VERSION_KEY!r}): is the truepolicy "
            "plugin's weight_version_per_token patch active on the server?",
        )
    return [str(v) for v in versions]


class ScoreBatcher:
    """Coalesce concurrent score calls into batches, with up to ``max_in_flight`` batches at the server.

    A call is sent at once while a slot is free; calls that arrive while every slot is taken wait and
    go out together in the next free slot. One slot alone would leave SGLang idle between a batch's
    reply and the next send (the reply's trip, parsing, the next request's trip): measured on an H200,
    a single slot scored at 0.89 of calling SGLang directly."""

    def __init__(
        self,
        send: Callable[[list[ScoreItem]], Awaitable[list[ScoreResult]]],
        max_in_flight: int = SCORE_BATCHES_IN_FLIGHT,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._send = send
        self.max_in_flight = max_in_flight
        self._pending: list[tuple[list[ScoreItem], asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()  # the batches at the server (strong references)
        self.batches_sent = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def submit(self, items: list[ScoreItem]) -> list[ScoreResult]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((items, future))
        self._launch()
        return await future

    def _launch(self) -> None:
        while self._pending and len(self._tasks) < self.max_in_flight:
            batch, self._pending = self._pending, []
            self.batches_sent += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._launch()

    async def _run(self, batch: list[tuple[list[ScoreItem], asyncio.Future]]) -> None:
        flat = [item for items, _ in batch for item in items]
        try:
            results = await self._send(flat)
        except Exception as exc:  # each caller gets the failure of its batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        offset = 0
        for items, future in batch:
            if not future.done():
                future.set_result(results[offset : offset + len(items)])
            offset += len(items)


def _check_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"{what}: token id {bad} is outside the vocabulary [0, {vocab_size})")


class RolloutCore:
    def __init__(
        self,
        sglang_url: str,
        limits: Callable[[], Limits],
        client: httpx.AsyncClient | None = None,
        score_batches_in_flight: int = SCORE_BATCHES_IN_FLIGHT,
    ) -> None:
        """``limits`` is called once, on the first request that needs them (the served model may
        not be known when the process starts); it raises ``ApiError`` while it cannot say."""
        self.sglang_url = sglang_url.rstrip("/")
        self._limits_source = limits
        self._limits: Limits | None = None
        self._client = client or httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0))
        self.batcher = ScoreBatcher(self._score_batch, score_batches_in_flight)

    @property
    def limits(self) -> Limits:
        if self._limits is None:
            self._limits = self._limits_source()
        return self._limits

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- validation ------------------------------------------------------------------------------

    def validate_generate(self, prompt: Sequence[int], sampling: Sampling) -> None:
        lim = self.limits
        if not prompt:
            raise invalid("prompt_token_ids is empty")
        _check_ids(prompt, lim.vocab_size, "prompt_token_ids")
        if sampling.max_new_tokens < 1:
            raise invalid("max_new_tokens must be at least 1")
        if len(prompt) + sampling.max_new_tokens > lim.context_length:
            raise invalid(
                f"too long: {len(prompt)} prompt + {sampling.max_new_tokens} new tokens exceed the "
                f"context length {lim.context_length}"
            )
        if not 1 <= sampling.n <= lim.max_samples:
            raise invalid(f"n must be in [1, {lim.max_samples}], got {sampling.n}")
        if not sampling.temperature >= 0.0:
            raise invalid(f"temperature must be >= 0, got {sampling.temperature}")
        if sampling.top_p is not None and not 0.0 < sampling.top_p <= 1.0:
            raise invalid(f"top_p must be in (0, 1], got {sampling.top_p}")
        if sampling.top_k is not None and sampling.top_k < 1:
            raise invalid(f"top_k must be at least 1, got {sampling.top_k}")
        if sampling.seed is not None and not 0 <= sampling.seed < 1 << 63:
            raise invalid("seed must be in [0, 2**63)")

    def validate_score(self, items: Sequence[ScoreItem]) -> None:
        lim = self.limits
        if not items:
            raise invalid("items is empty")
        if len(items) > lim.max_score_items:
            raise invalid(f"too many items: {len(items)} > {lim.max_score_items}")
        total = 0
        for i, item in enumerate(items):
            n = len(item.token_ids)
            if n < 2:
                raise invalid(f"items[{i}]: at least 2 token ids are needed to score one, got {n}")
            if n > lim.context_length:
                raise invalid(
                    f"items[{i}]: too long: {n} tokens exceed the context length {lim.context_length}"
                )
            if not 1 <= item.start < n:
                raise invalid(f"items[{i}]: start {item.start} out of range [1, {n})")
            _check_ids(item.token_ids, lim.vocab_size, f"items[{i}]")
            total += n
        if total > lim.max_score_tokens:
            raise invalid(f"too long: {total} tokens in one call exceed {lim.max_score_tokens}")

    # --- SGLang ----------------------------------------------------------------------------------

    def _sglang_sampling(self, s: Sampling) -> dict:
        params: dict = {"temperature": s.temperature, "max_new_tokens": s.max_new_tokens, "n": s.n}
        params["ignore_eos"] = s.ignore_eos
        if s.top_p is not None:
            params["top_p"] = s.top_p
        if s.top_k is not None:
            params["top_k"] = s.top_k
        if s.seed is not None:
            params["sampling_seed"] = s.seed
        return params

    async def _post(self, payload: dict) -> dict | list:
        try:
            resp = await self._client.post(f"{self.sglang_url}/generate", json=payload)
        except httpx.HTTPError as exc:
            raise ApiError(ErrorKind.UNAVAILABLE, f"SGLang unreachable: {exc}") from exc
        if resp.status_code != 200:
            raise ApiError(ErrorKind.UPSTREAM, f"SGLang /generate -> {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    async def generate(self, prompt: Sequence[int], sampling: Sampling) -> AsyncIterator[GeneratedChunk]:
        """Stream each sample's new tokens as SGLang produces them."""
        self.validate_generate(prompt, sampling)
        payload = {
            "input_ids": list(prompt),
            "sampling_params": self._sglang_sampling(sampling),
            "return_logprob": True,
            "stream": True,
        }
        sent: dict[int, int] = {}
        try:
            async with self._client.stream("POST", f"{self.sglang_url}/generate", json=payload) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    raise ApiError(
                        ErrorKind.UPSTREAM, f"SGLang /generate -> {resp.status_code}: {body[:300]}"
                    )
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    for chunk in self._chunks(json.loads(data), sent):
                        yield chunk
        except httpx.HTTPError as exc:
            raise ApiError(ErrorKind.UNAVAILABLE, f"SGLang unreachable: {exc}") from exc

    @staticmethod
    def _chunks(out: dict, sent: dict[int, int]) -> list[GeneratedChunk]:
        """The new tokens of one SGLang stream message, one chunk per weight version (an update can
        land between two tokens of one message); the finish reason goes on the last."""
        if "error" in out:
            raise ApiError(ErrorKind.UPSTREAM, f"SGLang: {out['error']}")
        meta = out["meta_info"]
        index = int(out.get("index", 0))
        entries = meta["output_token_logprobs"]  # cumulative for this sample
        versions = _token_versions(meta, len(entries))
        start = sent.get(index, 0)
        sent[index] = len(entries)
        finish = meta.get("finish_reason")
        reason = finish.get("type") if isinstance(finish, dict) else None
        chunks: list[GeneratedChunk] = []
        for i in range(start, len(entries)):
            if not chunks or chunks[-1].weight_version != versions[i]:
                chunks.append(GeneratedChunk(index, [], None, versions[i]))
            lp, tok, _ = entries[i]
            chunks[-1].tokens.append((int(tok), float(lp)))
        if reason is not None:
            if chunks:
                last = chunks.pop()
                chunks.append(GeneratedChunk(index, last.tokens, reason, last.weight_version))
            else:
                version = versions[-1] if versions else str(meta.get("weight_version", ""))
                chunks.append(GeneratedChunk(index, [], reason, version))
        return chunks

    async def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        self.validate_score(items)
        return await self.batcher.submit(list(items))

    def _reported_ids(self, ids: Sequence[int]) -> list[int]:
        """The token ids SGLang 0.5.15 reports beside prompt logprobs for ``ids``.

        Its ``LogprobResultProcessor`` replaces every id ``>= vocab_size - 1`` by 0 in the report
        (meant for multimodal hash placeholders; the last real vocabulary id is caught too). The
        logprob itself is computed for the right id (``schedule_batch`` clamps to ``vocab_size - 1``),
        so only the reported id is compared this way.
        """
        last = self.limits.vocab_size - 1
        return [t if t < last else 0 for t in ids]

    async def _score_batch(self, items: list[ScoreItem]) -> list[ScoreResult]:
        payload = {
            "input_ids": [it.token_ids for it in items],
            # One (discarded) greedy token: sampled from the prefill's last logits (no extra forward),
            # it carries the version of the weights that computed the prompt logprobs.
            "sampling_params": [{"max_new_tokens": 1, "temperature": 0.0} for _ in items],
            "return_logprob": True,
            # SGLang's first returned prompt logprob is always None (it would need the token before
            # it): ask from start - 1 and drop that entry.
            "logprob_start_len": [it.start - 1 for it in items],
        }
        outputs = await self._post(payload)
        results = []
        for item, out in zip(items, outputs, strict=True):
            entries = out["meta_info"]["input_token_logprobs"][1:]
            ids = [tok for _, tok, _ in entries]
            if ids != self._reported_ids(item.token_ids[item.start :]) or any(
                lp is None for lp, _, _ in entries
            ):
                raise ApiError(ErrorKind.INTERNAL, "SGLang scored other tokens than requested")
            results.append(
                ScoreResult(
                    logprobs=[float(lp) for lp, _, _ in entries],
                    weight_version=_token_versions(out["meta_info"], 1)[0],
                )
            )
        return results
