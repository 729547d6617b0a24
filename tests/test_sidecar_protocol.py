"""The sidecar protocol with real processes but a stand-in SGLang (no model, seconds instead of minutes).

The stand-in serves the endpoints the sidecar calls and records what ``update_weights_from_tensor``
delivers, so these tests can look at the exact tensors SGLang would load:

- an FSDP-style trainer (2 ranks, DTensor-sharded weights) pushes through one sidecar: the server
  gets the full tensors, bit for bit;
- the FP8 path: the sidecar quantizes to block FP8 on the way, the server gets the reference bits;
- the call sequence (pause in ``retract`` mode, load with the version tag, flush, continue).
"""

from __future__ import annotations

import base64
import contextlib
import multiprocessing as mp
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from fastapi import Request

from tests.test_sidecar_server import TOKEN, Sidecar
from weight_sync.sidecar.wire import WIRE_DTYPES

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX shared memory")

SPECS = [
    ("model.embed_tokens.weight", (64, 32), "bfloat16"),
    ("model.layers.0.self_attn.q_proj.weight", (256, 128), "bfloat16"),
    ("model.layers.0.input_layernorm.weight", (32,), "bfloat16"),
    ("model.layers.0.mlp.down_proj.weight", (128, 256), "bfloat16"),
    ("lm_head.weight", (64, 32), "bfloat16"),
]


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(WIRE_DTYPES[d]) for n, s, d in SPECS}


class FakeSGLang:
    """The SGLang endpoints the sidecar uses, recording calls and the loaded tensors."""

    def __init__(self, model_path: Path):
        import uvicorn
        from fastapi import FastAPI

        self.model_path = model_path
        self.version = "default"
        self.calls: list[str] = []
        self.loaded: list[dict[str, torch.Tensor]] = []
        app = FastAPI()

        @app.get("/health")
        def health():
            return {}

        @app.get("/model_info")
        def model_info():
            return {"model_path": str(self.model_path), "weight_version": self.version}

        @app.get("/server_info")
        def server_info():
            return {"tp_size": 1, "dtype": "auto", "disable_radix_cache": False, "internal_states": [{}]}

        @app.post("/pause_generation")
        async def pause(request: Request):
            self.calls.append(f"pause:{(await request.json())['mode']}")
            return {"status": "ok"}

        @app.post("/continue_generation")
        def cont():
            self.calls.append("continue")
            return {"status": "ok"}

        @app.post("/flush_cache")
        def flush():
            self.calls.append("flush")
            return {}

        @app.post("/update_weights_from_tensor")
        async def load(request: Request):
            body = await request.json()
            assert body["flush_cache"] is False and body["abort_all_requests"] is False
            # The sidecar's local payload (what SGLang's MultiprocessingSerializer.deserialize reads).
            named = pickle.loads(base64.b64decode(body["serialized_named_tensors"][0]))
            self.loaded.append({n: t.clone() for n, t in named})
            self.calls.append(f"load:{body['weight_version']}")
            self.version = body["weight_version"]
            return {"success": True, "message": "Success"}

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)  # uvicorn's own start flag

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path / "model.safetensors"))
    return path


@contextlib.contextmanager
def stack(tmp_path: Path, checkpoint: dict[str, torch.Tensor]):
    fake = FakeSGLang(write_checkpoint(tmp_path / "ckpt", checkpoint))
    sidecar = Sidecar(fake.url, tmp_path)
    try:
        sidecar.start()
        assert fake.calls == ["continue"]  # attaching un-pauses a server a dead sidecar left paused
        fake.calls.clear()
        yield fake, sidecar
    finally:
        sidecar.stop()
        fake.stop()


# ---- FSDP: two trainer ranks with DTensor shards ------------------------------------------------
def fsdp_rank(rank: int, world: int, init_port: int, url: str, out) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from weight_sync.client import WeightSyncClient

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{init_port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    full = weights(seed=7)
    sharded = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in full.items()}
    assert all(sharded[n].to_local().shape[0] == t.shape[0] // world for n, t in full.items())
    client = WeightSyncClient([url], token=TOKEN, bucket_bytes=64 << 10)
    try:
        result = client.push(sharded, "v-fsdp")
        out.put((rank, None if result is None else result.sidecars[0]["state"]))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((rank, repr(exc)))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_sharded_model_reaches_the_server_whole(tmp_path):
    with stack(tmp_path, weights(seed=0)) as (fake, sidecar):
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=fsdp_rank, args=(r, 2, port, sidecar.url, out)) for r in range(2)]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=240) for _ in procs)
        for p in procs:
            p.join(60)
        assert results == {0: "done", 1: None}  # rank 0 talks to the sidecar, rank 1 only gathers
        (loaded,) = fake.loaded
        want = weights(seed=7)
        assert set(loaded) == set(want)
        for name, t in want.items():
            assert torch.equal(loaded[name], t), name
        assert fake.calls == ["pause:retract", "load:v-fsdp", "flush", "continue"]
        assert sidecar.version() == "v-fsdp"


# ---- FP8 on the way ---------------------------------------------------------------------------
def fp8_trainer(url: str, out) -> None:
    from weight_sync.client import WeightSyncClient

    client = WeightSyncClient([url], token=TOKEN, bucket_bytes=64 << 10, quantization="fp8_block")
    try:
        result = client.push(weights(seed=9), "v-fp8")
        out.put(("ok", result.sidecars[0]))
    except Exception as exc:  # noqa: BLE001
        out.put(("error", repr(exc)))


def test_fp8_quantized_on_the_way_gives_the_reference_bits(tmp_path):
    from weight_sync.fp8 import DEFAULT_POLICY, fp8_block_quant_torch

    # The served checkpoint is the block-FP8 one: quantized projections + scales, the rest bf16.
    served = {}
    for name, t in weights(seed=0).items():
        if DEFAULT_POLICY.should_quantize(name, tuple(t.shape)):
            q, s = fp8_block_quant_torch(t)
            served[name], served[DEFAULT_POLICY.scale_name(name)] = q, s
        else:
            served[name] = t
    with stack(tmp_path, served) as (fake, sidecar):
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        p = ctx.Process(target=fp8_trainer, args=(sidecar.url, out))
        p.start()
        status, result = out.get(timeout=240)
        p.join(60)
        assert status == "ok" and result["state"] == "done", result
        (loaded,) = fake.loaded
        assert set(loaded) == set(served)
        for name, t in weights(seed=9).items():
            if DEFAULT_POLICY.should_quantize(name, tuple(t.shape)):
                q, s = fp8_block_quant_torch(t)
                assert loaded[name].dtype == torch.float8_e4m3fn
                assert torch.equal(loaded[name].view(torch.uint8), q.view(torch.uint8)), name
                assert torch.equal(loaded[DEFAULT_POLICY.scale_name(name)], s), name
            else:
                assert torch.equal(loaded[name], t), name


def test_a_second_sidecar_start_unpauses_and_reports_the_served_version(tmp_path):
    with stack(tmp_path, weights(seed=0)) as (fake, sidecar):
        fake.version = "v-before"
        sidecar.kill()
        fake.calls.clear()
        sidecar.start()
        # A sidecar that died mid-update may have left generation paused: a new one resumes it.
        assert fake.calls == ["continue"]
        assert requests.get(f"{sidecar.url}/version", timeout=10).json()["version"] == "v-before"
