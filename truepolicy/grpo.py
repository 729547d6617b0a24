"""A small GRPO loop on top of truepolicy: rollouts from the server, one on-policy update per step.

One step (Shao et al. 2024, "DeepSeekMath", GRPO; one optimizer step per rollout batch, no KL term):

1. ``P`` prompts (the same every step: a tiny fixed dataset), each sampled ``G`` times by the server
   (one request with ``n = G`` and a new ``sampling_seed`` per step; temperature 1, the full
   distribution), with the sampled tokens' fp32 logprobs.
2. A verifiable reward per completion: the fraction of its tokens whose id is a multiple of
   ``target_modulus`` (1/8 of the vocabulary by default, so a random policy scores ~0.125 and a
   policy that learned the pattern scores up to 1.0).
3. Group-normalised advantages: ``A_i = (r_i - mean_g(r)) / (std_g(r) + 1e-6)`` over the ``G``
   completions of the same prompt, the same value for every token of completion ``i``.
4. The trainer recomputes every rollout token's logprob *before* the update (the forward whose
   gradient is then used) and compares it with the server's: ``train_rollout_logprob_abs_diff`` =
   mean |server − trainer| over all tokens, 0.0 under the numerics contract.
5. The clipped surrogate ``max(−A r, −A clip(r, 1 ± ε))`` with ``r = exp(logp − logp_rollout)``
   (``parity.ppo_loss``, whose ratio comes from the fused ratio/KL op: on the CPU its plain-PyTorch
   reference), averaged per sequence then over sequences. At the rollout step ``r`` is exactly 1.0
   when the logprobs agree bit for bit; its gradient is ``A ∇logp``, the policy gradient.
6. AdamW on fp32 master weights; the bf16 model the trainer runs (and the server serves) is their
   round-to-nearest bf16 copy. bf16 alone would lose much of the update: it keeps 8 significant
   bits, so one ulp of a weight near 0.2 is ~1e-3, while an Adam step moves a weight by at most ~lr
   (5e-3 here) and mostly by less; sub-ulp steps would round back to the same weight. The bf16 copy
   is exactly what the next forward uses and what is pushed to the server.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
import torch

from parity.logprobs import token_logprobs
from parity.ppo_loss import ppo_loss

GENERATE_TIMEOUT_S = 600.0
ADV_EPS = 1e-6


@dataclass(frozen=True)
class GRPOConfig:
    prompts_per_step: int = 6  # the same prompts every step, new samples
    group_size: int = 8  # completions per prompt (SGLang's n)
    prompt_tokens: int = 6
    new_tokens: int = 10  # every completion has exactly this many tokens (ignore_eos): no padding
    temperature: float = 1.0
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    clip: float = 0.2  # PPO clip range: r in [1 - clip, 1 + clip]
    target_modulus: int = 8  # reward: fraction of completion tokens with id % target_modulus == 0
    seed: int = 0


@dataclass(frozen=True)
class RolloutBatch:
    """``P x G`` rollouts of one step, sequence ``k`` = sample ``k % G`` of prompt ``k // G``."""

    prompts: torch.Tensor  # [B, prompt_tokens] int64
    completions: torch.Tensor  # [B, new_tokens] int64
    logprobs: torch.Tensor  # [B, new_tokens] fp32: the server's logprob of each completion token
    versions: frozenset[str]  # the weight versions the server reported for these rollouts
    group_size: int


@dataclass(frozen=True)
class StepStats:
    reward_mean: float
    rewards: list[float]  # per completion
    trainer_logprobs: torch.Tensor  # [B, new_tokens] fp32, recomputed before the update
    logprob_abs_diff: torch.Tensor  # [B, new_tokens] float64 |server - trainer|
    train_rollout_logprob_abs_diff: float  # its mean
    max_ratio_dev: float  # max |ratio - 1| over all tokens at the rollout step
    loss: float
    clip_frac: float


def prompts(cfg: GRPOConfig, vocab: int) -> list[list[int]]:
    """The training prompts (a tiny fixed dataset): random ids from 3 on (past the special tokens),
    drawn from ``cfg.seed``."""
    rng = random.Random(cfg.seed)
    return [[rng.randrange(3, vocab) for _ in range(cfg.prompt_tokens)] for _ in range(cfg.prompts_per_step)]


def step_requests(cfg: GRPOConfig, step: int, vocab: int) -> list[dict]:
    """The ``/generate`` payloads of ``step``: every prompt, with a sampling seed derived from
    ``(cfg.seed, step, prompt)``: each step draws new samples, a rerun asks exactly the same."""
    rng = random.Random(cfg.seed * 1_000_003 + step + 1)
    out = []
    for prompt in prompts(cfg, vocab):
        sampling = {
            "n": cfg.group_size,
            "temperature": cfg.temperature,
            "max_new_tokens": cfg.new_tokens,
            "ignore_eos": True,
            "sampling_seed": rng.randrange(1 << 62),
        }
        out.append({"input_ids": prompt, "sampling_params": sampling, "return_logprob": True})
    return out


