"""Op-level bitwise tests: each patch against HF's op on random inputs (with its negative control),
and proofs that the ops without a patch already compute the same bits on both sides.

Runs SGLang's real layer classes in this process (no engine) through ``sglang_in_process``.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from parity import contract, token_logprobs
from parity.trainer import truepolicy_attention
from server_patches import numerics
from tests.helpers import describe_mismatch

BF16 = torch.bfloat16


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    assert torch.equal(got, want), describe_mismatch(got, want)


def count_differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.double() != b.double()).sum())


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))


# --- RMSNorm: patched -----------------------------------------------------------------------------


@pytest.mark.parametrize("hidden,rows", [(128, 37), (32, 301), (4096, 5)])
def test_rmsnorm_patch_matches_hf(sglang_in_process, gen, hidden, rows):
    from sglang.srt.layers.layernorm import RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    weight = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(BF16)
    sgl = RMSNorm(hidden, eps=1e-6)
    sgl.weight.data = weight.clone()
    hf = Qwen3RMSNorm(hidden, eps=1e-6).to(BF16)
    hf.weight.data = weight.clone()
    x = (3 * torch.randn(rows, hidden, generator=gen)).to(BF16)
    residual = (3 * torch.randn(rows, hidden, generator=gen)).to(BF16)
    with torch.no_grad():
        want_plain = hf(x)
        want_sum = residual + x  # HF decoder layer: residual add in bf16, then the norm
        want_norm = hf(want_sum)
        assert_bitwise(numerics.rms_norm_forward(sgl, x), want_plain)
        got_norm, got_sum = numerics.rms_norm_forward(sgl, x, residual.clone())
        assert_bitwise(got_sum, want_sum)
        assert_bitwise(got_norm, want_norm)
        # Negative control: SGLang's own forward_native differs from HF on the same inputs.
        plain = RMSNorm.forward_native(sgl, x)
        fused, _ = RMSNorm.forward_native(sgl, x, residual.clone())
    assert count_differing(plain, want_plain) > 0
    assert count_differing(fused, want_norm) > 0


# --- attention: patched (decode == extend == trainer) ---------------------------------------------


def _paged(k_full, v_full, gen, slots=512):
    """Scatter per-request K/V [L, H, D] into a shuffled paged pool; return pool + req_to_token."""
    perm = torch.randperm(slots, generator=gen)
    k_cache = torch.full((slots, *k_full[0].shape[1:]), float("nan"), dtype=BF16)
    v_cache = k_cache.clone()
    req_to_token = torch.zeros((len(k_full), max(k.shape[0] for k in k_full)), dtype=torch.int32)
    taken = 0
    for r, (k, v) in enumerate(zip(k_full, v_full, strict=True)):
        loc = perm[taken : taken + k.shape[0]]
        k_cache[loc], v_cache[loc] = k, v
        req_to_token[r, : k.shape[0]] = loc.to(torch.int32)
        taken += k.shape[0]
    return k_cache, v_cache, req_to_token


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 32), (8, 1, 64), (2, 2, 128)])
def test_attention_patches_decode_equals_extend_equals_trainer(gen, hq, hkv, d):
    lengths = [1, 7, 33, 70]
    qs = [torch.randn(n, hq, d, generator=gen).to(BF16) for n in lengths]
    ks = [torch.randn(n, hkv, d, generator=gen).to(BF16) for n in lengths]
    vs = [torch.randn(n, hkv, d, generator=gen).to(BF16) for n in lengths]
    k_cache, v_cache, req_to_token = _paged(ks, vs, gen)
    scale = d**-0.5
    module = types.SimpleNamespace(is_causal=True)
    trainer = [
        truepolicy_attention(
            module, q.movedim(0, 1)[None], k.movedim(0, 1)[None], v.movedim(0, 1)[None], None, scale
        )[0][0]
        for q, k, v in zip(qs, ks, vs, strict=True)
    ]  # each [L, Hq, D]
    idx = torch.arange(len(lengths))
    lens = torch.tensor(lengths)

    # Extend in one batch, each request split at a different cached-prefix length (chunked prefill /
    # prefix hits): the rows after the prefix.
    for cut in (0.0, 0.3, 0.9):
        prefix = torch.tensor([int(n * cut) for n in lengths])
        new = lens - prefix
        query = torch.cat([q[p:] for q, p in zip(qs, prefix.tolist(), strict=True)])
        out = torch.full_like(query, float("nan"))
        numerics.attention_extend(
            None,
            query,
            out,
            k_cache,
            v_cache,
            req_to_token,
            idx,
            lens,
            prefix,
            new,
            causal=True,
            scaling=scale,
        )
        want = torch.cat([t[p:] for t, p in zip(trainer, prefix.tolist(), strict=True)])
        assert_bitwise(out, want)

    # Decode: the last row of every request, batched.
    query = torch.stack([q[-1] for q in qs])
    out = torch.full_like(query, float("nan"))
    numerics.attention_decode(None, query, out, k_cache, v_cache, req_to_token, idx, lens, scaling=scale)
    assert_bitwise(out, torch.stack([t[-1] for t in trainer]))


def test_attention_negative_control_sdpa_decode_differs_from_full_sequence(sglang_in_process, gen):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    hq, hkv, d, n = 4, 2, 32, 300
    q, k, v = (torch.randn(n, h, d, generator=gen).to(BF16) for h in (hq, hkv, hkv))
    k_cache, v_cache, req_to_token = _paged([k], [v], gen)
    full = F.scaled_dot_product_attention(
        q.movedim(0, 1)[None], k.movedim(0, 1)[None], v.movedim(0, 1)[None], is_causal=True, enable_gqa=True
    )[0].movedim(0, 1)
    diffs = 0
    for length in range(200, n + 1):
        out = torch.empty(1, hq, d, dtype=BF16)
        TorchNativeAttnBackend._run_sdpa_forward_decode(
            None, q[length - 1 : length], out, k_cache, v_cache, req_to_token, torch.tensor([0]),
            torch.tensor([length]), scaling=d**-0.5, enable_gqa=True,
        )  # fmt: skip
        diffs += count_differing(out[0], full[length - 1])
    assert diffs > 0


# --- logprobs: patched ----------------------------------------------------------------------------


def _sampling_info(temperatures, top_p):
    b = temperatures.shape[0]
    return types.SimpleNamespace(
        is_all_greedy=False, need_top_p_sampling=top_p < 1.0, need_top_k_sampling=False,
        need_min_p_sampling=False, temperatures=temperatures.view(-1, 1), top_ps=torch.full((b,), top_p),
        top_ks=torch.full((b,), 1 << 30, dtype=torch.int32), min_ps=torch.zeros(b), sampling_seed=None,
        has_custom_logit_processor=False, grammars=None, device="cpu",
    )  # fmt: skip


def _sampler():
    from sglang.srt.layers.sampler import Sampler

    sampler = object.__new__(Sampler)
    torch.nn.Module.__init__(sampler)
    sampler.rl_on_policy_target = None
    sampler.enable_deterministic = False
    sampler.use_log_softmax_logprob = False
    sampler.use_ascend_backend = False
    sampler.tp_sync_group = None
    return sampler


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_patch_reports_the_trainer_formula(sglang_in_process, gen, top_p):
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.layers.sampler import Sampler

    b, vocab = 64, 1031
    logits = (4 * torch.randn(b, vocab, generator=gen)).to(BF16).float()
    temperatures = torch.tensor([0.5, 0.7, 1.0, 1.3])[torch.randint(0, 4, (b,), generator=gen)]
    sampler = _sampler()
    args = ([0] * b, [None] * b, torch.arange(b))

    out = LogitsProcessorOutput(next_token_logits=logits.clone())
    ids = numerics.sampler_forward(
        Sampler.forward, sampler, out, _sampling_info(temperatures, top_p), True, *args
    )
    # The trainer computes each token alone, with its temperature as a Python float.
    want = torch.stack(
        [token_logprobs(logits[i : i + 1], ids[i : i + 1], float(t))[0] for i, t in enumerate(temperatures)]
    )
    assert_bitwise(out.next_token_logprobs, want)

    # Negative control: SGLang's own logprobs of the same sampled tokens differ from the trainer's.
    plain = LogitsProcessorOutput(next_token_logits=logits.clone())
    own_ids = Sampler.forward(sampler, plain, _sampling_info(temperatures, top_p), True, *args)
    own_want = torch.stack(
        [
            token_logprobs(logits[i : i + 1], own_ids[i : i + 1], float(t))[0]
            for i, t in enumerate(temperatures)
        ]
    )
    assert count_differing(plain.next_token_logprobs, own_want) > 0


@pytest.mark.parametrize("top_p", [1.0, 0.9], ids=["plain", "top-p"])
def test_sampler_patch_runs_sglang_sampler_without_its_logprobs(sglang_in_process, gen, top_p):
    """SGLang's sampler runs with return_logprob=False under the patch (its own logprobs would be
    overwritten): the same ids as SGLang's sampler with its logprobs, from the same random state, and
    every logprob field comes from the patch."""
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.layers.sampler import Sampler

    b, vocab = 16, 1031
    logits = (4 * torch.randn(b, vocab, generator=gen)).to(BF16).float()
    temperatures = torch.tensor([0.5, 1.0, 1.3])[torch.randint(0, 3, (b,), generator=gen)]
    sampler = _sampler()
    args = ([2] * b, [None] * b, torch.arange(b))
    flags = []

    def recorded(self, logits_output, sampling_info, return_logprob, *rest):
        flags.append(return_logprob)
        return Sampler.forward(self, logits_output, sampling_info, return_logprob, *rest)

    torch.manual_seed(0)
    out = LogitsProcessorOutput(next_token_logits=logits.clone())
    ids = numerics.sampler_forward(recorded, sampler, out, _sampling_info(temperatures, top_p), True, *args)
    torch.manual_seed(0)
    own = LogitsProcessorOutput(next_token_logits=logits.clone())
    own_ids = Sampler.forward(sampler, own, _sampling_info(temperatures, top_p), True, *args)
    assert flags == [False]
    assert torch.equal(ids, own_ids)
    assert out.next_token_logprobs.shape == (b,) and len(out.next_token_top_logprobs_val) == b
    assert count_differing(out.next_token_logprobs, own.next_token_logprobs) > 0  # the patch's, not SGLang's


def test_sampler_patch_top_logprobs_come_from_the_same_matrix(sglang_in_process, gen):
    """With top-k or token-id logprobs asked for, the patch builds the contract's full matrix: the
    sampled tokens' logprobs are bitwise the ones the rollout path (no matrix) reports, and the top-k
    and by-id values are the matrix's entries."""
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.layers.sampler import Sampler

    from parity.logprobs import logprobs_matrix

    b, vocab = 12, 1031
    logits = (4 * torch.randn(b, vocab, generator=gen)).to(BF16).float()
    temperatures = torch.tensor([0.5, 1.0, 1.3])[torch.randint(0, 3, (b,), generator=gen)]
    info = _sampling_info(temperatures, 1.0)
    sampler = _sampler()
    torch.manual_seed(0)
    plain = LogitsProcessorOutput(next_token_logits=logits.clone())
    ids = numerics.sampler_forward(
        Sampler.forward, sampler, plain, info, True, [0] * b, [None] * b, torch.arange(b)
    )
    torch.manual_seed(0)
    rich = LogitsProcessorOutput(next_token_logits=logits.clone())
    by_id = [[1, 2, 3]] + [None] * (b - 1)
    same = numerics.sampler_forward(
        Sampler.forward, sampler, rich, info, True, [3] * b, by_id, torch.arange(b)
    )
    assert torch.equal(ids, same)
    assert_bitwise(rich.next_token_logprobs, plain.next_token_logprobs)
    full = logprobs_matrix(logits, temperatures.view(-1, 1))
    top = torch.stack(rich.next_token_top_logprobs_val)  # one [3] tensor per request
    assert_bitwise(top, full.topk(3, dim=-1).values)
    assert_bitwise(torch.tensor(rich.next_token_token_ids_logprobs_val[0]), full[0, [1, 2, 3]])


