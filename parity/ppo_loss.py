"""PPO / GRPO clipped-surrogate loss on top of the fused policy op (``parity.ops.policy_loss``).

Per token (``r`` the importance ratio, ``A`` the advantage)::

    pg   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))      # asymmetric clip range
    pg   = min(pg, -A dual_clip)   where A < 0, if dual_clip is set  # dual clip (Ye et al. 2020), > 1
    loss = pg + kl_coef * kl - entropy_coef * entropy

and the masked per-token losses are aggregated by

* ``"token-mean"``: sum over all unmasked tokens / their number;
* ``"sequence-mean"``: per sequence, the mean over its unmasked tokens, then the mean over sequences
  that have at least one;
* ``"sequence-sum"``: per sequence, the sum over its unmasked tokens, then the mean over the same
  sequences.

Sequences are the rows of ``[B, L]`` inputs, or given by ``seq_ids`` for packed ``[N]`` inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parity.ops.policy_loss import fused_policy_loss

AGGREGATIONS = ("token-mean", "sequence-mean", "sequence-sum")


@dataclass
class PPOLossOutput:
    loss: torch.Tensor  # scalar
    per_token: torch.Tensor  # unaggregated loss (0 on masked tokens)
    logp: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor | None
    entropy: torch.Tensor | None
    metrics: dict[str, torch.Tensor]  # detached scalars: clip_frac, dual_clip_frac, ratio_mean, ...


def surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token policy-gradient loss, clipped?, dual-clipped?) of the clipped surrogate."""
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    neg_adv = -advantages
    unclipped = neg_adv * ratio
    clipped = neg_adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    is_dual = torch.zeros_like(is_clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = neg_adv * dual_clip
        is_dual = (advantages < 0) & (pg > bound)
        pg = torch.where(is_dual, bound, pg)
    return pg, is_clipped, is_dual


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
) -> torch.Tensor:
    """Reduce masked per-token values ``[B, L]`` (or ``[N]`` with ``seq_ids``) to a scalar."""
    _check_aggregation(aggregation)
    zero = per_token.new_zeros(())
    return _aggregate_masked(torch.where(mask, per_token, zero), mask, aggregation, seq_ids, num_seqs, zero)


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _aggregate_masked(vals, mask, aggregation, seq_ids, num_seqs, zero):
    """:func:`aggregate` of ``vals`` that are already 0 where ``mask`` is False; ``zero``: a 0-d zero of
    their dtype on their device (``torch.where`` with a Python 0.0 fills a new one on every call)."""
    m = mask.to(vals.dtype)
    if aggregation == "token-mean":
        return vals.sum() / m.sum().clamp(min=1.0)
    if seq_ids is not None:
        seq_ids = seq_ids.reshape(-1).long()
        n_seq = int(num_seqs) if num_seqs is not None else int(seq_ids.max()) + 1 if seq_ids.numel() else 0
        sums = vals.new_zeros(n_seq).index_add(0, seq_ids, vals.reshape(-1))
        counts = m.new_zeros(n_seq).index_add(0, seq_ids, m.reshape(-1))
    else:
        if vals.dim() != 2:
            raise ValueError("sequence aggregations need [B, L] inputs or seq_ids")
        sums, counts = vals.sum(-1), m.sum(-1)
    has = counts > 0
    per_seq = sums / counts.clamp(min=1.0) if aggregation == "sequence-mean" else sums
    return torch.where(has, per_seq, zero).sum() / has.sum().clamp(min=1)


def ppo_loss(
    logits: torch.Tensor,
    actions: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logits: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    compute_entropy: bool = False,
    aggregation: str = "token-mean",
    seq_ids: torch.Tensor | None = None,
    num_seqs: int | None = None,
    inplace_backward: bool = False,
    validate_ids: bool = True,
) -> PPOLossOutput:
    """PPO/GRPO loss from logits ``[B, L, V]`` (or ``[N, V]``) through the fused op.

    ``advantages``: per token (same shape as ``actions``) or per sequence (``[B]``, broadcast over
    ``L``). The KL term is used when a reference is given (``kl_coef`` may still be 0: then it is only
    reported). Entropy is computed when ``entropy_coef != 0`` or ``compute_entropy``.
    ``validate_ids=False`` skips the check that the unmasked actions are in ``[0, V)`` (its one host
    sync per call), for ids known to be valid (e.g. sampled from the same vocabulary).
    """
    lead = logits.shape[:-1]
    op_mask = None  # no mask: the fused op skips its per-row mask reads and the masked id check
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=logits.device)
    else:
        mask = op_mask = mask.reshape(lead).bool()
    adv = advantages.float()
    if adv.shape != lead:
        if len(lead) == 2 and adv.shape == lead[:1]:
            adv = adv[:, None].expand(lead)
        else:
            raise ValueError(
                f"advantages shape {tuple(adv.shape)} fits neither {tuple(lead)} nor {tuple(lead[:1])}"
            )
    _check_aggregation(aggregation)
    want_entropy = compute_entropy or entropy_coef != 0.0
    out = fused_policy_loss(
        logits, actions, old_logprobs, op_mask, temperature, ref_logits=ref_logits, ref_logprobs=ref_logprobs,
        kl_estimator=kl_estimator, entropy=want_entropy, inplace_backward=inplace_backward,
        validate_ids=validate_ids,
    )  # fmt: skip
    if kl_coef != 0.0 and out.kl is None:
        raise ValueError("kl_coef != 0 needs ref_logits or ref_logprobs")
    pg, is_clipped, is_dual = surrogate(out.ratio, adv, clip_low, clip_high, dual_clip)
    per_token = pg
    if out.kl is not None and kl_coef != 0.0:
        per_token = per_token + kl_coef * out.kl
    if out.entropy is not None and entropy_coef != 0.0:
        per_token = per_token - entropy_coef * out.entropy
    zero = per_token.new_zeros(())  # one fill for every masking below
    per_token = torch.where(mask, per_token, zero)
    loss = _aggregate_masked(per_token, mask, aggregation, seq_ids, num_seqs, zero)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)

        def mean(t):
            return torch.where(mask, t.float(), zero).sum() / n

        # The two fractions from one integer count (exact, so the same bits as two float sums).
        counts = (torch.stack((is_clipped, is_dual)) & mask).reshape(2, -1).sum(1)
        clip_frac, dual_clip_frac = (counts / n).unbind()
        metrics = {"clip_frac": clip_frac, "dual_clip_frac": dual_clip_frac, "ratio_mean": mean(out.ratio)}
        if out.kl is not None:
            metrics["kl_mean"] = mean(out.kl)
        if out.entropy is not None:
            metrics["entropy_mean"] = mean(out.entropy)
    return PPOLossOutput(loss, per_token, out.logp, out.ratio, out.kl, out.entropy, metrics)
