"""The patch table: every numerics patch the plugin applies in on-policy mode.

Each row says what it targets, why SGLang's numbers differ from the trainer's without it, which test
proves it and when it can be dropped; docs/parity.md is the same ledger for readers. Every patch is
checked against the installed SGLang (target exists, signature unchanged) before any is registered.
"""

from __future__ import annotations

from server_patches import numerics
from server_patches.patch import Patch

_LAYERNORM = "sglang.srt.layers.layernorm.RMSNorm"
_ROPE = "sglang.srt.layers.rotary_embedding.base.RotaryEmbedding"
_TORCH_NATIVE = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
_SDPA_COMMON = ("query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices", "seq_lens")
_SDPA_FLAGS = ("encoder_lens", "scaling", "enable_gqa", "causal", "is_cross_attn", "sliding_window_size")
_PROOF = "tests/test_contract_ops.py"

PATCHES: tuple[Patch, ...] = (
    Patch(
        name="rmsnorm",
        target=f"{_LAYERNORM}.forward_native",
        diverges=(
            "SGLang multiplies the fp32-normalised x by the weight before the bf16 cast (HF casts "
            "first), and normalises the fp32 sum of x + residual where HF normalises the bf16 sum."
        ),
        proof=f"{_PROOF}::test_rms_norm_patch_matches_hf",
        drop_when="SGLang's native RMSNorm casts before the weight multiply and rounds the residual first",
        hook=numerics.rms_norm_forward,
        hook_type="REPLACE",
        expected_params=("self", "x", "residual", "post_residual_addition"),
    ),
    Patch(
        name="rope_table",
        target=f"{_ROPE}._compute_cos_sin_cache",
        diverges=(
            "cos/sin evaluated over differently shaped tensors (SGLang's [max_pos, d/2] cache vs HF's "
            "per-batch [T, d]) can round differently where PyTorch's vectorized and scalar libm differ."
        ),
        proof=f"{_PROOF}::test_rope_patch_matches_trainer",
        drop_when="both sides compute RoPE from one shared table",
        hook=numerics.rope_cos_sin_cache,
        hook_type="REPLACE",
        expected_params=("self",),
    ),
    Patch(
        name="rope_apply",
        target=f"{_ROPE}.forward_native",
        diverges="one implementation of the rotation on both sides (the arithmetic equals HF's).",
        proof=f"{_PROOF}::test_rope_patch_matches_trainer",
        drop_when="never: it is the shared code path, free on CPU",
        hook=numerics.rope_forward,
        hook_type="REPLACE",
        expected_params=("self", "positions", "query", "key", "offsets", "fused_set_kv_buffer_arg"),
    ),
    Patch(
        name="attention_extend",
        target=f"{_TORCH_NATIVE}._run_sdpa_forward_extend",
        diverges=(
            "SDPA over [prefix + new] per request reduces in an order that depends on the query "
            "length; the trainer's attention runs over the whole sequence."
        ),
        proof=f"{_PROOF}::test_attention_patch_decode_equals_extend_equals_trainer",
        drop_when="never on CPU; the GPU kernel family of issue 4 replaces it there",
        hook=numerics.attention_extend,
        hook_type="REPLACE",
        expected_params=("self", *_SDPA_COMMON, "extend_prefix_lens", "extend_seq_lens", *_SDPA_FLAGS),
    ),
    Patch(
        name="attention_decode",
        target=f"{_TORCH_NATIVE}._run_sdpa_forward_decode",
        diverges="SDPA with one query row takes another kernel path than the full-sequence forward.",
        proof=f"{_PROOF}::test_attention_patch_decode_equals_extend_equals_trainer",
        drop_when="never on CPU; the GPU kernel family of issue 4 replaces it there",
        hook=numerics.attention_decode,
        hook_type="REPLACE",
        expected_params=("self", *_SDPA_COMMON, *_SDPA_FLAGS),
    ),
    Patch(
        name="silu_and_mul",
        target="sglang.srt.layers.activation.SiluAndMul.forward_native",
        diverges=(
            "SiLU's exp takes PyTorch's vectorized or scalar path depending on an element's position "
            "in the tensor; the contract evaluates it position-independently on both sides."
        ),
        proof=f"{_PROOF}::test_silu_and_mul_patch_matches_trainer_mlp",
        drop_when="PyTorch's CPU unary kernels evaluate tails with the vectorized function",
        hook=numerics.silu_and_mul_forward,
        hook_type="REPLACE",
        expected_params=("self", "x"),
    ),
    Patch(
        name="lm_head",
        target="sglang.srt.layers.logits_processor.LogitsProcessor._compute_lm_head",
        diverges="SGLang multiplies by weight.T with torch.matmul; the trainer's nn.Linear calls F.linear.",
        proof=f"{_PROOF}::test_lm_head_patch_matches_hf",
        drop_when="never: one shared call",
        hook=numerics.lm_head_logits,
        hook_type="REPLACE",
        expected_params=("self", "hidden_states", "lm_head", "embedding_bias"),
    ),
    Patch(
        name="sampler_logprobs",
        target="sglang.srt.layers.sampler.Sampler.forward",
        diverges=(
            "SGLang reports log(softmax(logits / T)) after an in-place softmax (or log_softmax of "
            "unscaled logits when greedy); the trainer's logprob is fp32 log_softmax(logits / T)."
        ),
        proof=f"{_PROOF}::test_sampler_patch_reports_the_trainer_formula",
        drop_when="SGLang returns fp32 log_softmax(logits.float() / T) of the full distribution",
        hook=numerics.sampler_forward,
        hook_type="AROUND",
        expected_params=(
            "self", "logits_output", "sampling_info", "return_logprob", "top_logprobs_nums",
            "token_ids_logprobs", "positions",
        ),
    ),
)  # fmt: skip