def test_logprob_rows_are_batch_invariant(gen):
    logits = (5 * torch.randn(33, 4099, generator=gen)).to(BF16)
    ids = torch.randint(0, 4099, (33,), generator=gen)
    full = token_logprobs(logits, ids, 0.7)
    for i in range(33):
        assert_bitwise(token_logprobs(logits[i : i + 1], ids[i : i + 1], 0.7), full[i : i + 1])


# --- ops that need no patch: proofs that both engines compute the same bits -----------------------


def test_linear_rows_are_batch_invariant_and_merged_equals_split(gen):
    hidden = 128
    x = torch.randn(300, hidden, generator=gen).to(BF16)
    wq, wk, wv = (torch.randn(n, hidden, generator=gen).to(BF16) for n in (128, 64, 64))
    bias = torch.randn(256, generator=gen).to(BF16)
    merged_w = torch.cat([wq, wk, wv])
    full = F.linear(x, merged_w, bias)
    for m in (1, 2, 3, 5, 7, 8, 9, 16, 17, 33, 100, 257):
        assert_bitwise(F.linear(x[:m], merged_w, bias), full[:m])
    split = torch.cat(
        [F.linear(x, w, b) for w, b in zip((wq, wk, wv), bias.split([128, 64, 64]), strict=True)], -1
    )
    assert_bitwise(full, split)
    wg, wu = (torch.randn(256, hidden, generator=gen).to(BF16) for _ in range(2))
    assert_bitwise(F.linear(x, torch.cat([wg, wu])), torch.cat([F.linear(x, wg), F.linear(x, wu)], -1))


