"""The rollout/scoring API (issue 7): real SGLang CPU server with the plugin, real uvicorn and gRPC
servers on loopback ports, the typed clients. Logprobs must equal the trainer's bit for bit."""

from __future__ import annotations

import asyncio
import dataclasses
import json

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
from truepolicy.sglang_process import running_server
from truepolicy.sidecar_process import running_sidecar
from truepolicy.v1 import weight_sync_pb2, weight_sync_pb2_grpc
from weight_sync.api.rollout import Sampling, ScoreBatcher, ScoreItem, ScoreResult
from weight_sync.client import RolloutApiError, RolloutGrpcClient, RolloutHttpClient, WeightSyncClient

TOKEN = "rollout-api-test-token"

pytestmark = pytest.mark.server


def _bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def api(tiny_qwen3, tmp_path_factory):
    logs = tmp_path_factory.mktemp("api-logs")
    with (
        running_server(tiny_qwen3, logs / "sglang.log", extra_args=SERVER_ARGS) as sglang,
        running_sidecar(sglang.url, logs / "sidecar.log", token=TOKEN) as sidecar,
    ):
        with grpc.insecure_channel(sidecar.grpc_target) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield sglang, sidecar


@pytest.fixture(scope="module")
def trainer(tiny_qwen3):
    return prepare_model(load_hf_model(tiny_qwen3))


ITEMS = [
    ScoreItem(token_ids=[5, 17, 301, 42, 900, 3, 3, 77], start=1),
    ScoreItem(token_ids=[*range(200, 240)], start=25),
    ScoreItem(token_ids=[9, 8], start=1),
    ScoreItem(token_ids=[5, 1023, 7, 1023, 0], start=1),  # the last vocabulary id, and id 0
]


def _want(model, items):
    return [compute_logprobs(model, [i.token_ids], [i.start])[0] for i in items]


def test_score_grpc_and_http_equal_the_trainer_bitwise(api, trainer):
    _, server = api
    want = _want(trainer, ITEMS)
    by_grpc = RolloutGrpcClient(server.grpc_target).score(ITEMS)
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
    chunks = list(RolloutGrpcClient(server.grpc_target).generate(prompt, sampling))
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
        RolloutGrpcClient(server.grpc_target).score(items)
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
        list(RolloutGrpcClient(server.grpc_target).generate(prompt, sampling))
    assert grpc_err.value.code == "INVALID_ARGUMENT" and needle in grpc_err.value.message
    resp = requests.post(
        f"{server.url}/v1/generate",
        json={"prompt_token_ids": prompt, "sampling": dataclasses.asdict(sampling)},
        timeout=30,
    )
    assert resp.status_code == 400 and needle in resp.json()["message"]


def test_health_and_reflection(api):
    _, server = api
    with grpc.insecure_channel(server.grpc_target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="truepolicy.v1.RolloutService"), timeout=10
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in reply.list_services_response.service}
        assert {
            "truepolicy.v1.RolloutService",
            "truepolicy.v1.WeightSyncService",
            "grpc.health.v1.Health",
        } <= names


def test_version_tags_follow_a_weight_update(api, model_cache):
    _, server = api
    client = RolloutGrpcClient(server.grpc_target)
    before = client.score(ITEMS[:1])[0]
    assert before.weight_version == "default" and _get_version(server).version == "default"
    new_path = build_tiny_model("qwen3", seed=1, cache_dir=model_cache)
    new_trainer = prepare_model(load_hf_model(new_path))
    pusher = WeightSyncClient([server.url], token=TOKEN)
    try:
        pusher.push(new_trainer, "v2")
    finally:
        pusher.close()
    info = _get_version(server)
    assert (info.version, info.previous, info.source) == ("v2", "default", "sidecar")
    assert requests.get(f"{server.url}/version", timeout=10).json()["version"] == "v2"
    after = client.score(ITEMS[:1])[0]
    assert after.weight_version == "v2"
    assert torch.equal(torch.tensor(after.logprobs, dtype=torch.float32), _want(new_trainer, ITEMS[:1])[0])
    assert not torch.equal(torch.tensor(after.logprobs), torch.tensor(before.logprobs))
    chunks = list(client.generate([1, 2, 3], Sampling(temperature=0.0, max_new_tokens=3)))
    assert {c.weight_version for c in chunks} == {"v2"}


