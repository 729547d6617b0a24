"""Device check: `truepolicy server` runs the real SGLang 0.5.15 on a GPU with the plugin loaded.

Run on the lent GPU (see scripts/gpu_server_check.sh): builds the tiny Qwen3, starts
`truepolicy server --device cuda --attention-backend triton`, shows the plugin's report from the
scheduler process (GET /get_server_info), compares greedy tokens with HF's on the same GPU, and
prints the logprob gap against the trainer side (issue 4 brings the GPU kernels that close it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import requests
import torch

from parity.tiny_models import build_tiny_model, load_hf_model
from truepolicy.demo import collect, make_requests, recompute, report
from truepolicy.sglang_process import running_server

GPU_ARGS = [
    "--attention-backend", "triton", "--sampling-backend", "pytorch", "--skip-tokenizer-init",
    "--max-total-tokens", "8192", "--disable-cuda-graph", "--mem-fraction-static", "0.3",
]  # fmt: skip


def greedy_hf(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :]


def main(out_dir: Path) -> int:
    model_path = build_tiny_model("qwen3", cache_dir=out_dir / "models")
    t0 = time.monotonic()
    with running_server(model_path, out_dir / "server.log", device="cuda", extra_args=GPU_ARGS) as server:
        print(f"server ready in {time.monotonic() - t0:.0f} s at {server.url}")
        info = requests.get(f"{server.url}/get_server_info", timeout=30).json()
        report_ = info["internal_states"][0]["truepolicy"]
        children = {p.pid for p in psutil.Process(server.process.pid).children(recursive=True)}
        print(f"plugin report from scheduler: {report_}")
        print(f"launcher pid {server.process.pid}; report pid is a child of it: {report_['pid'] in children}")
        print(f"sglang {info.get('version')}, attention_backend {info.get('attention_backend')}")
        prompt = [5, 17, 301, 42, 900, 3]
        out = server.generate(
            {
                "input_ids": prompt,
                "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True},
            }
        )
        model = load_hf_model(model_path, device="cuda")
        hf = greedy_hf(model, prompt, 16)
        print(f"greedy server {out['output_ids']}\ngreedy HF     {hf}\nequal: {out['output_ids'] == hf}")
        rollouts = collect(server, make_requests(8, model.config.vocab_size, 16, seed=0))
    print("logprob gap vs plain HF trainer on the same GPU (GPU kernels are issue 4):")
    report(rollouts, [t.cpu() for t in recompute(model, rollouts)])
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
