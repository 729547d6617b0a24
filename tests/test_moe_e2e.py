"""MoE parity on the real SGLang CPU server: the tiny Qwen3-MoE's rollout logprobs are the trainer's, bit
for bit.

One server with the plugin serves the tiny Qwen3-MoE (8 experts, top-2, 2 layers); one set of rollouts
is collected from it: concurrent batches of 1, 3 and 16 requests with prompts of 3..70 tokens
(chunked prefill in 16-token chunks), greedy and sampled (temperature 1.0, top_p 0.9), prefix-cache
hits, and a seeded request with n = 2 sent alone and again among other traffic. The trainer is HF
transformers with ``parity.prepare_model`` (the MoE blocks through ``parity.moe``).

Negative controls: the same rollouts recomputed by a trainer whose MoE blocks are HF's own differ
(the MoE contract matters end to end), and a server without the plugin differs.
"""

from __future__ import annotations

import pytest

from parity.check import collect, compare, format_report, mixed_requests, recompute
from parity.moe import QWEN3_MOE_BLOCK
from parity.tiny_models import build_tiny_model, load_hf_model
from parity.trainer import prepare_model
from tests.conftest import SERVER_ARGS
from truepolicy.sglang_process import running_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def moe_path(model_cache):
    return build_tiny_model("qwen3_moe", cache_dir=model_cache)


@pytest.fixture(scope="module")
def trainer(moe_path):
    return prepare_model(load_hf_model(moe_path))


def summary(label: str, report) -> str:
    return f"\n{label}: {report.tokens} tokens, {report.differing} differ, max |Δ| {report.max_abs_diff}"


def _seeded(seed: int) -> dict:
    sampling = {"n": 2, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 10, "ignore_eos": True}
    return {
        "input_ids": [8, 1, 77, 300, 12, 5, 6],
        "sampling_params": sampling | {"sampling_seed": seed},
        "return_logprob": True,
    }


@pytest.fixture(scope="module")
def rollouts(moe_path, trainer, tmp_path_factory):
    """Every rollout of this module, by scenario, from one on-policy server."""
    vocab = trainer.config.vocab_size
    prefix = [(7 * i + 11) % vocab for i in range(40)]
    shared = [
        {
            "input_ids": [*prefix, 100 + i, 200 + i],
            "sampling_params": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8, "ignore_eos": True},
            "return_logprob": True,
        }
        for i in range(3)
    ]
    warm = {"input_ids": [*prefix, 3], "sampling_params": {"temperature": 0.0, "max_new_tokens": 6},
            "return_logprob": True}  # fmt: skip
    log = tmp_path_factory.mktemp("logs") / "qwen3-moe-on-policy.log"
    with running_server(moe_path, log, extra_args=SERVER_ARGS) as server:
        out = {f"batch of {n}": collect(server.url, mixed_requests(n, vocab, 8, seed=n)) for n in (1, 3, 16)}
        out["prefix warm-up"] = collect(server.url, [warm])
        out["prefix hits"] = collect(server.url, shared)
        out["seeded alone"] = collect(server.url, [_seeded(1234)])
        out["seeded in a crowd"] = collect(server.url, [_seeded(1234), *mixed_requests(5, vocab, 8, seed=3)])
    return out


def test_moe_rollouts_are_bitwise_on_policy(rollouts, trainer):
    everything = [r for group in rollouts.values() for r in group]
    assert any(len(r.prompt) > 16 for r in rollouts["batch of 16"])  # chunked prefill exercised
    assert all(r.cached_tokens >= 16 for r in rollouts["prefix hits"]), [
        r.cached_tokens for r in rollouts["prefix hits"]
    ]
    report = compare(everything, recompute(trainer, everything))
    print(summary("plugin on", report))
    assert report.tokens > 0
    assert report.exact and report.train_rollout_logprob_abs_diff == 0.0, (
        f"{report.differing} of {report.tokens} logprobs differ, max |Δ| = {report.max_abs_diff:.3e}\n"
        + format_report(everything, report)
    )


def test_seeded_moe_samples_reproduce_in_any_batch(rollouts):
    alone, crowd = rollouts["seeded alone"], rollouts["seeded in a crowd"][:2]
    assert [r.completion for r in crowd] == [r.completion for r in alone]
    assert [r.logprobs for r in crowd] == [r.logprobs for r in alone]
    assert alone[0].completion != alone[1].completion  # the n samples differ


def test_negative_control_a_trainer_with_hf_moe_blocks_differs(rollouts, moe_path):
    """The plugin-on rollouts against a trainer that is prepared except for its MoE blocks (HF's own
    bf16 combine): the MoE contract is what makes them equal."""
    hf_moe = prepare_model(load_hf_model(moe_path))
    blocks = [m for m in hf_moe.modules() if type(m).__name__ == QWEN3_MOE_BLOCK]
    assert blocks
    for block in blocks:
        del block.forward  # back to the class's (HF's) forward
    everything = [r for group in rollouts.values() for r in group]
    report = compare(everything, recompute(hf_moe, everything))
    print(summary("HF MoE blocks in the trainer", report))
    assert report.differing > 0 and report.max_abs_diff > 0.0


def test_negative_control_without_the_plugin_logprobs_differ(moe_path, trainer, tmp_path):
    requests_ = mixed_requests(8, trainer.config.vocab_size, 8, seed=8)
    with running_server(moe_path, tmp_path / "off.log", on_policy=False, extra_args=SERVER_ARGS) as server:
        rollouts = collect(server.url, requests_)
    report = compare(rollouts, recompute(trainer, rollouts))
    print(summary("plugin off", report))
    assert report.differing > 0 and report.train_rollout_logprob_abs_diff > 0.0
