"""The main job: rollouts from the real SGLang server vs the trainer's recomputation of their logprobs.

Builds the tiny Qwen3, starts ``truepolicy server`` on it, generates a batch of completions with
logprobs (greedy and sampled, different prompt lengths, sent concurrently), recomputes every
generated token's logprob with ``parity.compute_logprobs`` on the HF model of the same checkpoint,
and prints a per-request table of max/mean |Δlogp| and ``train_rollout_logprob_abs_diff`` (the mean
of |Δlogp| over all generated tokens: 0.0 means bitwise on-policy).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from parity import compute_logprobs
from parity.tiny_models import ARCHITECTURES, build_tiny_model, load_hf_model
from parity.trainer import prepare_model
from truepolicy.sglang_process import running_server


@dataclass(frozen=True)
class Rollout:
    prompt: list[int]
    completion: list[int]
    logprobs: list[float]  # the server's logprob of each completion token
    temperature: float


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


def make_requests(n: int, vocab: int, max_new_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 40))]
        temperature = 0.0 if i % 2 == 0 else 1.0
        sampling = {
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "ignore_eos": True,
        }
        if temperature > 0:
            sampling |= {"top_p": 0.9, "sampling_seed": seed + i}
        out.append({"input_ids": prompt, "sampling_params": sampling, "return_logprob": True})
    return out


def rollout(server, request: dict) -> Rollout:
    result = server.generate(request)
    entries = result["meta_info"]["output_token_logprobs"]
    temperature = request["sampling_params"]["temperature"]
    return Rollout(
        prompt=request["input_ids"],
        completion=[tok for _, tok, _ in entries],
        logprobs=[lp for lp, _, _ in entries],
        temperature=temperature if temperature > 0 else 1.0,
    )


def collect(server, requests_: list[dict]) -> list[Rollout]:
    with ThreadPoolExecutor(max_workers=len(requests_)) as pool:
        return list(pool.map(lambda r: rollout(server, r), requests_))


def recompute(model: torch.nn.Module, rollouts: list[Rollout]) -> list[torch.Tensor]:
    out = []
    for r in rollouts:
        (lp,) = compute_logprobs(model, [r.prompt + r.completion], [len(r.prompt)], r.temperature)
        out.append(lp)
    return out


def report(rollouts: list[Rollout], trainer: list[torch.Tensor]) -> float:
    print(f"{'req':>3} {'prompt':>6} {'tokens':>6} {'temp':>4} {'max|dlogp|':>12} {'mean|dlogp|':>12}")
    diffs = []
    for i, (r, t) in enumerate(zip(rollouts, trainer, strict=True)):
        d = (torch.tensor(r.logprobs, dtype=torch.float32) - t).abs()
        diffs.append(d)
        print(
            f"{i:>3} {len(r.prompt):>6} {len(r.completion):>6} {r.temperature:>4.1f} "
            f"{d.max().item():>12.3e} {d.mean().item():>12.3e}"
        )
    all_d = torch.cat(diffs)
    value = all_d.mean().item()
    print(
        f"tokens: {all_d.numel()}  differing: {int((all_d > 0).sum())}  max|dlogp|: {all_d.max().item():.3e}"
    )
    print(f"train_rollout_logprob_abs_diff: {value}")
    return value


def run(opts: argparse.Namespace) -> int:
    model_path = build_tiny_model(opts.arch)
    log_dir = opts.log_dir or Path(tempfile.mkdtemp(prefix="truepolicy-demo-"))
    print(f"model: {model_path}\nserver log: {log_dir / 'server.log'}")
    vocab = load_hf_model(model_path).config.vocab_size
    requests_ = make_requests(opts.requests, vocab, opts.max_new_tokens, opts.seed)
    extra = ["--skip-tokenizer-init", "--max-total-tokens", "4096"]
    with running_server(
        model_path, log_dir / "server.log", on_policy=opts.on_policy, extra_args=extra
    ) as server:
        rollouts = collect(server, requests_)
    model = prepare_model(load_hf_model(model_path))
    report(rollouts, recompute(model, rollouts))
    return 0
