"""The main job: rollouts from the real SGLang server vs the trainer's recomputation of their logprobs.

Builds the tiny Qwen3, starts ``truepolicy server`` on it, generates a batch of completions with
logprobs (greedy and sampled, different prompt lengths, sent concurrently), recomputes every
generated token's logprob with ``parity.compute_logprobs`` on the HF model of the same checkpoint
prepared with ``parity.prepare_model``, and prints a per-request table of max/mean |Δlogp| and
``train_rollout_logprob_abs_diff`` (0.0 means bitwise on-policy).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from parity.check import collect, compare, format_report, mixed_requests, recompute
from parity.tiny_models import ARCHITECTURES, build_tiny_model, load_hf_model
from parity.trainer import prepare_model
from truepolicy.sglang_process import running_server

SERVER_ARGS = ["--skip-tokenizer-init", "--max-total-tokens", "4096"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="qwen3")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--on-policy", action=argparse.BooleanOptionalAction, default=True,
        help="serve with the truepolicy plugin (--no-on-policy: plain SGLang)",
    )  # fmt: skip
    parser.add_argument("--log-dir", type=Path, default=None, help="where the server log goes")


def run(opts: argparse.Namespace) -> int:
    model_path = build_tiny_model(opts.arch)
    log_dir = opts.log_dir or Path(tempfile.mkdtemp(prefix="truepolicy-demo-"))
    print(f"model: {model_path}\nserver log: {log_dir / 'server.log'}")
    model = prepare_model(load_hf_model(model_path))
    requests_ = mixed_requests(opts.requests, model.config.vocab_size, opts.max_new_tokens, opts.seed)
    with running_server(
        model_path, log_dir / "server.log", on_policy=opts.on_policy, extra_args=SERVER_ARGS
    ) as server:
        rollouts = collect(server.url, requests_)
    print(format_report(rollouts, compare(rollouts, recompute(model, rollouts))))
    return 0