def _generate(session: requests.Session, url: str, payload: dict) -> list[dict]:
    resp = session.post(f"{url}/generate", json=payload, timeout=GENERATE_TIMEOUT_S)
    if resp.status_code != 200:
        raise RuntimeError(f"{url}/generate -> {resp.status_code}: {resp.text[:500]}")
    result = resp.json()
    return result if isinstance(result, list) else [result]


def collect(url: str, payloads: Sequence[dict]) -> RolloutBatch:
    """Send every request at once (the server batches them); the rollouts in request order."""
    session = requests.Session()
    session.trust_env = False
    pool = ThreadPoolExecutor(max_workers=len(payloads), thread_name_prefix="rollout")
    try:
        results = list(pool.map(lambda p: _generate(session, url, p), payloads))
    finally:
        # On an error or Ctrl-C do not wait for the other requests: their server is about to stop.
        pool.shutdown(wait=False, cancel_futures=True)
    prompts, completions, logprobs, versions = [], [], [], set()
    for payload, samples in zip(payloads, results, strict=True):
        n = payload["sampling_params"]["n"]
        if len(samples) != n:
            raise RuntimeError(f"asked for {n} samples of a prompt, the server returned {len(samples)}")
        for s in samples:
            entries = s["meta_info"]["output_token_logprobs"]
            want = payload["sampling_params"]["max_new_tokens"]
            if len(entries) != want:
                raise RuntimeError(f"a completion has {len(entries)} tokens, not {want} (ignore_eos)")
            prompts.append(payload["input_ids"])
            completions.append([tok for _, tok, _ in entries])
            logprobs.append([lp for lp, _, _ in entries])  # JSON holds each fp32 value exactly
            versions.add(str(s["meta_info"]["weight_version"]))
    return RolloutBatch(
        prompts=torch.tensor(prompts, dtype=torch.long),
        completions=torch.tensor(completions, dtype=torch.long),
        logprobs=torch.tensor(logprobs, dtype=torch.float32),
        versions=frozenset(versions),
        group_size=payloads[0]["sampling_params"]["n"],
    )


def rewards(completions: torch.Tensor, target_modulus: int) -> torch.Tensor:
    """[B] fp32: the fraction of each completion's tokens whose id is a multiple of the modulus."""
    return (completions % target_modulus == 0).float().mean(-1)


def group_advantages(reward: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B]: each reward minus its group's mean, over the group's std (0 for a group of equal rewards)."""
    r = reward.view(-1, group_size)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + ADV_EPS)).view(-1)


def completion_logits(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """[B, new_tokens, V] logits of the completion tokens: one unpadded forward over the batch (all
    sequences have the same length). Row ``t`` of the output predicts token ``t + 1``, so completion
    token ``j`` is scored by the logits at position ``prompt_tokens - 1 + j``."""
    ids = torch.cat([batch.prompts, batch.completions], dim=1).to(next(model.parameters()).device)
    start = batch.prompts.shape[1]
    return model(input_ids=ids).logits[:, start - 1 : -1]


class Policy:
    """The trainer's model: a bf16 HF model prepared with the numerics contract, trained through fp32
    master weights (see the module docstring, point 6)."""

    def __init__(self, model: torch.nn.Module, cfg: GRPOConfig):
        self.model = model
        self.cfg = cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.master, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def step(self, batch: RolloutBatch) -> StepStats:
        """Recompute, compare, and take one GRPO step on ``batch``."""
        cfg = self.cfg
        device = self.params[0].device
        reward = rewards(batch.completions, cfg.target_modulus)
        adv = group_advantages(reward, batch.group_size).to(device)
        actions = batch.completions.to(device)
        old = batch.logprobs.to(device)
        logits = completion_logits(self.model, batch)
        # The trainer's logprobs of the rollout tokens under the weights that sampled them (the same
        # contract function the parity checks use), before the optimizer touches anything.
        mine = token_logprobs(logits.detach(), actions, cfg.temperature)
        diff = (mine.double() - old.double()).abs().cpu()
        out = ppo_loss(
            logits, actions, old, adv, temperature=cfg.temperature, clip_low=cfg.clip, clip_high=cfg.clip,
            aggregation="sequence-mean",
        )  # fmt: skip
        ratio_dev = (out.ratio.detach().double() - 1.0).abs().max().item()
        for p in self.params:
            p.grad = None
        out.loss.backward()
        for m, p in zip(self.master, self.params, strict=True):
            m.grad = p.grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params, strict=True):
                p.copy_(m)  # round to nearest bf16: the weights of the next forward and of the push
        return StepStats(
            reward_mean=reward.mean().item(),
            rewards=reward.tolist(),
            trainer_logprobs=mine.cpu(),
            logprob_abs_diff=diff,
            train_rollout_logprob_abs_diff=diff.mean().item(),
            max_ratio_dev=ratio_dev,
            loss=out.loss.item(),
            clip_frac=out.metrics["clip_frac"].item(),
        )


@torch.no_grad()
def recompute(model: torch.nn.Module, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """[B, new_tokens] fp32: the trainer's logprobs of ``batch``'s completions (no update)."""
    logits = completion_logits(model, batch)
    return token_logprobs(logits, batch.completions.to(logits.device), temperature).cpu()
