"""Device check: real SGLang 0.5.15 on a GPU serves our block-FP8 weights (issue 5).

Run on the lent GPU after ``source .gpusgl/install.sh`` (see ``scripts/gpu_fp8_device_run.sh``):

1. builds two random tiny Qwen3 models A and B on the GPU (``parity.tiny_models`` config with
   128-aligned widths: SGLang's block-FP8 loader refuses the default tiny model's 64-row k/v
   projections, which it fuses into ``qkv_proj``);
2. writes A as a block-FP8 checkpoint, quantized by our kernel into a transfer bucket, with the
   ``quantization_config`` our policy writes, and starts ``sglang.Engine`` on it (triton attention,
   pytorch sampling, triton FP8 GEMM);
3. pushes B through ``update_weights_from_tensor`` (named tensors = views of our bucket), generates,
   and compares the logprobs with HF bf16 B (teacher forcing on the same tokens), next to the error
   of weight-only FP8 (HF with dequantized weights) and the distance to A;
4. pushes A back as one flattened bucket (``load_format="flattened_bucket"``) and checks that the
   outputs are bit-identical to those served from A's checkpoint loaded from disk.

Prints a summary and ``FP8 SGLANG CHECK: PASS`` / ``FAIL``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weight_sync.fp8 import (  # noqa: E402
    DEFAULT_POLICY,
    bucket_view,
    fill_bucket,
    fp8_block_dequant,
    plan_bucket,
    sglang_shape_problems,
)
from weight_sync.fp8.bucket import sglang_metadata  # noqa: E402

PROMPTS = [[5, 17, 301, 42, 900, 3], [1, 2, 3, 4], [700, 11, 256, 999, 12, 13, 14, 15, 16], [42]]
NEW_TOKENS = 16


def aligned_config():
    from parity.tiny_models import tiny_config

    cfg = tiny_config("qwen3")
    cfg.hidden_size, cfg.head_dim, cfg.intermediate_size = 256, 64, 512  # q 256 rows, k/v 128 rows
    cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


def build(cfg, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()


def state_of(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def quantize_to_bucket(state):
    plan = plan_bucket([(n, t.shape, t.dtype) for n, t in state.items()], DEFAULT_POLICY)
    bucket = plan.allocate("cuda")
    fill_bucket(bucket, plan, state)  # the Triton kernel, writing at the bucket's offsets
    torch.cuda.synchronize()
    return plan, bucket


def write_checkpoint(cfg, state, path: Path):
    from safetensors.torch import save_file

    plan, bucket = quantize_to_bucket(state)
    tensors = {e.name: bucket_view(bucket, e).clone().cpu() for e in plan.entries}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = type(cfg).from_dict(cfg.to_dict())
    cfg.quantization_config = DEFAULT_POLICY.quantization_config(state)
    cfg.save_pretrained(path)
    return tensors


def hf_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return lp.gather(-1, ids[0, len(prompt) :, None])[:, 0].cpu()


def hf_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids], device="cuda")).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def generate(engine):
    sp = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    outs = engine.generate(input_ids=PROMPTS, sampling_params=[sp] * len(PROMPTS), return_logprob=True)
    res = []
    for o in outs:
        entries = o["meta_info"]["output_token_logprobs"]
        res.append(([int(t) for _, t, _ in entries], torch.tensor([lp for lp, _, _ in entries])))
    return res


def gap(served, model):
    d = torch.cat(
        [(lp - hf_logprobs(model, p, toks)).abs() for p, (toks, lp) in zip(PROMPTS, served, strict=True)]
    )
    return float(d.max()), float(d.mean())


def main() -> int:
    import sglang
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.utils import MultiprocessingSerializer

    t0 = time.monotonic()
    cfg = aligned_config()
    model_a, model_b = build(cfg, 0), build(cfg, 1)
    state_a, state_b = state_of(model_a), state_of(model_b)
    problems = sglang_shape_problems((n, tuple(t.shape)) for n, t in state_a.items())
    assert not problems, problems

    # Weight-only FP8 reference: HF B with every quantized weight replaced by q * scale.
    plan_b, bucket_b = quantize_to_bucket(state_b)
    model_bq = build(cfg, 1)
    with torch.no_grad():
        params = dict(model_bq.named_parameters())
        for e in plan_b.entries:
            if e.role == "fp8_weight":
                s = next(x for x in plan_b.entries if x.role == "fp8_scale" and x.source == e.source)
                w = fp8_block_dequant(bucket_view(bucket_b, e), bucket_view(bucket_b, s))
                params[e.name].copy_(w.to(torch.bfloat16))

    fields = {f.name for f in dataclasses.fields(ServerArgs)}
    kwargs = dict(
        dtype="bfloat16",
        quantization="fp8",
        attention_backend="triton",
        sampling_backend="pytorch",
        fp8_gemm_runner_backend="triton",
        skip_tokenizer_init=True,
        disable_cuda_graph=True,
        disable_piecewise_cuda_graph=True,
        mem_fraction_static=0.3,
        max_total_tokens=4096,
        log_level="error",
        random_seed=0,
    )
    kwargs = {k: v for k, v in kwargs.items() if k in fields}
    result = {}
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(cfg, state_a, Path(d))
        engine = sglang.Engine(model_path=d, **kwargs)
        print(f"engine up in {time.monotonic() - t0:.0f} s (kwargs {kwargs})", flush=True)
        try:
            served_a_disk = generate(engine)

            # B through update_weights_from_tensor: named tensors that are views of our bucket.
            named = [(e.name, bucket_view(bucket_b, e)) for e in plan_b.entries]
            ok, msg = engine.update_weights_from_tensor(named_tensors=named)
            print(f"update_weights_from_tensor(B): {ok} {msg}", flush=True)
            served_b = generate(engine)

            # A back as one flattened bucket (SGLang's own bucket format, our layout).
            plan_a, bucket_a = quantize_to_bucket(state_a)
            payload = MultiprocessingSerializer.serialize(
                {"flattened_tensor": bucket_a, "metadata": sglang_metadata(plan_a)}
            )
            ok2, msg2 = engine.update_weights_from_tensor(
                named_tensors=[payload], load_format="flattened_bucket"
            )
            print(f"update_weights_from_tensor(A, flattened_bucket): {ok2} {msg2}", flush=True)
            served_a_bucket = generate(engine)
        finally:
            engine.shutdown()

    hf_b_greedy = [hf_greedy(model_b, p, NEW_TOKENS) for p in PROMPTS]
    result["greedy_equal_hf_bf16_B"] = sum(t == h for (t, _), h in zip(served_b, hf_b_greedy, strict=True))
    result["sglang_fp8_vs_hf_bf16_B"] = gap(served_b, model_b)
    result["hf_fp8_weights_vs_hf_bf16_B"] = gap(
        [(t, hf_logprobs(model_bq, p, t)) for p, (t, _) in zip(PROMPTS, served_b, strict=True)], model_b
    )
    result["sglang_fp8_vs_hf_bf16_A(wrong weights)"] = gap(served_b, model_a)
    result["sglang_fp8_A_disk_vs_hf_bf16_A"] = gap(served_a_disk, model_a)
    same = all(
        ta == tb and torch.equal(la, lb)
        for (ta, la), (tb, lb) in zip(served_a_disk, served_a_bucket, strict=True)
    )
    result["A_bucket_update_bitwise_equal_A_disk"] = same
    print(json.dumps(result, indent=1))

    (mx, mean), (mx_w, mean_w), (_, mean_a) = (
        result["sglang_fp8_vs_hf_bf16_B"],
        result["hf_fp8_weights_vs_hf_bf16_B"],
        result["sglang_fp8_vs_hf_bf16_A(wrong weights)"],
    )
    # Expected FP8 error: weights (measured above) plus SGLang's per-token-group FP8 activations:
    # allow 4x the weight-only gap (+0.02 bf16 noise); the wrong model must be far worse.
    passed = bool(ok) and bool(ok2) and same and mx <= 4 * mx_w + 0.02 and mean <= 4 * mean_w + 0.005
    passed = passed and mean_a > 10 * mean
    print(
        f"FP8 SGLANG CHECK: {'PASS' if passed else 'FAIL'}  (max|Δlogp| {mx:.4f} / weight-only {mx_w:.4f}; "
        f"mean {mean:.5f} / {mean_w:.5f}; wrong-model mean {mean_a:.3f})"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