def test_lm_head_matmul_equals_linear(gen):
    h = torch.randn(37, 128, generator=gen).to(BF16)
    w = torch.randn(1024, 128, generator=gen).to(BF16)
    assert_bitwise(torch.matmul(h, w.T), F.linear(h, w))


def test_silu_of_every_bf16_value_is_path_independent():
    """PyTorch computes a tensor's tail with scalar libm and the rest vectorized; in fp32 the two can
    differ (counted below), but no bf16 input rounds differently: SiLU needs no patch."""
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(BF16)
    values = values[torch.isfinite(values)]
    vectorized = F.silu(values)
    scalar = torch.stack([F.silu(v.reshape(1))[0] for v in values])
    assert_bitwise(vectorized.view(torch.int16), scalar.view(torch.int16))
    f32 = values.float()
    assert count_differing(F.silu(f32), torch.stack([F.silu(v.reshape(1))[0] for v in f32])) > 0


def test_silu_and_mul_sglang_equals_hf_mlp(sglang_in_process, gen):
    from sglang.srt.layers.activation import SiluAndMul

    gate_up = (4 * torch.randn(41, 512, generator=gen)).to(BF16)
    gate, up = gate_up.split(256, -1)
    assert_bitwise(SiluAndMul().forward_native(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize(
    "head_dim,base,max_pos", [(32, 10000.0, 2048), (64, 500000.0, 8192), (128, 1e6, 40960)]
)
def test_rope_sglang_equals_hf(sglang_in_process, gen, head_dim, base, max_pos):
    from sglang.srt.layers.rotary_embedding import get_rope
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    config = Qwen3Config(
        head_dim=head_dim, max_position_embeddings=max_pos,
        rope_parameters={"rope_type": "default", "rope_theta": base},
    )  # fmt: skip
    sgl = get_rope(head_dim, rotary_dim=head_dim, max_position=max_pos, base=base)
    hf = Qwen3RotaryEmbedding(config)
    n, hq, hkv = 301, 4, 2
    positions = torch.randperm(max_pos, generator=gen)[:n]
    q = (3 * torch.randn(n, hq * head_dim, generator=gen)).to(BF16)
    k = (3 * torch.randn(n, hkv * head_dim, generator=gen)).to(BF16)
    got_q, got_k = sgl.forward_native(positions, q.clone(), k.clone())
    cos, sin = hf(q[None], positions[None])
    want_q, want_k = apply_rotary_pos_emb(
        q.view(1, n, hq, head_dim).transpose(1, 2), k.view(1, n, hkv, head_dim).transpose(1, 2), cos, sin
    )
    assert_bitwise(got_q, want_q.transpose(1, 2).reshape(n, -1))
    assert_bitwise(got_k, want_k.transpose(1, 2).reshape(n, -1))


def test_rms_norm_contract_is_row_invariant(gen):
    x = torch.randn(257, 4096, generator=gen).to(BF16)
    w = torch.randn(4096, generator=gen).to(BF16)
    full = contract.rms_norm(x, w, 1e-6)
    for m in (1, 3, 8, 100):
        assert_bitwise(contract.rms_norm(x[:m], w, 1e-6), full[:m])


def test_chunked_prompt_logprobs_are_refused():
    with pytest.raises(NotImplementedError, match="input_logprobs_chunked"):
        numerics.refuse_chunked_input_logprobs(None, None)