def _get_version(server) -> weight_sync_pb2.VersionInfo:
    with grpc.insecure_channel(server.grpc_target) as channel:
        return weight_sync_pb2_grpc.WeightSyncServiceStub(channel).GetVersion(
            weight_sync_pb2.GetVersionRequest(), timeout=10
        )


def _manifest_request(version: str) -> weight_sync_pb2.UpdateWeightsRequest:
    entry = weight_sync_pb2.TensorEntry(
        name="model.norm.weight",
        shape=[128],
        dtype=weight_sync_pb2.DTYPE_BFLOAT16,
        bucket=0,
        offset=0,
        nbytes=256,
    )
    return weight_sync_pb2.UpdateWeightsRequest(
        version=version, group_id="g1", manifest=weight_sync_pb2.Manifest(tensors=[entry], buckets=[256])
    )


@pytest.mark.parametrize(
    "metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]
)
def test_mutating_grpc_calls_need_the_token_and_change_nothing(api, metadata):
    _, server = api
    before = _get_version(server)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = weight_sync_pb2_grpc.WeightSyncServiceStub(channel)
        calls = [
            (stub.UpdateWeights, _manifest_request("v-evil")),
            (
                stub.Connect,
                weight_sync_pb2.ConnectRequest(store_host="127.0.0.1", store_port=1, group_id="g1"),
            ),
            (stub.CommitUpdate, weight_sync_pb2.CommitUpdateRequest(transfer_id="x")),
            (stub.CancelUpdate, weight_sync_pb2.CancelUpdateRequest(transfer_id="x")),
        ]
        for call, request in calls:
            with pytest.raises(grpc.RpcError) as err:
                call(request, metadata=metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (call, err.value.details())
    assert _get_version(server) == before


def test_bad_grpc_control_requests_are_refused_and_change_nothing(api):
    _, server = api
    before = _get_version(server)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = weight_sync_pb2_grpc.WeightSyncServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:  # backend left unspecified
            stub.Connect(
                weight_sync_pb2.ConnectRequest(
                    store_host="127.0.0.1", store_port=1, group_id="g1", rank=1, world_size=2
                ),
                metadata=auth, timeout=30,
            )  # fmt: skip
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "backend" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # bad version tag
            stub.UpdateWeights(_manifest_request("not a tag!"), metadata=auth, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # no process group with a trainer yet
            stub.UpdateWeights(_manifest_request("v9"), metadata=auth, timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert dict(err.value.trailing_metadata())["truepolicy-error"] == "not_connected"
        with pytest.raises(grpc.RpcError) as err:
            stub.CommitUpdate(
                weight_sync_pb2.CommitUpdateRequest(transfer_id="nope"), metadata=auth, timeout=30
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert _get_version(server) == before


def test_concurrent_scores_are_coalesced_into_batches_with_bounded_batches_in_flight():
    async def scenario():
        gate = asyncio.Event()
        seen: list[int] = []
        peak = [0]

        async def send(items):
            seen.append(len(items))
            peak[0] = max(peak[0], batcher.in_flight)
            await gate.wait()  # the batches sent so far are "at the server" while more calls arrive
            return [ScoreResult(logprobs=[float(i.start)], weight_version="v") for i in items]

        batcher = ScoreBatcher(send, max_in_flight=2)
        first = [asyncio.create_task(batcher.submit([ScoreItem([1, 2], k)])) for k in (1, 2)]
        while len(seen) < 2:  # both slots taken, one call each
            await asyncio.sleep(0)
        rest = [asyncio.create_task(batcher.submit([ScoreItem([1, 2, 3], k)])) for k in (1, 2, 1, 2, 1)]
        await asyncio.sleep(0)
        assert batcher.in_flight == 2 and seen == [1, 1]  # the 5 later calls wait for a free slot
        gate.set()
        results = [await t for t in first] + [await t for t in rest]
        return seen, results, peak[0]

    seen, results, peak = asyncio.run(scenario())
    assert seen == [1, 1, 5] and peak == 2  # one batch of the 5 waiting calls, never 3 at the server
    assert [r[0].logprobs for r in results] == [[1.0], [2.0], [1.0], [2.0], [1.0], [2.0], [1.0]]
    with pytest.raises(ValueError, match="max_in_flight"):
        ScoreBatcher(lambda items: None, max_in_flight=0)
