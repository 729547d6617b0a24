"""parity.compute_logprobs and the tiny-model fixtures."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from parity import compute_logprobs, logprobs_matrix, token_logprobs
from parity.ops.policy_loss import logprobs_reference
from parity.tiny_models import build_tiny_model, load_hf_model


def test_token_logprobs_matches_float64_reference():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(7, 301, generator=gen) * 4).to(torch.bfloat16)
    ids = torch.randint(0, 301, (7,), generator=gen)
    got = token_logprobs(logits, ids, 0.7)
    assert got.dtype == torch.float32
    ref = torch.log_softmax(logits.double() / torch.tensor(0.7, dtype=torch.float32).double(), -1)
    ref = ref.gather(-1, ids[:, None]).squeeze(-1)
    assert torch.allclose(got.double(), ref, rtol=0, atol=1e-5)


def test_compute_logprobs_is_the_full_forward_formula(hf_qwen3):
    seq = [4, 99, 1000, 5, 6, 7, 8, 300]
    (lp,) = compute_logprobs(hf_qwen3, [seq], [3], temperature=1.0)
    with torch.no_grad():
        logits = hf_qwen3(input_ids=torch.tensor([seq])).logits[0]
    want = logprobs_reference(logits[2:7], torch.tensor(seq[3:]))
    assert lp.shape == (5,)
    assert torch.equal(lp, want)


def test_matrix_token_and_per_row_temperatures_agree_bitwise():
    """One contract: the full matrix, the gathered token logprob and per-row temperatures agree."""
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(9, 2053, generator=gen) * 5).to(torch.bfloat16)
    ids = torch.randint(0, 2053, (9,), generator=gen)
    temps = torch.tensor([0.7, 1.0, 1.3, 0.7, 1.0, 0.5, 1.3, 0.7, 1.0])[:, None]
    matrix = logprobs_matrix(logits, temps)
    gathered = matrix.gather(-1, ids[:, None])[:, 0]
    alone = torch.stack(
        [logprobs_reference(logits[i : i + 1], ids[i : i + 1], float(temps[i]))[0] for i in range(9)]
    )
    assert torch.equal(token_logprobs(logits, ids, temps), alone)
    assert torch.equal(gathered, alone)
    # Negative control: torch's fp32 log_softmax is a different reduction and differs in the last bits.
    plain = torch.log_softmax(logits.float() / temps, -1)
    assert int((plain != matrix).sum()) > 0


def test_compute_logprobs_rejects_bad_starts(hf_qwen3):
    with pytest.raises(ValueError, match="start 0 out of range"):
        compute_logprobs(hf_qwen3, [[1, 2, 3]], [0])
    with pytest.raises(ValueError, match="2 start indices"):
        compute_logprobs(hf_qwen3, [[1, 2, 3]], [1, 2])


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_tiny_models_are_seeded_bf16_and_cached(arch, tmp_path):
    a = build_tiny_model(arch, cache_dir=tmp_path / "a")
    b = build_tiny_model(arch, cache_dir=tmp_path / "b")
    assert build_tiny_model(arch, cache_dir=tmp_path / "a") == a
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(t.dtype == torch.bfloat16 for t in wa.values())
    other = load_file(build_tiny_model(arch, seed=1, cache_dir=tmp_path / "a") / "model.safetensors")
    assert not torch.equal(other["lm_head.weight"], wa["lm_head.weight"])
    assert load_hf_model(a).config.model_type == arch
