"""The core promise on the real SGLang CPU server: every returned logprob is the trainer's, bit for bit.

For the tiny Qwen3, Qwen2 and Llama: concurrent batches of 1, 3, 8 and 16 requests with different
prompt lengths, chunked prefill (16-token chunks), prefix-cache hits, greedy and sampled
(temperature 1.0, top_p 0.9), n = 4. The trainer side is HF transformers with
``parity.prepare_model``. Negative control: the same server without the plugin differs.
"""

from __future__ import annotations

import pytest
import torch

from parity.check import collect, compare, format_report, mixed_requests, recompute
from parity.tiny_models import build_tiny_model, load_hf_model
from parity.trainer import prepare_model
from tests.conftest import SERVER_ARGS
from truepolicy.sglang_process import running_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "llama"])
def served(request, model_cache, tmp_path_factory):
    arch = request.param
    path = build_tiny_model(arch, cache_dir=model_cache)
    log = tmp_path_factory.mktemp("logs") / f"{arch}-on-policy.log"
    with running_server(path, log, extra_args=SERVER_ARGS) as server:
        yield server, prepare_model(load_hf_model(path))


def assert_on_policy(model, rollouts):
    report = compare(rollouts, recompute(model, rollouts))
    assert report.tokens > 0
    assert report.exact and report.train_rollout_logprob_abs_diff == 0.0, (
        f"{report.differing} of {report.tokens} logprobs differ, max |Δ| = {report.max_abs_diff:.3e}\n"
        + format_report(rollouts, report)
    )


@pytest.mark.parametrize("batch", [1, 3, 8, 16])
def test_concurrent_batches_are_bitwise_on_policy(served, batch):
    server, model = served
    requests_ = mixed_requests(batch, model.config.vocab_size, max_new_tokens=10, seed=batch)
    rollouts = collect(server.url, requests_)
    assert any(len(r.prompt) > 16 for r in rollouts) or batch == 1  # chunked prefill exercised
    assert_on_policy(model, rollouts)


def test_prefix_cache_hits_are_bitwise_on_policy(served):
    server, model = served
    vocab = model.config.vocab_size
    prefix = [(7 * i + 11) % vocab for i in range(40)]
    first = {"input_ids": [*prefix, 3], "sampling_params": {"temperature": 0.0, "max_new_tokens": 6}}
    warm = collect(server.url, [{**first, "return_logprob": True}])
    shared = [
        {
            "input_ids": [*prefix, 100 + i, 200 + i],
            "sampling_params": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8, "ignore_eos": True},
            "return_logprob": True,
        }
        for i in range(3)
    ]
    rollouts = collect(server.url, shared)
    assert all(r.cached_tokens >= 16 for r in rollouts), [r.cached_tokens for r in rollouts]
    assert_on_policy(model, warm + rollouts)


def test_parallel_samples_differ_and_are_bitwise_on_policy(served):
    server, model = served
    request = {
        "input_ids": [5, 9, 300, 17, 2, 44],
        "sampling_params": {
            "n": 4,
            "temperature": 1.0,
            "top_p": 0.9,
            "max_new_tokens": 12,
            "ignore_eos": True,
        },
        "return_logprob": True,
    }
    rollouts = collect(server.url, [request])
    assert len(rollouts) == 4
    assert len({tuple(r.completion) for r in rollouts}) > 1
    assert_on_policy(model, rollouts)


def test_negative_control_without_the_plugin_logprobs_differ(tiny_qwen3, tmp_path):
    model = prepare_model(load_hf_model(tiny_qwen3))
    requests_ = mixed_requests(8, model.config.vocab_size, max_new_tokens=10, seed=8)
    prompt = [3, 50, 700, 21, 9, 9, 400, *range(100, 140)]
    with running_server(tiny_qwen3, tmp_path / "off.log", on_policy=False, extra_args=SERVER_ARGS) as server:
        rollouts = collect(server.url, requests_)
        scored = server.generate(
            {"input_ids": prompt, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
             "return_logprob": True, "logprob_start_len": 0}
        )  # fmt: skip
    report = compare(rollouts, recompute(model, rollouts))
    assert report.differing > 0 and report.train_rollout_logprob_abs_diff > 0.0
    assert torch.isfinite(torch.tensor(report.max_abs_diff))
    got = torch.tensor(
        [lp for lp, _, _ in scored["meta_info"]["input_token_logprobs"][1:]], dtype=torch.float32
    )
    (want,) = recompute(model, [_as_rollout(prompt)])
    assert int((got != want).sum()) > 0


def _seeded(seed: int | None, n: int = 4) -> dict:
    sampling = {"n": n, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12, "ignore_eos": True}
    if seed is not None:
        sampling["sampling_seed"] = seed
    return {"input_ids": [8, 1, 77, 300, 12, 5, 6], "sampling_params": sampling, "return_logprob": True}


def test_seeded_samples_are_reproducible_and_distinct(served):
    server, model = served
    alone = collect(server.url, [_seeded(1234)])
    # The same seeded request again, now batched with other traffic: the same samples, in order.
    crowd = collect(server.url, [_seeded(1234), *mixed_requests(6, model.config.vocab_size, 10, seed=3)])
    again = crowd[:4]
    assert [r.completion for r in again] == [r.completion for r in alone]
    assert len({tuple(r.completion) for r in alone}) > 1  # the n samples of one request differ
    other_seed = collect(server.url, [_seeded(99)])
    assert [r.completion for r in other_seed] != [r.completion for r in alone]
    unseeded = collect(server.url, [_seeded(None, n=1), _seeded(None, n=1)])
    assert unseeded[0].completion != unseeded[1].completion
    assert_on_policy(model, alone + crowd + other_seed + unseeded)


def test_prompt_logprobs_are_bitwise_on_policy(served):
    server, model = served
    prompt = [3, 50, 700, 21, 9, 9, 400, *range(100, 140)]  # 47 tokens: several prefill chunks
    result = server.generate(
        {"input_ids": prompt, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
         "return_logprob": True, "logprob_start_len": 0}
    )  # fmt: skip
    entries = result["meta_info"]["input_token_logprobs"]
    assert entries[0][0] is None and [tok for _, tok, _ in entries] == prompt
    got = torch.tensor([lp for lp, _, _ in entries[1:]], dtype=torch.float32)
    (want,) = recompute(model, [_as_rollout(prompt)])
    assert torch.equal(got, want), (
        f"max |Δ| {(got - want).abs().max().item():.3e}, {(got != want).sum()} differ"
    )


def _as_rollout(sequence):
    from parity.check import Rollout

    return Rollout(
        prompt=sequence[:1], completion=sequence[1:], logprobs=[], temperature=1.0, cached_tokens=0
    )
