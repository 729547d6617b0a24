"""``truepolicy parity-check``: rollouts from a running server vs the trainer side, exit 1 unless exact."""

from __future__ import annotations

import argparse
from pathlib import Path

from parity.check import collect, compare, format_report, mixed_requests, recompute
from parity.ops import DEFAULT_GPU_ATTENTION, GPU_ATTENTION_KINDS
from parity.tiny_models import load_hf_model
from parity.trainer import prepare_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:30000")
    parser.add_argument("--model-path", type=Path, required=True, help="the checkpoint the server runs")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests (mixed lengths)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the trainer side runs")
    parser.add_argument(
        "--server-device", choices=["cpu", "cuda"], default="cpu",
        help="the server's --device: which contract the trainer computes (cpu or GPU kernels)",
    )  # fmt: skip
    parser.add_argument(
        "--tp-size", type=int, default=1,
        help="the server's --tp-size: the trainer emulates its rank-order row-parallel reductions",
    )  # fmt: skip
    parser.add_argument(
        "--gpu-attention", choices=GPU_ATTENTION_KINDS, default=DEFAULT_GPU_ATTENTION,
        help="the server's --gpu-attention (with --server-device cuda): the attention kernel family",
    )  # fmt: skip
    parser.add_argument(
        "--prepare", action=argparse.BooleanOptionalAction, default=True,
        help="compute with parity.prepare_model (--no-prepare: plain HF transformers)",
    )  # fmt: skip


def run(opts: argparse.Namespace) -> int:
    model = load_hf_model(opts.model_path, device=opts.device)
    if opts.prepare:
        prepare_model(
            model, tp_size=opts.tp_size, server_device=opts.server_device, gpu_attention=opts.gpu_attention
        )
    requests_ = mixed_requests(opts.requests, model.config.vocab_size, opts.max_new_tokens, opts.seed)
    rollouts = collect(opts.url, requests_)
    report = compare(rollouts, recompute(model, rollouts))
    print(format_report(rollouts, report))
    return 0 if report.train_rollout_logprob_abs_diff == 0.0 and report.exact else 1
