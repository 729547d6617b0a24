"""The sidecar's parts without SGLang: manifest layout and validation, the receive pipeline (plain and
FP8, NaN), the HTTP layer (token, size limit, error bodies), settings, and the client's tensor list."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch

with warnings.catch_warnings():  # starlette's note about httpx, raised at import time
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from weight_sync.sidecar import errors
from weight_sync.sidecar.app import create_app
from weight_sync.sidecar.pipeline import allocate, receive
from weight_sync.sidecar.plan import Limits, layout_buckets, validate
from weight_sync.sidecar.served import ServedModel, TensorSpec, read_checkpoint
from weight_sync.sidecar.settings import Settings, SettingsError, add_arguments, from_args
from weight_sync.sidecar.updater import Updater
from weight_sync.sidecar.wire import ALIGN, WIRE_DTYPES, Quantization

SPECS = [
    ("model.embed_tokens.weight", (64, 32), "bfloat16"),
    ("model.layers.0.self_attn.q_proj.weight", (256, 128), "bfloat16"),
    ("model.layers.0.input_layernorm.weight", (32,), "bfloat16"),
    ("model.layers.0.mlp.down_proj.weight", (128, 256), "bfloat16"),
    ("lm_head.weight", (64, 32), "bfloat16"),
]
SERVED = ServedModel("/ckpt", {n: TensorSpec(s, d) for n, s, d in SPECS})


def _tensors(specs=SPECS, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(WIRE_DTYPES[d]) for n, s, d in specs}


def _pack(manifest, tensors) -> list[torch.Tensor]:
    """What the trainer's client broadcasts: one flat uint8 tensor per bucket."""
    buckets = [torch.zeros(size, dtype=torch.uint8) for size in manifest.buckets]
    for e in manifest.tensors:
        view = buckets[e.bucket][e.offset : e.offset + e.nbytes].view(WIRE_DTYPES[e.dtype]).view(e.shape)
        view.copy_(tensors[e.name])
    return buckets


class _Done:
    def wait(self):
        return True


def _poster(buckets):
    """A stand-in for the process group: post(dst) receives the next bucket."""
    it = iter(buckets)
    posted = []

    def post(dst):
        src = next(it)
        dst.copy_(src)
        posted.append(dst.numel())
        return _Done()

    return post, posted


# ---- manifest layout and validation ----------------------------------------------------------
def test_layout_packs_in_order_aligned_and_bounded():
    m = layout_buckets(SPECS, bucket_bytes=80_000)
    assert [e.name for e in m.tensors] == [n for n, _, _ in SPECS]
    assert all(e.offset % ALIGN == 0 for e in m.tensors)
    assert all(size <= 80_000 for size in m.buckets[:-1]) and len(m.buckets) > 1
    # A tensor larger than a bucket gets a bucket of its own.
    big = layout_buckets(SPECS, bucket_bytes=1_000)
    assert len(big.buckets) == len(SPECS) and all(e.offset == 0 for e in big.tensors)
    assert validate(m, SERVED).total_bytes == m.total_bytes


@pytest.mark.parametrize(
    ("specs", "code", "tensor"),
    [
        ([*SPECS, ("model.layers.7.mlp.up_proj.weight", (4, 4), "bfloat16")], "unknown_tensor",
         "model.layers.7.mlp.up_proj.weight"),
        (SPECS[1:], "missing_tensor", "model.embed_tokens.weight"),
        ([(n, (s[0] + 1, *s[1:]) if "layernorm" in n else s, d) for n, s, d in SPECS], "shape_mismatch",
         "model.layers.0.input_layernorm.weight"),
        ([(n, s, "float32" if "lm_head" in n else d) for n, s, d in SPECS], "dtype_mismatch",
         "lm_head.weight"),
    ],
)  # fmt: skip
def test_validation_refuses_what_the_server_does_not_serve(specs, code, tensor):
    with pytest.raises(errors.ManifestError) as info:
        validate(layout_buckets(specs, 1 << 20), SERVED)
    assert info.value.code == code and info.value.status == 422 and info.value.tensor == tensor
    assert tensor in info.value.message


