"""parity.compute_logprobs and the tiny-model fixtures."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from parity import compute_logprobs, token_logprobs
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
    want = torch.log_softmax(logits.float(), -1)[2:7].gather(-1, torch.tensor(seq[3:])[:, None])[:, 0]
    assert lp.shape == (5,)
    assert torch.equal(lp, want)


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
