"""Parity checks: collect rollouts from a running server, recompute them on the trainer side, compare.

``train_rollout_logprob_abs_diff`` is the mean of |server logprob - trainer logprob| over every
generated token (the metric RL frameworks log); truepolicy's promise is that it is exactly 0.0,
which here means every token's fp32 logprob is bit-for-bit the trainer's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
import torch

from parity.logprobs import compute_logprobs

GENERATE_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Rollout:
    prompt: list[int]
    completion: list[int]
    logprobs: list[float]  # the server's fp32 logprob of each completion token
    temperature: float  # the temperature the logprobs are defined under (greedy: 1.0, as in SGLang)
    cached_tokens: int  # prompt tokens served from the server's prefix cache


@dataclass(frozen=True)
class ParityReport:
    per_request: list[tuple[float, float]]  # (max, mean) |Δlogp| per rollout
    tokens: int
    differing: int
    max_abs_diff: float
    train_rollout_logprob_abs_diff: float

    @property
    def exact(self) -> bool:
        return self.differing == 0


def mixed_requests(
    n: int, vocab: int, max_new_tokens: int, seed: int, min_prompt: int = 3, max_prompt: int = 70
):
    """``n`` /generate payloads: prompts of different lengths, alternately greedy and sampled
    (temperature 1.0, top_p 0.9)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(min_prompt, max_prompt + 1))]
        sampling = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        if i % 2:
            sampling |= {"temperature": 1.0, "top_p": 0.9}
        out.append({"input_ids": prompt, "sampling_params": sampling, "return_logprob": True})
    return out


def _rollouts(request: dict, result: dict | list) -> list[Rollout]:
    results = result if isinstance(result, list) else [result]
    temperature = request["sampling_params"].get("temperature", 1.0)
    out = []
    for r in results:
        entries = r["meta_info"]["output_token_logprobs"]
        out.append(
            Rollout(
                prompt=list(request["input_ids"]),
                completion=[tok for _, tok, _ in entries],
                logprobs=[lp for lp, _, _ in entries],
                temperature=temperature if temperature > 0 else 1.0,
                cached_tokens=int(r["meta_info"].get("cached_tokens", 0)),
            )
        )
    return out


def generate(url: str, request: dict) -> list[Rollout]:
    resp = requests.post(f"{url}/generate", json=request, timeout=GENERATE_TIMEOUT_S)
    if resp.status_code != 200:
        raise RuntimeError(f"{url}/generate -> {resp.status_code}: {resp.text[:500]}")
    return _rollouts(request, resp.json())


def collect(url: str, requests_: Sequence[dict]) -> list[Rollout]:
    """Send all requests concurrently (so the server batches them); rollouts in request order."""
    with ThreadPoolExecutor(max_workers=max(1, len(requests_))) as pool:
        return [r for rs in pool.map(lambda q: generate(url, q), requests_) for r in rs]


def recompute(model: torch.nn.Module, rollouts: Sequence[Rollout]) -> list[torch.Tensor]:
    return [
        compute_logprobs(model, [r.prompt + r.completion], [len(r.prompt)], r.temperature)[0]
        for r in rollouts
    ]


def compare(rollouts: Sequence[Rollout], trainer: Sequence[torch.Tensor]) -> ParityReport:
    diffs = []
    for r, t in zip(rollouts, trainer, strict=True):
        server = torch.tensor(r.logprobs, dtype=torch.float32)
        if server.shape != t.shape:
            raise ValueError(f"{server.numel()} server logprobs vs {t.numel()} trainer logprobs")
        diffs.append((server.double() - t.double()).abs())
    all_d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    return ParityReport(
        per_request=[(d.max().item(), d.mean().item()) if d.numel() else (0.0, 0.0) for d in diffs],
        tokens=all_d.numel(),
        differing=int((all_d > 0).sum()),
        max_abs_diff=all_d.max().item() if all_d.numel() else 0.0,
        train_rollout_logprob_abs_diff=all_d.mean().item() if all_d.numel() else 0.0,
    )


def format_report(rollouts: Sequence[Rollout], report: ParityReport) -> str:
    header = ("req", "prompt", "cached", "tokens", "temp", "max|dlogp|", "mean|dlogp|")
    widths = (3, 6, 6, 6, 4, 12, 12)
    lines = [" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True))]
    for i, (r, (mx, mean)) in enumerate(zip(rollouts, report.per_request, strict=True)):
        lines.append(
            f"{i:>3} {len(r.prompt):>6} {r.cached_tokens:>6} {len(r.completion):>6} {r.temperature:>4.1f} "
            f"{mx:>12.3e} {mean:>12.3e}"
        )
    lines.append(
        f"tokens: {report.tokens}  differing: {report.differing}  max|dlogp|: {report.max_abs_diff:.3e}"
    )
    lines.append(f"train_rollout_logprob_abs_diff: {report.train_rollout_logprob_abs_diff}")
    return "\n".join(lines)
