"""Benchmark: scoring throughput through the sidecar's API (gRPC and HTTP) vs SGLang's /generate.

One SGLang server with the plugin (``truepolicy server``) and one sidecar in front of it. The same
scoring workload -- ``--calls`` calls of ``--items`` sequences of ``--length`` random token ids, the
second half of each scored -- is sent by ``--concurrency`` client threads

- ``direct``: to SGLang's ``/generate`` with the payload the API core sends (``max_new_tokens=1``,
  ``return_logprob``, ``logprob_start_len``): the baseline, no API in between;
- ``grpc``: through ``truepolicy.v1.RolloutService/Score``;
- ``http``: through the sidecar's ``POST /v1/score``.

Modes alternate in rounds (direct, grpc, http, direct, ...) so that drift hits all of them alike;
every (round, mode) scores fresh random sequences, so no pass is helped by SGLang's prefix cache.
The table gives the median scored tokens/s of ``--rounds`` rounds and the ratio to ``direct``.
Overhead goal: API >= 0.95 of direct.

Measured (2026-11-27): H200, tiny Qwen3 (4 layers, hidden 1024), 512-token sequences, with the
earlier one-batch-at-a-time Score batcher: gRPC 0.892, HTTP 0.887 (SGLang idled between a batch's
reply and the next send; the batcher now keeps up to 4 batches at the server). 2-core CPU, tiny
Qwen3, 256-token sequences, 5 rounds, current batcher: gRPC 1.003, HTTP 1.019 (min-max spread of
the rounds about +-10 %).

    python benchmarks/bench_rollout_api.py [--device cpu|cuda] [--model-path DIR] [--length 512] ...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.tiny_models import build_tiny_model  # noqa: E402
from truepolicy.sglang_process import running_server  # noqa: E402
from truepolicy.sidecar_process import running_sidecar  # noqa: E402
from weight_sync.api.rollout import ScoreItem  # noqa: E402
from weight_sync.client import RolloutGrpcClient, RolloutHttpClient  # noqa: E402

TOKEN = "bench-token"


def workload(calls: int, items: int, length: int, vocab: int, seed: int) -> list[list[ScoreItem]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [
            ScoreItem(torch.randint(3, vocab, (length,), generator=g).tolist(), length // 2)
            for _ in range(items)
        ]
        for _ in range(calls)
    ]


def direct_score(session: requests.Session, url: str, batch: list[ScoreItem]) -> int:
    payload = {
        "input_ids": [it.token_ids for it in batch],
        "sampling_params": [{"max_new_tokens": 1, "temperature": 0.0} for _ in batch],
        "return_logprob": True,
        "logprob_start_len": [it.start - 1 for it in batch],
    }
    resp = session.post(f"{url}/generate", json=payload, timeout=600)
    resp.raise_for_status()
    return sum(len(o["meta_info"]["input_token_logprobs"]) - 1 for o in resp.json())


def run_mode(mode: str, calls: list[list[ScoreItem]], concurrency: int, sglang_url: str, sidecar) -> float:
    """Scored tokens per second of one pass over ``calls``."""
    grpc_client = RolloutGrpcClient(sidecar.grpc_target)
    http_client = RolloutHttpClient(sidecar.url)
    session = requests.Session()
    session.trust_env = False

    def one(batch: list[ScoreItem]) -> int:
        if mode == "direct":
            return direct_score(session, sglang_url, batch)
        client = grpc_client if mode == "grpc" else http_client
        return sum(len(r.logprobs) for r in client.score(batch))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, calls))
    elapsed = time.perf_counter() - t0
    grpc_client.close()
    return tokens / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model-path", type=Path, default=None, help="default: the tiny Qwen3")
    parser.add_argument("--calls", type=int, default=32)
    parser.add_argument("--items", type=int, default=4, help="sequences per call")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-arg", action="append", default=[], help="extra SGLang argument")
    opts = parser.parse_args()

    model = opts.model_path or build_tiny_model("qwen3")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    # A bounded KV pool (SGLang sizes it from free memory otherwise: too much on a small CPU machine).
    server_args = ["--skip-tokenizer-init", "--max-total-tokens", "65536", *opts.server_arg]
    logs = Path(tempfile.mkdtemp(prefix="bench-rollout-api-"))
    with (
        running_server(model, logs / "sglang.log", device=opts.device, extra_args=server_args) as sglang,
        running_sidecar(sglang.url, logs / "sidecar.log", token=TOKEN, device=opts.device) as sidecar,
    ):
        modes = ("direct", "grpc", "http")
        warm = workload(opts.concurrency, opts.items, opts.length, vocab, seed=10_000)
        for m in modes:
            run_mode(m, warm, opts.concurrency, sglang.url, sidecar)
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(opts.rounds):
            for i, m in enumerate(modes):
                calls = workload(opts.calls, opts.items, opts.length, vocab, seed=r * len(modes) + i)
                rates[m].append(run_mode(m, calls, opts.concurrency, sglang.url, sidecar))
    base = statistics.median(rates["direct"])
    print(
        f"scoring: {opts.calls} calls x {opts.items} items x {opts.length} tokens (half scored), "
        f"concurrency {opts.concurrency}, {opts.rounds} rounds, device {opts.device}"
    )
    print(f"{'mode':<8} {'tokens/s (median)':>18} {'min':>10} {'max':>10} {'vs direct':>10}")
    for m in modes:
        med = statistics.median(rates[m])
        print(f"{m:<8} {med:>18.0f} {min(rates[m]):>10.0f} {max(rates[m]):>10.0f} {med / base:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
