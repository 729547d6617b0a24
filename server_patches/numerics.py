"""The hook functions of the numerics patches: SGLang's layers calling ``parity.contract``.

Each hook replaces (or wraps) one SGLang function, keeps its signature, and refuses inputs outside
the contract with ``NotImplementedError`` naming the patch rather than computing something else.
The table that applies them, with why and how, is ``server_patches.table``.
"""

from __future__ import annotations

import hashlib

import torch

from parity import contract
from parity.logprobs import logprobs_matrix, sampled_token_logprobs


def _outside(patch: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"truepolicy patch {patch!r}: {what} is outside the numerics contract")


def check_rms_norm_variant(patch: str, norm, post_residual_addition) -> None:
    """Refuse the RMSNorm variants the contract does not compute (for the ``patch`` named)."""
    if (
        norm.variance_size_override is not None
        or norm.fp32_residual
        or norm.override_orig_dtype is not None
        or norm.cast_x_before_out_mul
        or post_residual_addition is not None
    ):
        raise _outside(patch, "an RMSNorm variant (var size override, fp32 residual, ...)")


def rms_norm_forward(self, x, residual=None, post_residual_addition=None):
    """RMSNorm.forward_native: HF's cast order; the residual add in bf16 feeds both outputs."""
    check_rms_norm_variant("rmsnorm", self, post_residual_addition)
    if residual is None:
        return contract.rms_norm(x, self.weight, self.variance_epsilon)
    return contract.add_rms_norm(x, residual, self.weight, self.variance_epsilon)


def _check_attention(patch, k_cache, query, encoder_lens, is_cross_attn, sliding_window_size):
    if encoder_lens is not None or is_cross_attn or sliding_window_size is not None:
        raise _outside(patch, "cross, encoder or sliding-window attention")
    if k_cache.dtype != query.dtype:
        raise _outside(patch, f"a {k_cache.dtype} KV cache with {query.dtype} queries")


def _request_kv(k_cache, v_cache, req_to_token, pool_index, length):
    tokens = req_to_token[pool_index, :length]
    return k_cache[tokens].movedim(0, 1), v_cache[tokens].movedim(0, 1)


def attention_extend(
    self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
    extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None, enable_gqa=False,
    causal=False, is_cross_attn=False, sliding_window_size=None,
):  # fmt: skip
    """TorchNativeAttnBackend._run_sdpa_forward_extend: the new rows of each request, after its
    cached prefix, through ``contract.attention``."""
    _check_attention("attention_extend", k_cache, query, encoder_lens, is_cross_attn, sliding_window_size)
    if not causal:
        raise _outside("attention_extend", "non-causal attention")
    heads_first = query.movedim(0, 1)  # [H, tokens, D]
    start = 0
    for i in range(seq_lens.shape[0]):
        length, new, prefix = int(seq_lens[i]), int(extend_seq_lens[i]), int(extend_prefix_lens[i])
        k, v = _request_kv(k_cache, v_cache, req_to_token, req_pool_indices[i], length)
        rows = contract.attention(heads_first[:, start : start + new], k, v, prefix, scaling)
        output[start : start + new] = rows.movedim(0, 1)
        start += new
    return output


def attention_decode(
    self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
    encoder_lens=None, scaling=None, enable_gqa=False, causal=False, is_cross_attn=False,
    sliding_window_size=None,
):  # fmt: skip
    """TorchNativeAttnBackend._run_sdpa_forward_decode: one row per request, the same function."""
    _check_attention("attention_decode", k_cache, query, encoder_lens, is_cross_attn, sliding_window_size)
    heads_first = query.movedim(0, 1)
    for i in range(seq_lens.shape[0]):
        length = int(seq_lens[i])
        k, v = _request_kv(k_cache, v_cache, req_to_token, req_pool_indices[i], length)
        row = contract.attention(heads_first[:, i : i + 1], k, v, length - 1, scaling)
        output[i : i + 1] = row.movedim(0, 1)
    return output


def sampler_forward(
    original, self, logits_output, sampling_info, return_logprob, top_logprobs_nums, token_ids_logprobs,
    positions,
):  # fmt: skip
    """AROUND Sampler.forward: sample as SGLang does, then report the contract's fp32 logprobs under
    the temperature-scaled full distribution (whatever top-p/top-k did to the sampling): the sampled
    token's, and the requested top-k / token-id logprobs from the same matrix. When only the sampled
    token's is asked for (an RL rollout), it comes from ``sampled_token_logprobs`` (on CUDA one fused
    kernel with per-row temperatures: no [B, V] matrix, no host synchronisation; the same bits as the
    matrix's entry, by the contract). SGLang's sampler runs with ``return_logprob=False``: every
    logprob field it would set is set here, so its own ``[B, V]`` log, clamp and gather would be
    thrown away (four torch operations of host time per decode step, where at one request the step
    waits on the host); the ids do not depend on it."""
    from sglang.srt.layers.utils.logprob import get_token_ids_logprobs, get_top_logprobs

    logits = logits_output.next_token_logits.clone() if return_logprob else None
    ids = original(
        self, logits_output, sampling_info, False, top_logprobs_nums, token_ids_logprobs, positions
    )
    if not return_logprob:
        return ids
    top = any(x > 0 for x in top_logprobs_nums)
    by_id = any(x is not None for x in token_ids_logprobs)
    if not (top or by_id):
        logits_output.next_token_logprobs = sampled_token_logprobs(logits, ids, sampling_info.temperatures)
        return ids
    full = logprobs_matrix(logits, sampling_info.temperatures)
    logits_output.next_token_logprobs = full.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    if top:
        (
            logits_output.next_token_top_logprobs_val,
            logits_output.next_token_top_logprobs_idx,
        ) = get_top_logprobs(full, top_logprobs_nums, no_copy_to_cpu=True)
    if by_id:
        (
            logits_output.next_token_token_ids_logprobs_val,
            logits_output.next_token_token_ids_logprobs_idx,
        ) = get_token_ids_logprobs(full, token_ids_logprobs, no_copy_to_cpu=True)
    return ids


