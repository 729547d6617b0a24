"""The rollout/scoring API (issue 7): real SGLang CPU server with the plugin, real uvicorn and gRPC
servers on loopback ports, the typed clients. Logprobs must equal the trainer's bit for bit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import requests
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from parity import compute_logprobs, prepare_model
from parity.tiny_models import build_tiny_model, load_hf_model
from tests.conftest import SERVER_ARGS
from truepolicy.sglang_process import free_port, log_tail, running_server
from weight_sync.api.rollout import Sampling, ScoreBatcher, ScoreItem, ScoreResult
from weight_sync.rollout_client import RolloutApiError, RolloutGrpcClient, RolloutHttpClient

READY_TIMEOUT_S = 120.0


def _bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


class ApiServer:
    def __init__(self, sglang_url: str, model_path, log_path) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        argv = [
            sys.executable, "-m", "weight_sync.api.server", "--sglang-url", sglang_url,
            "--model-path", str(model_path), "--http-port", str(self.http_port),
            "--grpc-port", str(self.grpc_port),
        ]  # fmt: skip
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.target = f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log_tail(self.log_path)
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        with grpc.insecure_channel(self.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def api(tiny_qwen3, tmp_path_factory):
    logs = tmp_path_factory.mktemp("api-logs")
    with running_server(tiny_qwen3, logs / "sglang.log", extra_args=SERVER_ARGS) as sglang:
        server = ApiServer(sglang.url, tiny_qwen3, logs / "api.log")
        try:
            server.wait_ready()
            yield sglang, server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def trainer(tiny_qwen3):
    return prepare_model(load_hf_model(tiny_qwen3))


ITEMS = [
    ScoreItem(token_ids=[5, 17, 301, 42, 900, 3, 3, 77], start=1),
    ScoreItem(token_ids=[*range(200, 240)], start=25),
    ScoreItem(token_ids=[9, 8], start=1),
]


def _want(model, items):
    return [compute_logprobs(model, [i.token_ids], [i.start])[0] for i in items]


pytestmark_server = pytest.mark.server


def test_score_grpc_and_http_equal_the_trainer_bitwise(api, trainer):
    _, server = api
    want = _want(trainer, ITEMS)
    by_grpc = RolloutGrpcClient(server.target).score(ITEMS)
    by_http = RolloutHttpClient(server.url).score(ITEMS)
    for g, h, w in zip(by_grpc, by_http, want, strict=True):
        assert torch.equal(torch.tensor(g.logprobs, dtype=torch.float32), w), (g.logprobs, w.tolist())
        assert np.array_equal(_bits(h.logprobs), _bits(g.logprobs))  # JSON carried the exact fp32
        assert g.weight_version == h.weight_version == "default"


def test_json_carries_every_fp32_exactly():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 30,
            np.float32([1e-45, -3.4e38, 3.4028235e38, -0.0]),
        ]
    )
    parsed = json.loads(json.dumps([float(v) for v in values]))
    assert np.array_equal(_bits(parsed), values.view(np.uint32))


def test_generate_streams_tokens_whose_logprobs_are_the_trainers(api, trainer):
    _, server = api
    prompt = [4, 44, 444, 12, 13]
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=9, n=2, seed=7, ignore_eos=True)
    chunks = list(RolloutGrpcClient(server.target).generate(prompt, sampling))
    assert len(chunks) > 2  # streamed, not one reply
    by_sample: dict[int, list[tuple[int, float]]] = {0: [], 1: []}
    for c in chunks:
        by_sample[c.sample_index].extend(c.tokens)
        assert c.weight_version == "default"
    assert sorted(c.sample_index for c in chunks if c.finish_reason) == [0, 1]
    assert by_sample[0] != by_sample[1]
    for tokens in by_sample.values():
        assert len(tokens) == 9
        ids = [t for t, _ in tokens]
        (want,) = compute_logprobs(trainer, [prompt + ids], [len(prompt)], temperature=1.0)
        assert torch.equal(torch.tensor([lp for _, lp in tokens], dtype=torch.float32), want)
    http_chunks = list(RolloutHttpClient(server.url).generate(prompt, sampling))
    assert [t for c in http_chunks if c.sample_index == 0 for t in c.tokens] == by_sample[0]  # seeded


@pytest.mark.parametrize(
    "items,needle",
    [
        ([ScoreItem(token_ids=[1, 2, 99999], start=1)], "outside the vocabulary"),
        ([], "items is empty"),
        ([ScoreItem(token_ids=[1, 2, 3], start=3)], "start 3 out of range"),
        ([ScoreItem(token_ids=[1, 2, 3], start=0)], "start 0 out of range"),
        ([ScoreItem(token_ids=[1] * 5000, start=1)], "too long"),
    ],
)
def test_bad_score_requests_are_invalid_argument(api, items, needle):
    _, server = api
    with pytest.raises(RolloutApiError) as grpc_err:
        RolloutGrpcClient(server.target).score(items)
    assert grpc_err.value.code == "INVALID_ARGUMENT" and needle in grpc_err.value.message
    with pytest.raises(RolloutApiError) as http_err:
        RolloutHttpClient(server.url).score(items)
    assert http_err.value.code == "INVALID_ARGUMENT" and needle in http_err.value.message


@pytest.mark.parametrize(
    "prompt,sampling,needle",
    [
        ([], Sampling(temperature=0.0, max_new_tokens=4), "empty"),
        ([1, 5000], Sampling(temperature=0.0, max_new_tokens=4), "outside the vocabulary"),
        ([1, 2], Sampling(temperature=0.0, max_new_tokens=4000), "too long"),
        ([1, 2], Sampling(temperature=1.0, max_new_tokens=4, top_p=1.5), "top_p"),
    ],
)
def test_bad_generate_requests_are_invalid_argument(api, prompt, sampling, needle):
    _, server = api
    with pytest.raises(RolloutApiError) as grpc_err:
        list(RolloutGrpcClient(server.target).generate(prompt, sampling))
    assert grpc_err.value.code == "INVALID_ARGUMENT" and needle in grpc_err.value.message
    resp = requests.post(
        f"{server.url}/v1/generate",
        json={"prompt_token_ids": prompt, "sampling": vars(sampling)},
        timeout=30,
    )
    assert resp.status_code == 400 and needle in resp.json()["message"]


def test_health_and_reflection(api):
    _, server = api
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="truepolicy.v1.RolloutService"), timeout=10
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in reply.list_services_response.service}
        assert "truepolicy.v1.RolloutService" in names and "grpc.health.v1.Health" in names


def test_version_tags_follow_a_weight_update(api, trainer, model_cache):
    sglang, server = api
    client = RolloutGrpcClient(server.target)
    before = client.score(ITEMS[:1])[0]
    new_path = build_tiny_model("qwen3", seed=1, cache_dir=model_cache)
    resp = requests.post(
        f"{sglang.url}/update_weights_from_disk",
        json={"model_path": str(new_path), "weight_version": "v2"},
        timeout=120,
    )
    assert resp.status_code == 200 and resp.json()["success"], resp.text
    after = client.score(ITEMS[:1])[0]
    assert before.weight_version == "default" and after.weight_version == "v2"
    new_trainer = prepare_model(load_hf_model(new_path))
    assert torch.equal(torch.tensor(after.logprobs, dtype=torch.float32), _want(new_trainer, ITEMS[:1])[0])
    assert not torch.equal(torch.tensor(after.logprobs), torch.tensor(before.logprobs))
    chunks = list(client.generate([1, 2, 3], Sampling(temperature=0.0, max_new_tokens=3)))
    assert {c.weight_version for c in chunks} == {"v2"}


def test_concurrent_scores_are_coalesced_into_batches():
    async def scenario():
        gate = asyncio.Event()
        seen: list[int] = []

        async def send(items):
            seen.append(len(items))
            if len(seen) == 1:
                await gate.wait()  # the first batch is "at the server" while more calls arrive
            return [ScoreResult(logprobs=[float(i.start)], weight_version="v") for i in items]

        batcher = ScoreBatcher(send)
        first = asyncio.create_task(batcher.submit([ScoreItem([1, 2], 1)]))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(batcher.submit([ScoreItem([1, 2, 3], k)])) for k in (1, 2, 1, 2, 1)]
        await asyncio.sleep(0)
        gate.set()
        results = [await first] + [await t for t in rest]
        return seen, results

    seen, results = asyncio.run(scenario())
    assert seen == [1, 5]
    assert [r[0].logprobs for r in results] == [[1.0], [1.0], [2.0], [1.0], [2.0], [1.0]]


def test_generated_protobuf_code_is_current():
    out = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
