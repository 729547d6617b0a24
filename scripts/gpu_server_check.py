"""Device check, issue 4's headline: real SGLang 0.5.15 on a GPU with the plugin is bitwise on-policy.

Run on the lent GPU (scripts/gpu_server_check.sh). For each tiny architecture (Qwen3, Qwen2; 4
layers, hidden 1024, bf16), built on the device: start ``truepolicy server --device cuda`` (the
launcher adds ``--attention-backend triton --disable-cuda-graph``; the plugin applies the GPU
patches), show the plugin's report from the scheduler process, send a mixed batch (16 concurrent
requests, prompt lengths around the 64-token prefill chunk, greedy and sampled), recompute every
token with the trainer side on the same GPU (``prepare_model(model, server_device="cuda")``) and print
``train_rollout_logprob_abs_diff``; then the same against a server without the plugin (the drift).
Exit status 1 unless every on-policy run is exactly 0.0 and every plugin-off run differs.

Options after the archs: ``--on-only`` (skip the plugin-off controls), ``--tp2`` (issue 11: the server
with ``--tp-size 2`` on two GPUs, the trainer emulating its rank-order row-parallel sums), ``--exact``
(both sides on the fp32 CUDA-core attention kernels, ``--gpu-attention exact``; default: mma),
``--cuda-graph`` (the servers decode from CUDA graphs: ``truepolicy server --cuda-graph``, and SGLang's
own graphs for the plugin-off control).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import requests

from parity.check import collect, compare, format_report, mixed_requests, recompute
from parity.ops import DEFAULT_GPU_ATTENTION
from parity.tiny_models import build_tiny_model, load_hf_model
from parity.trainer import prepare_model
from truepolicy.sglang_process import running_server

SERVER_ARGS = [
    "--sampling-backend", "pytorch", "--skip-tokenizer-init", "--max-total-tokens", "65536",
    "--chunked-prefill-size", "64", "--mem-fraction-static", "0.3",
]  # fmt: skip
# head_dim 64 (the paged-attention kernels take 64 and 128): Qwen2 derives it from hidden / heads.
SIZE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=4)  # fmt: skip
HEAD_DIM = {"qwen3": dict(head_dim=64), "qwen2": {}}


class Tee:
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> None:
        for s in self.streams:
            s.write(text)
            s.flush()

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def run_one(
    arch: str, out_dir: Path, on_policy: bool, tp_size: int = 1, attention: str = DEFAULT_GPU_ATTENTION,
    cuda_graph: bool = False,
) -> float:  # fmt: skip
    model_path = build_tiny_model(arch, cache_dir=out_dir / "models", overrides=SIZE | HEAD_DIM[arch])
    tag = f"{arch}-{'on' if on_policy else 'off'}" + (f"-tp{tp_size}" if tp_size > 1 else "")
    tag += f"-{attention}" if on_policy and attention != DEFAULT_GPU_ATTENTION else ""
    tag += "-graph" if cuda_graph else ""
    ours = ["--gpu-attention", attention, *(["--cuda-graph"] if cuda_graph else [])] if on_policy else []
    t0 = time.monotonic()
    # Without the plugin the launcher adds nothing: the same triton backend for a like-for-like drift.
    plain = (
        []
        if on_policy
        else ["--attention-backend", "triton", *([] if cuda_graph else ["--disable-cuda-graph"])]
    )
    with running_server(
        model_path, out_dir / f"server-{tag}.log", device="cuda", on_policy=on_policy,
        extra_args=[*ours, *SERVER_ARGS, *plain, "--tp-size", str(tp_size)],
    ) as server:  # fmt: skip
        print(f"[{tag}] server ready in {time.monotonic() - t0:.0f} s")
        if on_policy:
            info = requests.get(f"{server.url}/get_server_info", timeout=30).json()
            report = info["internal_states"][0]["truepolicy"]
            children = {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)}
            print(f"[{tag}] plugin in scheduler pid {report['pid']} (child: {report['pid'] in children}), "
                  f"patches {report['patches']}")  # fmt: skip
        model = load_hf_model(model_path, device="cuda")
        requests_ = mixed_requests(16, model.config.vocab_size, max_new_tokens=48, seed=0, max_prompt=150)
        rollouts = collect(server.url, requests_)
    trainer = prepare_model(model, tp_size=tp_size, server_device="cuda", gpu_attention=attention)
    recomputed = recompute(trainer, rollouts)
    result = compare(rollouts, recomputed)
    print(f"[{tag}] " + format_report(rollouts, result).replace("\n", f"\n[{tag}] "))
    # Where a difference starts: the first token comes from the prefill (extend), the rest from decode.
    first = sum(r.logprobs[0] != float(t[0]) for r, t in zip(rollouts, recomputed, strict=True))
    later = sum(
        sum(a != float(b) for a, b in zip(r.logprobs[1:], t[1:].tolist(), strict=True))
        for r, t in zip(rollouts, recomputed, strict=True)
    )
    print(f"[{tag}] first (prefill) tokens differing: {first}/{len(rollouts)}; later (decode): {later}")
    return result.train_rollout_logprob_abs_diff


def main(
    out_dir: Path,
    archs: list[str],
    with_off: bool = True,
    tp_size: int = 1,
    attention: str = DEFAULT_GPU_ATTENTION,
    cuda_graph: bool = False,
) -> int:
    # Everything printed also goes to OUT/report.txt (the device call returns files, and only a tail).
    out_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(sys.stdout, open(out_dir / "report.txt", "w"))  # noqa: SIM115 (lives to exit)
    ok = True
    on = {
        arch: run_one(arch, out_dir, True, tp_size, attention, cuda_graph) for arch in archs
    }  # headline first
    if not with_off:
        print("plugin on:", on)
        return 0 if all(v == 0.0 for v in on.values()) else 1
    for arch in archs:
        off = run_one(arch, out_dir, on_policy=False, tp_size=tp_size, cuda_graph=cuda_graph)
        print(f"{arch}: plugin on {on[arch]!r}, plugin off {off!r}")
        ok &= on[arch] == 0.0 and off > 0.0
    print("HEADLINE:", "bitwise on-policy on the GPU" if ok else "NOT bitwise")
    return 0 if ok else 1


if __name__ == "__main__":
    # --on-only: skip the plugin-off controls; --tp2: the server on 2 GPUs (--tp-size 2), issue 11;
    # --exact: the fp32 CUDA-core attention kernels on both sides (--gpu-attention exact)
    # --cuda-graph: the servers decode from CUDA graphs
    args = [a for a in sys.argv[2:] if a not in ("--on-only", "--tp2", "--exact", "--cuda-graph")]
    tp = 2 if "--tp2" in sys.argv else 1
    attention = "exact" if "--exact" in sys.argv else DEFAULT_GPU_ATTENTION
    sys.exit(main(
        Path(sys.argv[1]), args or ["qwen3", "qwen2"], "--on-only" not in sys.argv, tp, attention,
        "--cuda-graph" in sys.argv,
    ))  # fmt: skip