# --- sampling: reproducible from a per-request seed, n samples distinct -----------------------------

# Golden-ratio increment: sample k of a request seeded S uses S + k * GOLDEN (mod 2**63), so the
# first sample of any request uses S itself and the n samples of one request get distinct seeds.
_GOLDEN = 0x9E3779B97F4A7C15
_SEED_MASK = (1 << 63) - 1


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` (0-based) of a request whose ``sampling_seed`` is ``seed``."""
    return (seed + index * _GOLDEN) & _SEED_MASK


class _ParallelSampleCounter:
    """Numbers the copies SGLang's tokenizer manager sends for one request with ``n > 1``.

    The copies of one request share one ``SamplingParams`` object and are sent back to back (no await
    between them), so a run of sends with the same object is one request's samples 0, 1, 2, ...
    The object is held while counting, so its identity cannot be reused meanwhile.
    """

    def __init__(self) -> None:
        self._params = None
        self._next = 0

    def index(self, params) -> int:
        if params is not self._params:
            self._params, self._next = params, 0
        index, self._next = self._next, self._next + 1
        return index


_parallel_samples = _ParallelSampleCounter()


def seed_parallel_samples(self, tokenized_obj):
    """BEFORE TokenizerManager._send_one_request: give sample k of a seeded request its own seed."""
    import msgspec

    params = getattr(tokenized_obj, "sampling_params", None)
    if params is None or getattr(params, "sampling_seed", None) is None:
        return None
    index = _parallel_samples.index(params)
    if index:
        tokenized_obj.sampling_params = msgspec.structs.replace(
            params, sampling_seed=sample_seed(params.sampling_seed, index)
        )
    return (self, tokenized_obj), {}


def seed_from_request_id(rid: str) -> int:
    """A 63-bit seed from a request id: the first 8 bytes of its BLAKE2b digest."""
    digest = hashlib.blake2b(rid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def per_request_seeds(result, cls, batch, vocab_size):
    """AFTER SamplingBatchInfo.from_schedule_batch: every request samples from its own seed.

    A request without ``sampling_seed`` gets one derived from its request id (kept on its own
    SamplingParams, so all its tokens follow one stream). The rid is the same in every TP rank's
    scheduler, so all ranks sample the same token (a random draw per rank would make their KV caches
    diverge). SGLang's pytorch sampler then draws Gumbel noise from murmur_hash(seed, position,
    token id): independent of the batch, reproducible from the seed.
    """
    from sglang.srt.server_args import get_global_server_args

    backend = get_global_server_args().sampling_backend
    if backend != "pytorch":
        raise _outside("per_request_seeds", f"sampling backend {backend!r} (use --sampling-backend pytorch)")
    for req in batch.reqs:
        if req.sampling_params.sampling_seed is None:
            req.sampling_params.sampling_seed = seed_from_request_id(req.rid)
    result.sampling_seed = torch.tensor(
        [req.sampling_params.sampling_seed for req in batch.reqs], dtype=torch.int64
    ).to(batch.device)
    return result


def murmur_hash32_on_cpu(original, seed, positions, col_indices):
    """AROUND murmur_hash32: the plain-PyTorch hash for CPU tensors (Triton has no CPU driver)."""
    from parity.ops.murmur import murmur_hash32_torch

    if seed.device.type == "cpu":
        return murmur_hash32_torch(seed, positions, col_indices)
    return original(seed, positions, col_indices)


def input_logprobs_contract(original, self, input_logits, logits_metadata):
    """AROUND LogitsProcessor.process_input_logprobs: prompt logprobs under the contract.

    SGLang 0.5.15 takes ``log_softmax`` of the bf16 logits in bf16; the trainer's prompt logprob is
    the contract's at temperature 1 (``logprobs_matrix(logits, 1.0)``). This is SGLang's function
    with that one line replaced: the same top-k / token-id helpers and result type, fed the
    contract's matrix.
    """
    from sglang.srt.layers import logits_processor as lp

    logprobs = logprobs_matrix(input_logits, 1.0)
    top_val = top_idx = ids_val = ids_idx = None
    if logits_metadata.extend_return_top_logprob:
        top_val, top_idx = lp.get_top_logprobs_prefill(logprobs, logits_metadata)
    if logits_metadata.extend_token_ids_logprob:
        ids_val, ids_idx = lp.get_token_ids_logprobs_prefill(logprobs, logits_metadata)
    rows = torch.arange(logprobs.shape[0], device=logprobs.device)
    return lp.InputLogprobsResult(
        input_token_logprobs=logprobs[rows, logits_metadata.extend_input_logprob_token_ids_gpu],
        input_top_logprobs_val=top_val,
        input_top_logprobs_idx=top_idx,
        input_token_ids_logprobs_val=ids_val,
        input_token_ids_logprobs_idx=ids_idx,
    )


def refuse_chunked_input_logprobs(original, self, *args, **kwargs):
    """AROUND LogitsProcessor.process_input_logprobs_by_chunk: outside the contract, refuse."""
    raise _outside("input_logprobs_chunked", "SGLANG_ENABLE_LOGITS_PROCESSER_CHUNK (chunked prompt logprobs)")
