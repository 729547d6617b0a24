"""The GPU numerics patches (issue 4): SGLang's triton attention backend, its linear layers and lm_head,
and the RMSNorm's CUDA path, routed through the kernels the trainer side also runs.

On a GPU the CPU patches of ``server_patches.table`` are not on the code paths SGLang takes: attention
goes through ``TritonAttnBackend.forward_extend`` / ``forward_decode`` (two different Triton kernels,
split counts that depend on the batch), projections through cuBLAS (kernel choice depends on M),
RMSNorm through ``forward_cuda`` (sgl_kernel's fused norm). ``GPU_PATCHES`` replaces them with:

- ``parity.ops.paged_attention`` (fixed-size KV chunks: a decode row is bitwise the extend row, and
  the trainer's full sequence, at any batch composition);
- ``parity.ops.batch_invariant_matmul`` for every unquantized linear layer and the lm_head (rows
  independent of M; the trainer's ``nn.Linear`` modules call the same kernel);
- ``parity.ops.rms_norm_pairwise`` for ``RMSNorm.forward_cuda`` (HF's cast order, as on the CPU, with
  the variance summed by a fixed pairwise tree: the GPU contract's norm, which the fused TP all-reduce
  + RMSNorm kernel also computes; PyTorch's CUDA ``mean`` has no stated order).

Everything outside what the kernels compute raises ``NotImplementedError`` naming the patch (sliding
window, logit capping, sinks, FP8 KV cache, MLA, DCP, paged KV with page_size > 1, the unified
virtual KV pool, speculative decoding) instead of computing other bits. Decode may be captured in a
CUDA graph (``truepolicy server --cuda-graph``): the split-KV grid is then sized for the whole context
(``req_to_token``'s width), as a replay serves any lengths; the programs past a request's last chunk
exit at once, and the bits are those of any other launch.

Integration (``server_patches/plugin.py``, not edited here): when on-policy mode is on and the server
runs on CUDA (``get_global_server_args().device == "cuda"``), check and register ``GPU_PATCHES`` in
addition to ``PATCHES``, with the same all-or-nothing rule (any ``Patch.check()`` failure refuses the
start), and require ``--attention-backend triton`` (refuse otherwise).
The CPU-only rows of ``PATCHES`` (torch_native attention, the CPU murmur hash, the gloo all-reduce)
stay harmless on a GPU: their targets are not called there.
"""

from __future__ import annotations

import torch

from parity.ops import DEFAULT_GPU_ATTENTION, gpu_attention_kernels
from parity.ops.batch_invariant_matmul import batch_invariant_linear
from parity.ops.qk_norm import qk_rms_norm, qk_rms_norm_reference
from parity.ops.rms_norm_pairwise import rms_norm_pairwise_kernel
from parity.ops.rope import apply_rope, cos_sin_table, hf_inv_freq, rope_reference
from parity.ops.seeded_gumbel import seeded_gumbel_argmax
from parity.ops.silu_and_mul import TABLE_DTYPES as SILU_TABLE_DTYPES
from parity.ops.silu_and_mul import silu_and_mul, silu_table
from server_patches import numerics
from server_patches.moe_patches import MOE_GPU_PATCHES
from server_patches.patch import Patch

_TRITON = "sglang.srt.layers.attention.triton_backend.TritonAttnBackend"

# The attention kernel family the triton-backend hooks run (parity.ops.GPU_ATTENTION_KINDS): "mma"
# (parity.ops.paged_attention_mma: tensor cores, the default) or "exact" (parity.ops.paged_attention:
# fp32 CUDA-core arithmetic, reproduced bit for bit by a plain-PyTorch reference). The trainer must use
# the same family (parity.prepare_model(..., gpu_attention=...)). Chosen once per process by the plugin.
_attention = gpu_attention_kernels(DEFAULT_GPU_ATTENTION)


def select_attention(kind: str) -> None:
    """Make the attention hooks run the ``kind`` kernel family (before the server runs a batch)."""
    global _attention
    _attention = gpu_attention_kernels(kind)


_GPU_TESTS = "tests/test_paged_attention_gpu.py"
_OP_TESTS = "tests/test_gpu_op_patches.py"
_BACKEND_PARAMS = ("self", "q", "k", "v", "layer", "forward_batch", "save_kv_cache", "sinks")


