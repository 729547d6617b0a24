"""The patch table: every numerics patch the plugin applies in on-policy mode.

Each row says what it targets, why SGLang's numbers differ from the trainer's without it, which test
proves it and when it can be dropped; docs/parity.md is the same ledger for readers, including the
ops that need no patch. Every patch is checked against the installed SGLang (target exists,
signature unchanged) before any is registered.
"""

from __future__ import annotations

from server_patches import numerics, serving
from server_patches.moe_patches import MOE_PATCHES
from server_patches.patch import Patch
from server_patches.tp_patches import TP_PATCHES

_TORCH_NATIVE = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
_SDPA_COMMON = ("query", "output", "k_cache", "v_cache", "req_to_token", "req_pool_indices", "seq_lens")
_SDPA_FLAGS = ("encoder_lens", "scaling", "enable_gqa", "causal", "is_cross_attn", "sliding_window_size")
_OPS = "tests/test_contract_ops.py"
_WEIGHT_UPDATER = "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager"
_STREAMS_PROOF = (
    "tests/test_sidecar_server.py::test_pushes_under_32_concurrent_streams_lose_nothing_and_stay_on_policy"
)

PATCHES: tuple[Patch, ...] = (
    Patch(
        name="rmsnorm",
        target="sglang.srt.layers.layernorm.RMSNorm.forward_native",
        diverges=(
            "SGLang multiplies the fp32-normalised x by the weight before the bf16 cast (HF casts "
            "first), and normalises the fp32 sum of x + residual where HF normalises the bf16 sum."
        ),
        proof=f"{_OPS}::test_rmsnorm_patch_matches_hf",
        drop_when="SGLang's native RMSNorm casts before the weight multiply and rounds the residual first",
        hook=numerics.rms_norm_forward,
        hook_type="REPLACE",
        expected_params=("self", "x", "residual", "post_residual_addition"),
    ),
    Patch(
        name="attention_extend",
        target=f"{_TORCH_NATIVE}._run_sdpa_forward_extend",
        diverges=(
            "SDPA over [prefix + new rows] per request reduces in an order that depends on the number "
            "of query rows; the trainer attends over the whole sequence at once."
        ),
        proof=f"{_OPS}::test_attention_patches_decode_equals_extend_equals_trainer",
        drop_when="never on CPU; the GPU kernel family (issue 4) takes this role on the triton backend",
        hook=numerics.attention_extend,
        hook_type="REPLACE",
        expected_params=("self", *_SDPA_COMMON, "extend_prefix_lens", "extend_seq_lens", *_SDPA_FLAGS),
    ),
    Patch(
        name="attention_decode",
        target=f"{_TORCH_NATIVE}._run_sdpa_forward_decode",
        diverges="SDPA with one query row takes another path than the trainer's full-sequence attention.",
        proof=f"{_OPS}::test_attention_patches_decode_equals_extend_equals_trainer",
        drop_when="never on CPU; the GPU kernel family (issue 4) takes this role on the triton backend",
        hook=numerics.attention_decode,
        hook_type="REPLACE",
        expected_params=("self", *_SDPA_COMMON, *_SDPA_FLAGS),
    ),
    Patch(
        name="sampler_logprobs",
        target="sglang.srt.layers.sampler.Sampler.forward",
        diverges=(
            "SGLang reports log(softmax(logits / T)) after an in-place softmax when sampling; the "
            "trainer's logprob is the contract's fp32 logprob (parity.logprobs) of the full "
            "temperature-scaled distribution."
        ),
        proof=f"{_OPS}::test_sampler_patch_reports_the_trainer_formula",
        drop_when="never (SGLang does not compute the contract's logprob)",
        hook=numerics.sampler_forward,
        hook_type="AROUND",
        expected_params=(
            "self", "logits_output", "sampling_info", "return_logprob", "top_logprobs_nums",
            "token_ids_logprobs", "positions",
        ),
    ),
    Patch(
        name="seed_parallel_samples",
        target="sglang.srt.managers.tokenizer_manager.TokenizerManager._send_one_request",
        diverges=(
            "sampling, not numerics: the n copies of a request share its sampling_seed, so seeded "
            "parallel samples would all be identical; sample k gets seed S + k * golden (mod 2**63)."
        ),
        proof="tests/test_parity_server.py::test_seeded_samples_are_reproducible_and_distinct",
        drop_when="SGLang derives distinct per-sample seeds for n > 1",
        hook=numerics.seed_parallel_samples,
        hook_type="BEFORE",
        expected_params=("self", "tokenized_obj"),
    ),
    Patch(
        name="per_request_seeds",
        target="sglang.srt.sampling.sampling_batch_info.SamplingBatchInfo.from_schedule_batch",
        diverges=(
            "sampling, not numerics: outside its deterministic mode SGLang samples with "
            "torch.multinomial, which no per-request seed can reproduce; every request now samples "
            "with SGLang's seeded Gumbel path (a random seed when the request gives none)."
        ),
        proof="tests/test_parity_server.py::test_seeded_samples_are_reproducible_and_distinct",
        drop_when="SGLang honours sampling_seed outside deterministic mode",
        hook=numerics.per_request_seeds,
        hook_type="AFTER",
        expected_params=("cls", "batch", "vocab_size"),
    ),
    Patch(
        name="murmur_hash32_cpu",
        target="sglang.srt.layers.utils.hash.murmur_hash32",
        diverges=(
            "runtime, not numerics: SGLang's seeded-sampling hash is a Triton kernel with no CPU driver; "
            "on CPU tensors the same hash runs in plain PyTorch (GPU tensors keep the kernel)."
        ),
        proof="tests/test_murmur.py",
        drop_when="SGLang's hash runs on CPU tensors",
        hook=numerics.murmur_hash32_on_cpu,
        hook_type="AROUND",
        expected_params=("seed", "positions", "col_indices"),
    ),
    Patch(
        name="input_logprobs",
        target="sglang.srt.layers.logits_processor.LogitsProcessor.process_input_logprobs",
        diverges=(
            "SGLang computes prompt logprobs as log_softmax of the bf16 logits in bf16; the trainer "
            "computes the contract's fp32 logprob (parity.logprobs, temperature 1 for prompts)."
        ),
        proof="tests/test_parity_server.py::test_prompt_logprobs_are_bitwise_on_policy",
        drop_when="never (SGLang does not compute the contract's logprob)",
        hook=numerics.input_logprobs_contract,
        hook_type="AROUND",
        expected_params=("self", "input_logits", "logits_metadata"),
    ),
    Patch(
        name="input_logprobs_chunked",
        target="sglang.srt.layers.logits_processor.LogitsProcessor.process_input_logprobs_by_chunk",
        diverges="the chunked prompt-logprob path (opt-in by env) would bypass input_logprobs: refused.",
        proof="tests/test_contract_ops.py::test_chunked_prompt_logprobs_are_refused",
        drop_when="the input_logprobs patch covers the chunked path",
        hook=numerics.refuse_chunked_input_logprobs,
        hook_type="AROUND",
        expected_params=(
            "self", "pruned_states", "sample_indices", "input_logprob_indices", "token_to_seq_idx", "lm_head",
            "logits_metadata",
        ),
    ),
    Patch(
        name="flush_cache_while_paused",
        target="sglang.srt.managers.scheduler.Scheduler.flush_cache",
        diverges=(
            "serving, not numerics: a weight update pauses generation in retract mode; SGLang then "
            "refuses to flush the prefix cache (retracted requests wait), so later requests reuse KV "
            "computed with the old weights. The flush now runs with the (KV-free) waiting queue set aside."
        ),
        proof=_STREAMS_PROOF,
        drop_when="SGLang flushes the prefix cache while paused with only waiting requests",
        hook=serving.flush_cache_while_paused,
        hook_type="AROUND",
        expected_params=("self", "empty_cache"),
    ),
    Patch(
        name="weight_version_per_token",
        target="sglang.srt.managers.scheduler.Scheduler.run_batch",
        diverges=(
            "serving, not numerics: SGLang tags a streamed chunk with the version current when the "
            "tokenizer manager processes it, so a token computed just before an update can carry the "
            "new version's tag. The scheduler now tags each output token with the version of the "
            "weights that computed it (meta_info['output_weight_versions'])."
        ),
        proof=_STREAMS_PROOF,
        drop_when="SGLang reports the computing weight version per output token",
        hook=serving.stamp_weight_version,
        hook_type="AFTER",
        expected_params=("self", "batch", "pp_proxy_tensors"),
    ),
    *(
        Patch(
            name=f"served_weight_version_{source}",
            target=f"{_WEIGHT_UPDATER}.update_weights_from_{source}",
            diverges=(
                "serving, not numerics: the scheduler learns the version of the weights it serves from "
                f"a successful update_weights_from_{source} that names one (see weight_version_per_token)."
            ),
            proof=_STREAMS_PROOF,
            drop_when="SGLang reports the computing weight version per output token",
            hook=serving.record_weight_version,
            hook_type="AFTER",
            expected_params=("self", "recv_req"),
        )
        for source in ("tensor", "disk", "distributed", "ipc")
    ),
    *TP_PATCHES,
    *MOE_PATCHES,
)  # fmt: skip