def test_validation_refuses_bad_layouts():
    m = layout_buckets(SPECS, 1 << 20)
    d = m.model_dump()
    t = d["tensors"]
    overlap = {**d, "tensors": [t[0], {**t[1], "offset": t[0]["offset"]}, *t[2:]]}
    outside = {**d, "tensors": [*t[:-1], {**t[-1], "offset": d["buckets"][0]}]}
    wrong_bytes = {**d, "tensors": [{**t[0], "nbytes": t[0]["nbytes"] - 2}, *t[1:]]}
    twice = {**d, "tensors": [*t, t[0]]}
    unaligned = {**d, "tensors": [t[0], {**t[1], "offset": t[1]["offset"] + 2}, *t[2:]]}
    for bad in (overlap, outside, wrong_bytes, twice, unaligned):
        with pytest.raises(errors.BadLayout):
            validate(type(m).model_validate(bad), SERVED)
    with pytest.raises(errors.TooLarge):
        validate(m, SERVED, Limits(max_tensors=3))
    with pytest.raises(errors.BadLayout):
        validate(m, SERVED, Limits(max_bucket_bytes=1000))


def test_served_model_is_read_from_safetensors_headers(tiny_qwen3):
    served = read_checkpoint(tiny_qwen3)
    assert served.tensors["model.embed_tokens.weight"] == TensorSpec((1024, 128), "bfloat16")
    assert "lm_head.weight" in served.tensors and len(served.tensors) == 25
    assert read_checkpoint(tiny_qwen3, served_dtype="float16").tensors["lm_head.weight"].dtype == "float16"


# ---- the receive pipeline ---------------------------------------------------------------------
def test_pipeline_receives_straight_into_staging():
    tensors = _tensors()
    manifest = layout_buckets(SPECS, bucket_bytes=80_000)
    plan = validate(manifest, SERVED)
    staging = allocate(plan.staging_nbytes, "cpu", shared=True)
    post, posted = _poster(_pack(manifest, tensors))
    stats = receive(plan, staging, None, post)
    assert stats.bytes == manifest.total_bytes and stats.buckets == len(manifest.buckets)
    for st in plan.staged:
        got = staging[st.start : st.end].view(st.dtype).view(st.shape)
        assert torch.equal(got, tensors[st.name]), st.name


def test_pipeline_rejects_nan_names_it_and_drains_the_rest():
    tensors = _tensors()
    tensors["model.layers.0.self_attn.q_proj.weight"][7, 3] = float("nan")
    manifest = layout_buckets(SPECS, bucket_bytes=1_000)  # one tensor per bucket
    plan = validate(manifest, SERVED)
    post, posted = _poster(_pack(manifest, tensors))
    with pytest.raises(errors.NonFinite) as info:
        receive(plan, allocate(plan.staging_nbytes, "cpu", shared=False), None, post)
    assert info.value.tensor == "model.layers.0.self_attn.q_proj.weight" and info.value.bucket == 1
    assert len(posted) == len(manifest.buckets)  # every broadcast was still received