def _outside(patch: str, what: str) -> NotImplementedError:
    return NotImplementedError(f"truepolicy patch {patch!r}: {what} is outside the numerics contract")


def _check_attention(patch: str, backend, layer, forward_batch, sinks) -> None:
    """Refuse every configuration the contract's attention does not define."""
    from sglang.srt.layers.radix_attention import AttentionType

    checks = (
        (getattr(backend, "use_mla", False), "MLA"),
        (getattr(backend, "dcp_size", 1) > 1, "decode context parallelism"),
        (getattr(backend, "page_size", 1) != 1, "a paged KV cache with page_size > 1"),
        (getattr(backend, "_translate_kv_loc", None) is not None, "the unified (virtual) KV pool"),
        (getattr(backend, "use_sliding_window_kv_pool", False), "a sliding-window KV pool"),
        (sinks is not None, "attention sinks"),
        ((layer.logit_cap or 0) > 0, "logit capping"),
        (layer.sliding_window_size not in (None, -1), "sliding-window attention"),
        (layer.is_cross_attention or layer.attn_type != AttentionType.DECODER, "non-causal attention"),
        (layer.k_scale is not None or layer.v_scale is not None, "a scaled (FP8) KV cache"),
        (layer.qk_head_dim != layer.v_head_dim, "different q/k and v head dims"),
        ((getattr(layer, "xai_temperature_len", -1) or -1) > 0, "xai temperature scaling"),
        (forward_batch.spec_info is not None, "speculative decoding"),
    )
    for bad, what in checks:
        if bad:
            raise _outside(patch, what)


def _write_kv(backend, forward_batch, layer, k, v) -> None:
    """Store the new tokens' K/V as SGLang's backend does (no scales: refused above)."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    meta = backend.forward_metadata
    loc = KVWriteLoc(
        forward_batch.out_cache_loc, meta.swa_out_cache_loc, full_loc=meta.out_cache_loc_full_physical
    )
    backend._set_kv_buffer(forward_batch, layer, loc, k, v)


def triton_forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None):
    """REPLACE TritonAttnBackend.forward_extend: each new row after its request's cached prefix."""
    _check_attention("triton_attention_extend", self, layer, forward_batch, sinks)
    if (k is None) != (v is None):
        raise ValueError("Both k and v should be None or not None")
    if k is not None:
        if not save_kv_cache:
            raise _outside(
                "triton_attention_extend", "extend without saving the new KV (save_kv_cache=False)"
            )
        _write_kv(self, forward_batch, layer, k, v)  # the kernel reads every key from the cache
    heads, dim = layer.tp_q_head_num, layer.qk_head_dim
    o = torch.empty((q.shape[0], heads * dim), dtype=q.dtype, device=q.device)
    _attention.paged_attention_extend(
        q.reshape(-1, heads, dim),
        self.token_to_kv_pool.get_key_buffer(layer.layer_id),
        self.token_to_kv_pool.get_value_buffer(layer.layer_id),
        self.req_to_token,
        forward_batch.req_pool_indices,
        forward_batch.extend_prefix_lens,
        forward_batch.extend_seq_lens,
        layer.scaling,
        out=o.view(-1, heads, dim),
    )
    return o


def triton_forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None):
    """REPLACE TritonAttnBackend.forward_decode: one row per request, split into fixed-size chunks."""
    _check_attention("triton_attention_decode", self, layer, forward_batch, sinks)
    heads, dim = layer.tp_q_head_num, layer.qk_head_dim
    q = q.reshape(-1, heads * dim)
    o = torch.empty_like(q)
    if save_kv_cache:
        _write_kv(self, forward_batch, layer, k, v)
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    max_chunks = decode_max_chunks(
        self.req_to_token.shape[1], getattr(forward_batch, "seq_lens_cpu", None), _attention.CONTRACT_CHUNK,
        capturing,
    )  # fmt: skip
    _attention.paged_attention_decode(
        q.view(-1, heads, dim),
        self.token_to_kv_pool.get_key_buffer(layer.layer_id),
        self.token_to_kv_pool.get_value_buffer(layer.layer_id),
        self.req_to_token,
        forward_batch.req_pool_indices,
        forward_batch.seq_lens,
        layer.scaling,
        out=o.view(-1, heads, dim),
        max_chunks=max_chunks,
    )
    return o


