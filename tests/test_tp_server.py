"""End to end at TP=2: the real SGLang CPU server with ``--tp-size 2`` (two scheduler processes, gloo)
against the trainer emulating TP=2 (``parity.tp.emulate_tensor_parallel``): every logprob bit for
bit. Negative control: a TP=1 trainer differs on the same rollouts.

Running SGLang 0.5.15 at TP=2 on a CPU without AMX needs two environment variables, which
``truepolicy server`` sets (``server_patches/launcher.py``); with them nothing else changes: SGLang
all-reduces with gloo and our attention / RMSNorm / sampler patches work per rank on the local heads.
"""

from __future__ import annotations

import pytest

from parity.check import collect, compare, format_report, mixed_requests, recompute
from parity.tp import emulate_tensor_parallel
from parity.trainer import prepare_model
from tests.conftest import SERVER_ARGS
from truepolicy.sglang_process import running_server

pytestmark = pytest.mark.server

TP = 2


def seeded(requests_: list[dict], base: int) -> list[dict]:
    """Give every sampled request a ``sampling_seed`` (see test_unseeded_sampling_is_on_policy)."""
    for i, r in enumerate(requests_):
        if r["sampling_params"].get("temperature", 1.0) > 0:
            r["sampling_params"]["sampling_seed"] = base + i
    return requests_


@pytest.fixture(scope="module")
def tp2_server(tiny_qwen3, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "qwen3-tp2.log"
    extra = [*SERVER_ARGS, "--tp-size", str(TP)]
    with running_server(tiny_qwen3, log, extra_args=extra) as server:
        yield server


@pytest.fixture(scope="module")
def trainer(hf_qwen3):
    import copy

    return prepare_model(copy.deepcopy(hf_qwen3))


@pytest.fixture(scope="module")
def tp2_rollouts(tp2_server, trainer):
    vocab = trainer.config.vocab_size
    batch = seeded(mixed_requests(12, vocab, max_new_tokens=10, seed=21), base=500)
    prefix = [(7 * i + 11) % vocab for i in range(40)]
    warm = [{"input_ids": [*prefix, 3], "sampling_params": {"temperature": 0.0, "max_new_tokens": 6},
             "return_logprob": True}]  # fmt: skip
    shared = [
        {
            "input_ids": [*prefix, 100 + i, 200 + i],
            "sampling_params": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8, "ignore_eos": True,
                                "sampling_seed": 77 + i},
            "return_logprob": True,
        }
        for i in range(3)
    ]  # fmt: skip
    parallel = {
        "input_ids": [5, 9, 300, 17, 2, 44],
        "sampling_params": {"n": 4, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12,
                            "ignore_eos": True, "sampling_seed": 1234},
        "return_logprob": True,
    }  # fmt: skip
    out = collect(tp2_server.url, batch)
    out += collect(tp2_server.url, warm)
    hits = collect(tp2_server.url, shared)
    assert all(r.cached_tokens >= 16 for r in hits), [r.cached_tokens for r in hits]
    samples = collect(tp2_server.url, [parallel])
    assert len({tuple(r.completion) for r in samples}) > 1
    assert any(len(r.prompt) > 16 for r in out)  # chunked prefill (16-token chunks) exercised
    return out + hits + samples


def test_tp2_server_equals_trainer_emulating_tp2(trainer, tp2_rollouts):
    emulate_tensor_parallel(trainer, TP)
    try:
        report = compare(tp2_rollouts, recompute(trainer, tp2_rollouts))
    finally:
        emulate_tensor_parallel(trainer, 1)
    assert report.tokens > 100
    assert report.exact and report.train_rollout_logprob_abs_diff == 0.0, (
        f"{report.differing} of {report.tokens} logprobs differ, max |Δ| = {report.max_abs_diff:.3e}\n"
        + format_report(tp2_rollouts, report)
    )


def test_negative_control_a_tp1_trainer_differs(trainer, tp2_rollouts):
    report = compare(tp2_rollouts, recompute(trainer, tp2_rollouts))
    print(format_report(tp2_rollouts, report))
    assert report.differing > report.tokens // 2 and report.train_rollout_logprob_abs_diff > 0.0


def test_unseeded_sampling_is_on_policy(tp2_server, trainer):
    requests_ = mixed_requests(6, trainer.config.vocab_size, max_new_tokens=10, seed=5)
    rollouts = collect(tp2_server.url, requests_)
    emulate_tensor_parallel(trainer, TP)
    try:
        report = compare(rollouts, recompute(trainer, rollouts))
    finally:
        emulate_tensor_parallel(trainer, 1)
    assert report.exact, f"{report.differing} of {report.tokens} differ, max |Δ| = {report.max_abs_diff:.3e}"