def test_pipeline_fp8_quantizes_into_staging_like_the_reference():
    from weight_sync.fp8 import Fp8BlockPolicy, fp8_block_quant_torch

    specs = SPECS
    policy = Fp8BlockPolicy()
    served = ServedModel(
        "/ckpt-fp8",
        {
            s.name: TensorSpec(tuple(s.shape), str(s.dtype).removeprefix("torch."))
            for n, shape, d in specs
            for s in policy.specs(n, shape, WIRE_DTYPES[d])
        },
    )
    tensors = _tensors(specs, seed=1)
    manifest = layout_buckets(specs, bucket_bytes=80_000, quantization=Quantization(method="fp8_block"))
    plan = validate(manifest, served)
    assert plan.ring_bytes == max(manifest.buckets)
    staging = allocate(plan.staging_nbytes, "cpu", shared=True)
    ring = [allocate(plan.ring_bytes, "cpu", shared=False) for _ in range(2)]
    post, _ = _poster(_pack(manifest, tensors))
    receive(plan, staging, ring, post)
    staged = {st.name: staging[st.start : st.end].view(st.dtype).view(st.shape) for st in plan.staged}
    q, scale = fp8_block_quant_torch(tensors["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(staged["model.layers.0.mlp.down_proj.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(staged["model.layers.0.mlp.down_proj.weight_scale_inv"], scale)
    assert staged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(
        staged["model.layers.0.input_layernorm.weight"], tensors["model.layers.0.input_layernorm.weight"]
    )
    # A bf16 manifest is refused by an FP8 server, and vice versa.
    with pytest.raises(errors.ManifestError):
        validate(layout_buckets(specs, 80_000), served)
    with pytest.raises(errors.ManifestError):
        validate(manifest, SERVED)


def test_pipeline_maps_a_dead_peer_to_transfer_failed():
    manifest = layout_buckets(SPECS, bucket_bytes=1_000)
    plan = validate(manifest, SERVED)

    class Broken:
        def wait(self):
            raise RuntimeError("[gloo/pair.cc:538] Read error: Connection reset by peer")

    with pytest.raises(errors.TransferFailed) as info:
        receive(plan, allocate(plan.staging_nbytes, "cpu", shared=False), None, lambda dst: Broken())
    assert info.value.bucket == 0 and info.value.status == 502 and "nothing was applied" in info.value.message


# ---- HTTP layer -------------------------------------------------------------------------------
class _NoServer:
    """An SGLang that is not there: the app must still answer health, auth and limits."""

    def healthy(self, timeout=5.0):
        return False

    def facts(self):
        from weight_sync.sidecar.sglang_api import SGLangCallError

        raise SGLangCallError("/model_info", "connection refused")


def _app(token="t0ken", limit=4096):
    settings = Settings(sglang_url="http://127.0.0.1:9", token=token, max_request_bytes=limit)
    updater = Updater(settings, api=_NoServer())
    return TestClient(create_app(updater, attach_in_background=False)), updater


def test_http_token_size_limit_and_error_bodies():
    client, updater = _app()
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    body = {"version": "v1", "group_id": "g", "manifest": layout_buckets(SPECS[:1], 1 << 20).model_dump()}
    r = client.post("/update_weights", json=body)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = client.post("/update_weights", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = client.post("/update_weights", json=body, headers={"Authorization": "Bearer t0ken"})
    assert r.status_code == 503 and r.json()["error"] == "not_ready"  # no SGLang: refused, not crashed
    r = client.post(
        "/update_weights", content=b"{" + b" " * 5000 + b"}", headers={"Authorization": "Bearer t0ken"}
    )
    assert r.status_code == 413 and r.json()["error"] == "too_large"

    def chunks():  # no Content-Length: the limit applies to the streamed bytes
        for _ in range(10):
            yield b" " * 1000

    r = client.post("/connect", content=chunks(), headers={"Authorization": "Bearer t0ken"})
    assert r.status_code == 413
    r = client.post("/connect", json={"store_host": "x"}, headers={"Authorization": "Bearer t0ken"})
    assert (
        r.status_code == 422
        and r.json()["error"] == "invalid_request"
        and "store_port" in r.json()["message"]
    )
    assert client.get("/update_weights/nope").status_code == 404
    text = client.get("/metrics").text
    assert 'truepolicy_sidecar_sync_failures_total{error="invalid_request"} 1.0' in text
    assert "# TYPE truepolicy_sidecar_sync_duration_seconds histogram" in text


def test_settings_need_a_token_unless_told_and_only_on_loopback(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--sglang-url", "http://127.0.0.1:30000/"]
    with pytest.raises(SettingsError):
        from_args(parser.parse_args(base), environ={})
    s = from_args(parser.parse_args(base), environ={"TRUEPOLICY_SIDECAR_TOKEN": "abc"})
    assert s.token == "abc" and s.host == "127.0.0.1" and s.sglang_url == "http://127.0.0.1:30000"
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert from_args(parser.parse_args([*base, "--token-file", str(secret)]), environ={}).token == "from-file"
    assert from_args(parser.parse_args([*base, "--insecure-no-token"]), environ={}).token is None
    with pytest.raises(SettingsError):
        from_args(parser.parse_args([*base, "--insecure-no-token", "--host", "0.0.0.0"]), environ={})


# ---- the client's view of a model -------------------------------------------------------------
def test_client_sends_tied_weights_once_and_casts_on_request():
    from weight_sync.client import WeightSyncClient, named_tensors

    emb = torch.nn.Embedding(16, 8)
    model = torch.nn.Sequential(emb, torch.nn.Linear(8, 16, bias=False))
    model[1].weight = emb.weight  # tied
    names = [n for n, _ in named_tensors(model)]
    assert names == ["0.weight"]
    client = WeightSyncClient(["http://127.0.0.1:9"], token="x", bucket_bytes=1024)
    try:
        m = client.manifest(named_tensors(model), dtype=torch.bfloat16)
        assert [e.dtype for e in m.tensors] == ["bfloat16"]
        with pytest.raises(ValueError, match="cannot travel"):
            client.manifest([("x", torch.zeros(2, dtype=torch.float64))])
    finally:
        client.close()


# ---- applying: pause / load / flush / continue, and what a failed flush does ---------------------
class _RecordingServer:
    def __init__(self, radix_cache: bool, flush_ok: bool):
        from weight_sync.sidecar.sglang_api import ServerFacts

        self.calls: list[str] = []
        self.flush_ok = flush_ok
        self.facts_ = ServerFacts("/ckpt", "default", 1, "auto", radix_cache, ())

    def facts(self):
        return self.facts_

    def healthy(self, timeout=5.0):
        return True

    def pause(self, mode="retract"):
        self.calls.append(f"pause:{mode}")

    def resume(self, empty_cuda_cache=False):
        self.calls.append("continue")

    def load_tensors(self, payload, tp_size, version):
        self.calls.append(f"load:{version}")

    def load_from_disk(self, model_path, version):
        self.calls.append(f"disk:{version}")

    def flush_cache(self):
        self.calls.append("flush")
        return self.flush_ok


@pytest.mark.parametrize(("radix_cache", "flush_ok"), [(True, True), (True, False), (False, False)])
def test_apply_sequence_and_the_prefix_cache_policy(monkeypatch, radix_cache, flush_ok):
    from weight_sync.sidecar import updater as updater_mod
    from weight_sync.sidecar.wire import Timings

    server = _RecordingServer(radix_cache, flush_ok)
    monkeypatch.setattr(updater_mod, "read_checkpoint", lambda path, dtype=None: SERVED)
    up = Updater(Settings(sglang_url="http://127.0.0.1:9", token="t"), api=server)
    up.attach()
    assert server.calls == ["continue"]  # attaching un-pauses whatever a dead sidecar left paused
    server.calls.clear()
    plan = validate(layout_buckets(SPECS, 1 << 20), SERVED)
    staged = updater_mod.Staged(allocate(plan.staging_nbytes, "cpu", shared=True), plan.staged, "v1")
    if radix_cache and not flush_ok:
        # A radix cache SGLang could not flush would serve the old weights' KV: put v0 back, refuse.
        with pytest.raises(errors.CacheNotFlushed) as info:
            up._apply(staged, Timings())
        assert info.value.status == 503 and info.value.restored is True
        assert server.calls == ["pause:retract", "load:v1", "flush", "disk:default", "flush", "continue"]
    else:
        assert up._apply(staged, Timings()) is flush_ok
        assert server.calls == ["pause:retract", "load:v1", "flush", "continue"]