def decode_max_chunks(
    context: int, seq_lens_cpu: torch.Tensor | None, chunk: int, capturing: bool
) -> int | None:
    """The decode grid's bound on chunks per request: under CUDA-graph capture the whole context (a
    graph is replayed for any lengths up to ``context``, the width of ``req_to_token``; the seq lens
    seen at capture are placeholders), else the batch's longest request from ``seq_lens_cpu`` (None
    without it: the kernel's launcher syncs with the device to find it)."""
    if capturing:
        return -(-context // chunk)
    if seq_lens_cpu is None or not seq_lens_cpu.numel():
        return None
    return -(-int(seq_lens_cpu.max()) // chunk)


def linear_batch_invariant(original, self, layer, x, bias=None):
    """AROUND UnquantizedLinearMethod.apply: bf16/fp16 CUDA projections by the M-invariant kernel."""
    if not x.is_cuda:
        return original(self, layer, x, bias)
    if x.dtype not in (torch.bfloat16, torch.float16) or layer.weight.dtype != x.dtype:
        raise _outside("linear_batch_invariant", f"a {x.dtype} x {layer.weight.dtype} linear layer")
    return batch_invariant_linear(x, layer.weight, bias)


def lm_head_batch_invariant(original, self, hidden_states, lm_head, embedding_bias=None):
    """AROUND LogitsProcessor._compute_lm_head: the plain bf16 lm_head by the M-invariant kernel."""
    if not hidden_states.is_cuda:
        return original(self, hidden_states, lm_head, embedding_bias)
    from sglang.srt.layers.logits_processor import should_apply_lm_head_quant_method

    if hasattr(lm_head, "set_lora") and hasattr(lm_head, "apply_lora"):
        raise _outside("lm_head_batch_invariant", "a LoRA lm_head")
    if not hasattr(lm_head, "weight") or should_apply_lm_head_quant_method(
        lm_head, getattr(lm_head, "quant_method", None)
    ):
        raise _outside("lm_head_batch_invariant", "a quantized lm_head")
    if self.use_fp32_lm_head:
        raise _outside("lm_head_batch_invariant", "the fp32 lm_head option")
    return batch_invariant_linear(hidden_states.to(lm_head.weight.dtype), lm_head.weight)


def _refuse_inside_capture(patch: str, table: str, device: torch.device) -> None:
    """A patch's table is built at its first call, by torch ops that must run eagerly: refuse if that
    call is being captured into a CUDA graph (SGLang runs two warm-up forwards before it captures)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"truepolicy patch {patch!r}: {table} would be built inside CUDA-graph capture (no forward ran "
            "before it)"
        )


_SILU_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}  # silu_table per dtype, device


def _silu_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``parity.ops.silu_and_mul.silu_table`` (torch's F.silu of every 16-bit pattern, on ``device``),
    built once per process, dtype and device, outside CUDA-graph capture (SGLang runs two warm-up
    forwards before it captures)."""
    key = (dtype, device)
    if key not in _SILU_TABLES:
        _refuse_inside_capture("silu_and_mul_cuda", "the SiLU table", device)
        _SILU_TABLES[key] = silu_table(dtype, device)
    return _SILU_TABLES[key]


def seeded_gumbel_split_rows(original, logprobs, seed, positions):
    """AROUND ``multinomial_with_seed``: on CUDA ``parity.ops.seeded_gumbel`` (each row split across
    programs; the same formula element for element, the same first maximal column: SGLang's ids);
    elsewhere SGLang's own compiled function."""
    if logprobs.is_cuda:
        return seeded_gumbel_argmax(logprobs, seed, positions)
    return original(logprobs, seed, positions)


def silu_and_mul_hf(self, x):
    """REPLACE SiluAndMul.forward_cuda: HF's ``act_fn(gate) * up`` (two roundings) where sgl_kernel's
    fused kernel multiplies in fp32 and rounds once. bf16/fp16 on CUDA: one kernel (``parity.ops.
    silu_and_mul``: torch's own F.silu per 16-bit pattern from a table, the product rounded once as
    torch's multiply rounds), bitwise HF's two ops. fp32 activations (no table) and off CUDA (tests):
    SGLang's ``forward_native``, which is HF's formula op by op (SGLang's own ``rl_on_policy_target``
    mode makes that switch) -- the same bits."""
    if x.is_cuda and x.dtype in SILU_TABLE_DTYPES:
        return silu_and_mul(x, _silu_table(x.dtype, x.device))
    return self.forward_native(x)


def _rope_table(rope, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's cos/sin table (``parity.ops.rope.cos_sin_table``: HF's values at every position
    SGLang's own cache covers: ``max_position_embeddings``, or more where SGLang reserved its cache
    for a longer context at load), built once per device and dtype, outside CUDA-graph capture
    (SGLang runs two warm-up forwards before it captures)."""
    tables = rope.__dict__.setdefault("_truepolicy_rope_tables", {})
    key = (device, dtype)
    if key not in tables:
        _refuse_inside_capture("rope_cuda", "the cos/sin table", device)
        inv_freq = hf_inv_freq(rope.rotary_dim, rope.base)  # on the CPU, as HF computes it
        cache = getattr(rope, "cos_sin_cache", None)
        length = max(rope.max_position_embeddings, cache.shape[0] if cache is not None else 0)
        tables[key] = cos_sin_table(inv_freq, length, dtype, device)
    return tables[key]


def rope_hf(self, positions, query, key, offsets=None, fused_set_kv_buffer_arg=None):
    """REPLACE RotaryEmbedding.forward_cuda: HF's rotary embedding, bitwise its op-by-op result, as one
    kernel (``parity.ops.rope``). HF computes ``freqs = inv_freq x positions`` in fp32 (a K=1 product:
    one rounding), ``cos``/``sin`` of ``cat(freqs, freqs)`` in fp32 on the device, casts them to the
    activations' dtype and applies ``x * cos + rotate_half(x) * sin`` in bf16; the table holds HF's
    cos/sin per position (torch's own ops, once) and the kernel rounds as HF's ops do. SGLang's CUDA
    path rotates in fp32 with one rounding (sgl_kernel) from a cos/sin cache built at init (inv_freq
    by a device ``pow``). Off CUDA (tests) the plain-PyTorch form of the same op."""
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    if type(self) is not RotaryEmbedding:
        raise _outside("rope_cuda", f"rotary embedding {type(self).__name__} (scaled RoPE variants)")
    if fused_set_kv_buffer_arg is not None:
        raise _outside("rope_cuda", "RoPE fused with the KV-cache write")
    if not self.is_neox_style or self.rotary_dim != self.head_size:
        raise _outside("rope_cuda", "GPT-J style or partial rotary embeddings")
    if offsets is not None:
        positions = positions + offsets
    positions = positions.flatten()
    cos, sin = _rope_table(self, query.device, query.dtype)
    if query.is_cuda:
        q, k = apply_rope(positions, query.flatten(1), key.flatten(1), cos, sin)  # [tokens, heads * D]
        return q.view(query.shape), k.view(key.shape)
    return (
        rope_reference(positions, query.flatten(1), cos, sin, self.head_size).view(query.shape),
        rope_reference(positions, key.flatten(1), cos, sin, self.head_size).view(key.shape),
    )


def rms_norm_forward_cuda(self, x, residual=None, post_residual_addition=None):
    """REPLACE ``RMSNorm.forward_cuda``: the GPU contract's norm (``parity.ops.rms_norm_pairwise``, one
    Triton kernel; with a residual the bf16 add feeds both outputs, as ``forward_native``)."""
    numerics.check_rms_norm_variant("rmsnorm_cuda", self, post_residual_addition)
    if x.dtype != torch.bfloat16 or self.weight.dtype != torch.bfloat16:
        raise _outside("rmsnorm_cuda", f"a {x.dtype} RMSNorm with {self.weight.dtype} weights (bf16 only)")
    normed, summed = rms_norm_pairwise_kernel(x, self.weight, self.variance_epsilon, residual)
    return normed if residual is None else (normed, summed)


def qk_norm_one_kernel(q, k, q_norm, k_norm, head_dim, alt_stream=None, allow_inplace=True):
    """REPLACE ``apply_qk_norm`` (Qwen3's per-head q/k RMSNorms, between the qkv projection and RoPE):
    the GPU contract's norm (``rmsnorm_cuda``'s) of every head of q and k in one kernel
    (``parity.ops.qk_norm``), out of place. SGLang's fused in-place JIT kernel multiplies by the weight
    in fp32 before rounding (HF rounds first); its unfused path copies q and k to contiguous tensors and
    runs two norms: four kernels per layer where this is one. ``alt_stream`` / ``allow_inplace`` only
    choose how SGLang schedules or stores the same values. Off CUDA (tests) the plain-PyTorch form."""
    from sglang.srt.layers.layernorm import RMSNorm

    for norm in (q_norm, k_norm):
        if type(norm) is not RMSNorm:
            raise _outside("qk_norm_cuda", f"a {type(norm).__name__} q/k norm")
        numerics.check_rms_norm_variant("qk_norm_cuda", norm, None)
    if q_norm.variance_epsilon != k_norm.variance_epsilon:
        raise _outside("qk_norm_cuda", "q and k norms with different epsilons")
    if any(t.dtype != torch.bfloat16 for t in (q, k, q_norm.weight, k_norm.weight)):
        raise _outside("qk_norm_cuda", f"{q.dtype} q/k with {q_norm.weight.dtype} norm weights (bf16 only)")
    norm = qk_rms_norm if q.is_cuda else qk_rms_norm_reference
    # (..., heads * head_dim) as rows: a view for SGLang's 2-D qkv slices (a copy only for other layouts)
    q_out, k_out = norm(
        q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1]), q_norm.weight, k_norm.weight,
        q_norm.variance_epsilon, head_dim,
    )  # fmt: skip
    return q_out.view(q.shape), k_out.view(k.shape)


GPU_PATCHES: tuple[Patch, ...] = (
    Patch(
        name="triton_attention_extend",
        target=f"{_TRITON}.forward_extend",
        diverges=(
            "SGLang's extend kernel walks the KV in its own blocks with tensor-core dots, unlike its "
            "decode kernel and the trainer's flash attention: a token's row depends on how it was computed."
        ),
        proof=f"{_GPU_TESTS}::test_decode_equals_extend_equals_trainer_on_random_batches",
        drop_when="SGLang computes decode and extend rows with one fixed-chunk reduction the trainer shares",
        hook=triton_forward_extend,
        hook_type="REPLACE",
        expected_params=_BACKEND_PARAMS,
    ),
    Patch(
        name="triton_attention_decode",
        target=f"{_TRITON}.forward_decode",
        diverges=(
            "SGLang's split-KV decode picks the number of splits from the batch and the GPU, so a row's "
            "reduction order (and bits) depends on what else is decoded with it."
        ),
        proof=f"{_GPU_TESTS}::test_decode_equals_extend_equals_trainer_on_random_batches",
        drop_when="as triton_attention_extend",
        hook=triton_forward_decode,
        hook_type="REPLACE",
        expected_params=_BACKEND_PARAMS,
    ),
    Patch(
        name="linear_batch_invariant",
        target="sglang.srt.layers.quantization.unquant.UnquantizedLinearMethod.apply",
        diverges="cuBLAS picks its GEMM kernel (tiles, split-K) from M: a row's sum order follows the batch.",
        proof="tests/test_batch_invariant_matmul_gpu.py::test_rows_do_not_depend_on_m",
        drop_when="SGLang's linear layers are batch-invariant and the trainer runs the same GEMM",
        hook=linear_batch_invariant,
        hook_type="AROUND",
        expected_params=("self", "layer", "x", "bias"),
    ),
    Patch(
        name="lm_head_batch_invariant",
        target="sglang.srt.layers.logits_processor.LogitsProcessor._compute_lm_head",
        diverges="the lm_head matmul goes to cuBLAS too (M-dependent kernel choice).",
        proof="tests/test_batch_invariant_matmul_gpu.py::test_rows_do_not_depend_on_m",
        drop_when="as linear_batch_invariant",
        hook=lm_head_batch_invariant,
        hook_type="AROUND",
        expected_params=("self", "hidden_states", "lm_head", "embedding_bias"),
    ),
    Patch(
        name="rmsnorm_cuda",
        target="sglang.srt.layers.layernorm.RMSNorm.forward_cuda",
        diverges=(
            "sgl_kernel's fused RMSNorm multiplies by the weight before the bf16 cast (HF casts first) "
            "and normalises the fp32 residual sum, as the native path does on the CPU; its variance "
            "(like PyTorch's CUDA mean) adds the squares in an unstated order."
        ),
        proof="tests/test_rms_norm_pairwise.py::test_kernel_equals_reference_on_cuda",
        drop_when="SGLang's CUDA RMSNorm casts before the weight multiply and rounds the residual first",
        hook=rms_norm_forward_cuda,
        hook_type="REPLACE",
        expected_params=("self", "x", "residual", "post_residual_addition"),
    ),
    Patch(
        name="silu_and_mul_cuda",
        target="sglang.srt.layers.activation.SiluAndMul.forward_cuda",
        diverges="sgl_kernel's SiLU-and-mul multiplies in fp32 and rounds once; HF rounds silu(gate) first.",
        proof=f"tests/test_silu_and_mul.py::test_kernel_equals_hf_formula_on_cuda, {_OP_TESTS}",
        drop_when="never on the GPU (HF's formula rounds twice by definition)",
        hook=silu_and_mul_hf,
        hook_type="REPLACE",
        expected_params=("self", "x"),
    ),
    Patch(
        name="rope_cuda",
        target="sglang.srt.layers.rotary_embedding.base.RotaryEmbedding.forward_cuda",
        diverges=(
            "sgl_kernel rotates in fp32 with one rounding from a cos/sin cache whose inv_freq came from a "
            "device pow; HF computes cos/sin per step from a CPU inv_freq and rotates in bf16."
        ),
        proof=f"{_OP_TESTS} (the patch vs HF's modules), tests/test_rope.py (the one-kernel form)",
        drop_when="never on the GPU (HF's formula by definition)",
        hook=rope_hf,
        hook_type="REPLACE",
        expected_params=("self", "positions", "query", "key", "offsets", "fused_set_kv_buffer_arg"),
    ),
    Patch(
        name="qk_norm_cuda",
        target="sglang.srt.models.utils.apply_qk_norm",
        diverges=(
            "Qwen3's per-head q/k RMSNorms run a JIT fused in-place kernel on CUDA (bypassing "
            "RMSNorm.forward_cuda): it multiplies by the weight in fp32 before rounding, unlike HF. Found "
            "by the GPU end-to-end run: Qwen2 bitwise, Qwen3 427/768 tokens off."
        ),
        proof=(
            "tests/test_qk_norm.py::test_kernel_equals_reference_and_the_unfused_kernels_on_cuda, "
            "tests/test_gpu_op_patches.py::test_qk_norm_patch_equals_the_trainers_norms, "
            "scripts/gpu_server_check.py (Qwen3)"
        ),
        drop_when="SGLang's fused q/k norm casts before the weight multiply",
        hook=qk_norm_one_kernel,
        hook_type="REPLACE",
        expected_params=("q", "k", "q_norm", "k_norm", "head_dim", "alt_stream", "allow_inplace"),
    ),
    Patch(
        name="seeded_sampling_split_rows",
        target="sglang.srt.layers.sampler.multinomial_with_seed",
        diverges=(
            "none (speed): the same token ids. SGLang's compiled seeded Gumbel-max runs one program per "
            "row over the whole vocabulary in float64: 155 us per decode step at 1 request (H200, V "
            "151936), which per_request_seeds makes every rollout pay."
        ),
        proof=(
            "tests/test_seeded_gumbel.py::test_kernel_equals_sglangs_multinomial_with_seed_on_cuda, "
            "tests/test_seeded_gumbel.py::test_kernel_under_the_triton_interpreter"
        ),
        drop_when="SGLang's multinomial_with_seed splits its rows across programs",
        hook=seeded_gumbel_split_rows,
        hook_type="AROUND",
        expected_params=("logprobs", "seed", "positions"),
    ),
    *MOE_GPU_PATCHES,
)
