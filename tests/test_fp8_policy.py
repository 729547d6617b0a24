"""The FP8 quantization policy (names, shapes, dtypes) and the flat transfer bucket, on the CPU."""

from __future__ import annotations

import pytest
import torch

from parity.tiny_models import build_tiny_model, load_hf_model
from weight_sync.fp8 import (
    DEFAULT_POLICY,
    Fp8BlockPolicy,
    NonFiniteWeightError,
    bucket_view,
    fill_bucket,
    fp8_block_quant_torch,
    plan_bucket,
    sglang_shape_problems,
)

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "llama"])
def tiny_state(request, model_cache):
    model = load_hf_model(build_tiny_model(request.param, cache_dir=model_cache))
    return request.param, {n: p.detach() for n, p in model.named_parameters()}


def test_policy_on_real_tiny_model_names(tiny_state):
    arch, state = tiny_state
    quantized = {n for n, p in state.items() if DEFAULT_POLICY.should_quantize(n, p.shape)}
    want = {
        f"model.layers.{i}.{m}.weight"
        for i in range(2)
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    }
    assert quantized == want, (arch, sorted(quantized ^ want))
    kept = set(state) - quantized
    assert "model.embed_tokens.weight" in kept and "lm_head.weight" in kept and "model.norm.weight" in kept
    assert all(("norm" in n) or n.endswith(".bias") or "embed" in n or "lm_head" in n for n in kept)
    if arch == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in kept
    if arch == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in kept


def test_policy_specs_names_shapes_dtypes(tiny_state):
    _, state = tiny_state
    specs = DEFAULT_POLICY.plan((n, p.shape, p.dtype) for n, p in state.items())
    by_name = {s.name: s for s in specs}
    assert len(by_name) == len(specs)
    q = by_name["model.layers.1.mlp.down_proj.weight"]
    s = by_name["model.layers.1.mlp.down_proj.weight_scale_inv"]
    assert (q.dtype, q.shape, q.role) == (FP8, (128, 256), "fp8_weight")
    assert (s.dtype, s.shape, s.role) == (torch.float32, (1, 2), "fp8_scale")
    k = by_name["model.layers.0.self_attn.k_proj.weight_scale_inv"]
    assert k.shape == (1, 1)  # 64 x 128 weight: one partial block
    emb = by_name["model.embed_tokens.weight"]
    assert (emb.dtype, emb.role) == (torch.bfloat16, "passthrough")
    assert not any(n.endswith("weight_scale_inv") and "norm" in n for n in by_name)
    n_quant = sum(DEFAULT_POLICY.should_quantize(n, p.shape) for n, p in state.items())
    assert len(specs) == len(state) + n_quant


MOE_AND_OTHER_NAMES = {
    # Qwen3-MoE / Qwen2-MoE checkpoint names
    "model.layers.3.mlp.gate.weight": False,  # router
    "model.layers.3.mlp.experts.17.gate_proj.weight": True,
    "model.layers.3.mlp.experts.17.up_proj.weight": True,
    "model.layers.3.mlp.experts.17.down_proj.weight": True,
    "model.layers.3.mlp.shared_expert.gate_proj.weight": True,
    "model.layers.3.mlp.shared_expert_gate.weight": False,
    # Mixtral
    "model.layers.0.block_sparse_moe.gate.weight": False,
    "model.layers.0.block_sparse_moe.experts.5.w1.weight": True,
    "model.layers.0.block_sparse_moe.experts.5.w2.weight": True,
    # DeepSeek-V3
    "model.layers.4.self_attn.kv_a_proj_with_mqa.weight": True,
    "model.layers.4.self_attn.kv_a_layernorm.weight": False,
    "model.layers.4.self_attn.q_b_proj.weight": True,
    "model.layers.4.mlp.gate.e_score_correction_bias": False,
    "model.layers.4.mlp.shared_experts.down_proj.weight": True,
    # embeddings, heads, biases, norms
    "model.embed_tokens.weight": False,
    "lm_head.weight": False,
    "model.layers.2.self_attn.q_proj.bias": False,
    "model.layers.2.pre_feedforward_layernorm.weight": False,
    "model.norm.weight": False,
    "some.unknown.thing.weight": False,
}


@pytest.mark.parametrize("name", list(MOE_AND_OTHER_NAMES))
def test_policy_moe_router_and_other_architectures(name):
    assert DEFAULT_POLICY.should_quantize(name, (256, 256)) is MOE_AND_OTHER_NAMES[name]


def test_policy_refuses_fused_3d_expert_tensors():
    # transformers 5's in-memory fused experts: never silently pushed as bf16 to an FP8 server
    with pytest.raises(ValueError, match="per-expert"):
        DEFAULT_POLICY.should_quantize("model.layers.0.mlp.experts.gate_up_proj", (8, 512, 256))
    with pytest.raises(ValueError, match="per-expert"):
        DEFAULT_POLICY.should_quantize("model.layers.0.mlp.experts.down_proj", (8, 256, 512))
    with pytest.raises(ValueError, match="2-D"):
        DEFAULT_POLICY.should_quantize("model.layers.0.mlp.experts.0.down_proj.weight", (1, 256, 512))


def test_policy_is_configurable_and_reports_ignored_layers():
    pol = Fp8BlockPolicy(extra_keep=(r"layers\.0\.",), passthrough_dtype=torch.bfloat16)
    assert not pol.should_quantize("model.layers.0.mlp.down_proj.weight", (128, 256))
    assert pol.should_quantize("model.layers.1.mlp.down_proj.weight", (128, 256))
    assert pol.specs("model.norm.weight", (8,), torch.float32)[0].dtype == torch.bfloat16
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    cfg = pol.quantization_config(names)
    assert cfg["weight_block_size"] == [128, 128] and cfg["quant_method"] == "fp8"
    assert cfg["activation_scheme"] == "dynamic"
    assert cfg["ignored_layers"] == ["model.layers.0.mlp.down_proj"]
    assert "ignored_layers" not in DEFAULT_POLICY.quantization_config(names)
    only_attn = Fp8BlockPolicy(quantize=(r"self_attn\.[qkvo]_proj\.weight$",))
    assert not only_attn.should_quantize("model.layers.1.mlp.down_proj.weight", (128, 256))
    assert only_attn.should_quantize("model.layers.1.self_attn.o_proj.weight", (128, 256))
    with pytest.raises(ValueError, match="weight"):
        Fp8BlockPolicy.scale_name("model.layers.0.mlp.down_proj.bias")


def test_sglang_shape_problems(tiny_state):
    arch, state = tiny_state
    problems = sglang_shape_problems((n, tuple(p.shape)) for n, p in state.items())
    # the tiny models have 64-row k/v projections: SGLang cannot fuse them into block-FP8 qkv_proj
    assert sorted(p.split(":")[0] for p in problems) == sorted(
        f"model.layers.{i}.self_attn.{x}_proj.weight" for i in range(2) for x in "kv"
    ), arch
    aligned = [
        ("model.layers.0.self_attn.k_proj.weight", (128, 256)),
        ("model.layers.0.mlp.down_proj.weight", (256, 384)),
    ]
    assert sglang_shape_problems(aligned) == []
    assert len(sglang_shape_problems(aligned, tp_size=2)) == 2  # 64 rows / 192 columns per rank
    assert sglang_shape_problems(aligned[:1], tp_size=1) == []


def _params(gen):
    return {
        "model.embed_tokens.weight": torch.randn(300, 130, generator=gen).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(130, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(129, 257, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(129, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(130, 300, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(1, 1, generator=gen).to(torch.bfloat16),
    }


@pytest.mark.parametrize("align", [16, 256])
def test_bucket_plan_layout(align):
    params = _params(torch.Generator().manual_seed(0))
    plan = plan_bucket([(n, t.shape, t.dtype) for n, t in params.items()], align=align, start=32)
    names = [e.name for e in plan.entries]
    assert names == [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.weight_scale_inv",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.down_proj.weight_scale_inv",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.up_proj.weight_scale_inv",
    ]
    prev_end = 32
    for e in plan.entries:
        assert e.start_idx % align == 0 and e.start_idx >= prev_end
        assert e.end_idx - e.start_idx == e.numel == torch.empty(e.shape, dtype=e.dtype).nbytes
        prev_end = e.end_idx
    assert plan.nbytes == prev_end
    scale = plan.entries[3]
    assert (scale.dtype, scale.shape, scale.source) == (
        torch.float32,
        (2, 3),
        "model.layers.0.self_attn.q_proj.weight",
    )


def test_fill_bucket_writes_every_planned_byte_and_nothing_else():
    params = _params(torch.Generator().manual_seed(1))
    plan = plan_bucket([(n, t.shape, t.dtype) for n, t in params.items()], align=256, start=100)
    bucket = torch.full((plan.nbytes + 77,), 0x7F, dtype=torch.uint8)
    fill_bucket(bucket, plan, params)
    touched = torch.zeros(bucket.numel(), dtype=torch.bool)
    for e in plan.entries:
        got = bucket_view(bucket, e)
        src = params[e.source]
        if e.role == "fp8_weight":
            want = fp8_block_quant_torch(src)[0]
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), e.name
        elif e.role == "fp8_scale":
            assert torch.equal(got, fp8_block_quant_torch(src)[1]), e.name
        else:
            assert torch.equal(got, src), e.name
        assert got.data_ptr() == bucket.data_ptr() + e.start_idx  # a view, not a copy
        touched[e.start_idx : e.end_idx] = True
    assert bool((bucket[~touched] == 0x7F).all())  # gaps and tail untouched


def test_fill_bucket_names_the_nonfinite_weight():
    params = _params(torch.Generator().manual_seed(2))
    params["model.layers.0.mlp.down_proj.weight"][129, 299] = float("inf")  # block (1, 2)
    plan = plan_bucket([(n, t.shape, t.dtype) for n, t in params.items()])
    with pytest.raises(NonFiniteWeightError) as info:
        fill_bucket(plan.allocate("cpu"), plan, params)
    assert (info.value.name, info.value.block_row, info.value.block_col) == (
        "model.layers.0.mlp.down_proj.weight",
        1,
        2,
    )


def test_fill_bucket_checks_shapes_and_size():
    params = _params(torch.Generator().manual_seed(3))
    plan = plan_bucket([(n, t.shape, t.dtype) for n, t in params.items()])
    with pytest.raises(ValueError, match="bytes"):
        fill_bucket(torch.empty(plan.nbytes - 1, dtype=torch.uint8), plan, params)
    params["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(128, 257, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="shape"):
        fill_bucket(plan.allocate("cpu"), plan, params)
