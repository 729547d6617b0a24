"""Our FP8 tensors against SGLang's own block-FP8 parameters, on the CPU (real sglang 0.5.15 code).

In a child process with SGLang's CPU runtime (``SGLANG_USE_CPU_ENGINE=1``, the ``sgl_kernel``
stand-in on its PYTHONPATH, as ``truepolicy server`` sets them up):

1. for every parameter of the tiny Qwen3 that the policy quantizes, ``Fp8LinearMethod.create_weights``
   with a block ``Fp8Config`` registers ``weight`` / ``weight_scale_inv`` with our shapes and dtypes;
2. SGLang refuses to fuse the tiny Qwen3's 64-row k/v projections into a block-FP8 ``qkv_proj``, and
   :func:`sglang_shape_problems` flags exactly those;
3. SGLang's Qwen3 and Llama models, built with the ``quantization_config`` our policy writes (dims
   multiples of 128), load a bucket we filled, through SGLang's ``FlattenedTensorBucket`` and
   ``load_weights``: every parameter is written (all were poisoned first) and holds our bits.

SGLang's CPU block-FP8 *forward* needs AMX (not on these machines); serving is checked on the GPU
(``scripts/gpu_fp8_sglang_check.py``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUSED = {  # SGLang's stacked_params_mapping for Qwen3 / Llama: (fused name, shard order)
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def _aligned_config(arch: str):
    from parity.tiny_models import tiny_config

    cfg = tiny_config(arch)
    cfg.hidden_size, cfg.head_dim, cfg.intermediate_size = 256, 64, 384  # k/v: 2 heads x 64 = 128 rows
    cfg.architectures = [{"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]]
    return cfg


def _child() -> dict:
    import tempfile

    import torch
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.layers.linear import QKVParallelLinear
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    from transformers import AutoModelForCausalLM

    from parity.tiny_models import build_tiny_model, load_hf_model
    from weight_sync.fp8 import DEFAULT_POLICY, fill_bucket, plan_bucket, sglang_shape_problems
    from weight_sync.fp8.bucket import sglang_metadata

    out: dict = {}
    single = dict(tp_size=1, tp_rank=0, attn_tp_size=1, attn_tp_rank=0, attn_dp_size=1, attn_dp_rank=0)
    single.update(attn_cp_size=1, attn_cp_rank=0, moe_ep_size=1, moe_ep_rank=0, moe_dp_size=1)
    single.update(moe_dp_rank=0, moe_tp_size=1, moe_tp_rank=0)

    # 1. Fp8LinearMethod.create_weights, parameter by parameter, for the tiny Qwen3's names.
    cfg = Fp8Config.from_config(DEFAULT_POLICY.quantization_config())
    out["block_size"] = cfg.weight_block_size
    state = {n: p.detach() for n, p in load_hf_model(build_tiny_model("qwen3")).named_parameters()}
    specs = {s.name: s for s in DEFAULT_POLICY.plan((n, p.shape, p.dtype) for n, p in state.items())}
    per_param = {}
    with get_parallel().override(**single):
        for name, p in state.items():
            if not DEFAULT_POLICY.should_quantize(name, p.shape):
                continue
            layer = torch.nn.Module()
            n, k = p.shape
            Fp8LinearMethod(cfg).create_weights(layer, k, [n], k, n, torch.bfloat16, weight_loader=None)
            theirs = {m: (list(t.shape), str(t.dtype)) for m, t in layer.named_parameters()}
            ours = {
                "weight": (list(specs[name].shape), str(specs[name].dtype)),
                "weight_scale_inv": (
                    list(specs[DEFAULT_POLICY.scale_name(name)].shape),
                    str(specs[DEFAULT_POLICY.scale_name(name)].dtype),
                ),
            }
            per_param[name] = [theirs, ours]
    out["create_weights"] = per_param

    # 2. SGLang's refusal of 64-row shards vs our shape check.
    with get_parallel().override(**single):
        try:
            QKVParallelLinear(128, 32, 4, 2, bias=False, quant_config=cfg, prefix="model.layers.0.qkv_proj")
            out["sglang_refuses_64_row_shards"] = None
        except ValueError as e:
            out["sglang_refuses_64_row_shards"] = str(e)
    out["our_shape_problems"] = [
        p.split(":")[0] for p in sglang_shape_problems((n, tuple(t.shape)) for n, t in state.items())
    ]

    # 3. Whole SGLang models (128-aligned tiny Qwen3 and Llama) loading our bucket.
    port = int(os.environ["FP8_TEST_PORT"])
    init_distributed_environment(
        backend="gloo", world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", local_rank=0
    )
    initialize_model_parallel(1, 1)
    torch.set_default_dtype(torch.bfloat16)
    out["models"] = {}
    for arch in ("qwen3", "llama"):
        hf_cfg = _aligned_config(arch)
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
        sd = {n: p.detach() for n, p in hf.named_parameters()}
        hf_cfg.quantization_config = DEFAULT_POLICY.quantization_config(sd)
        with tempfile.TemporaryDirectory() as d:
            hf_cfg.save_pretrained(d)
            set_global_server_args_for_scheduler(
                ServerArgs(model_path=d, device="cpu", skip_tokenizer_init=True)
            )
            qcfg = Fp8Config.from_config(hf_cfg.quantization_config)
            if arch == "qwen3":
                from sglang.srt.models.qwen3 import Qwen3ForCausalLM as Model
            else:
                from sglang.srt.models.llama import LlamaForCausalLM as Model
            with get_parallel().override(**single):
                model = Model(hf_cfg, quant_config=qcfg)
        params = dict(model.named_parameters())
        with torch.no_grad():  # poison: fp8 NaN bytes, NaN floats
            for p in params.values():
                if p.dtype == torch.float8_e4m3fn:
                    p.data.view(torch.uint8).fill_(0x7F)
                else:
                    p.data.fill_(float("nan"))
        plan = plan_bucket([(n, t.shape, t.dtype) for n, t in sd.items()])
        bucket = plan.allocate("cpu")
        fill_bucket(bucket, plan, sd)
        sg_bucket = FlattenedTensorBucket(flattened_tensor=bucket, metadata=sglang_metadata(plan))
        model.load_weights(sg_bucket.reconstruct_tensors())

        ours = {e.name: t for e, (_, t) in zip(plan.entries, sg_bucket.reconstruct_tensors(), strict=True)}
        expected: dict[str, list] = {}
        for name, t in ours.items():
            target, shard = name, 0
            for frag, (fused, idx) in FUSED.items():
                if frag in name:
                    target, shard = name.replace(frag, fused), idx
            expected.setdefault(target, []).append((shard, t))
        report = {"params": sorted(params), "unwritten": [], "mismatch": [], "missing": [], "dtypes": {}}
        for target, shards in expected.items():
            if target not in params:
                report["missing"].append(target)
                continue
            want = torch.cat([t for _, t in sorted(shards, key=lambda x: x[0])], dim=0)
            got = params[target].data
            report["dtypes"][target] = [str(got.dtype), str(want.dtype), list(got.shape), list(want.shape)]
            if got.dtype == torch.float8_e4m3fn:
                same = torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            else:
                same = torch.equal(got, want.to(got.dtype))
            if not same:
                report["mismatch"].append(target)
        for name, p in params.items():
            if name.endswith((".k_scale", ".v_scale")):
                continue  # FP8 KV-cache scales of the attention layer: not weights, never pushed
            bad = (
                (p.data.view(torch.uint8) == 0x7F).all()
                if p.dtype == torch.float8_e4m3fn
                else p.isnan().any()
            )
            if bool(bad):
                report["unwritten"].append(name)
        out["models"][arch] = report
    return out


@pytest.fixture(scope="module")
def sglang_report(tmp_path_factory):
    from server_patches.launcher import runtime_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = runtime_env("cpu", on_policy=False, base_env=dict(os.environ))
    env.update(
        FP8_TEST_PORT=str(port),
        HF_HUB_OFFLINE="1",
        TRUEPOLICY_MODEL_CACHE=str(tmp_path_factory.mktemp("fp8-models")),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_create_weights_matches_our_names_shapes_dtypes(sglang_report):
    assert sglang_report["block_size"] == [128, 128]
    per_param = sglang_report["create_weights"]
    assert len(per_param) == 14  # 7 projections x 2 layers
    for name, (theirs, ours) in per_param.items():
        assert set(theirs) == {"weight", "weight_scale_inv"}, name
        assert theirs == {k: [list(v[0]), v[1]] for k, v in ours.items()}, name
        assert (
            theirs["weight"][1] == "torch.float8_e4m3fn" and theirs["weight_scale_inv"][1] == "torch.float32"
        )


def test_sglang_and_our_shape_check_agree(sglang_report):
    assert (
        "not divisible by weight quantization block_n = 128" in sglang_report["sglang_refuses_64_row_shards"]
    )
    assert sorted(sglang_report["our_shape_problems"]) == sorted(
        f"model.layers.{i}.self_attn.{x}_proj.weight" for i in range(2) for x in "kv"
    )


def _scale_names(rep):
    return sorted(n for n in rep["params"] if n.endswith(".weight_scale_inv"))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_sglang_model_loads_our_bucket_bit_for_bit(sglang_report, arch):
    rep = sglang_report["models"][arch]
    if arch == "llama":
        # sglang 0.5.15's LlamaForCausalLM.load_weights renames "*.weight_scale_inv" to
        # "*.weight_scale" (for other FP8 formats), a parameter block FP8 does not have: it logs
        # "not found" and drops every block scale. Everything else lands. Until SGLang fixes it,
        # block-FP8 Llama needs another path (e.g. load_format="direct" with fused names).
        assert rep["missing"] == [] and sorted(rep["mismatch"]) == _scale_names(rep), rep
        assert sorted(rep["unwritten"]) == _scale_names(rep), rep
        return
    assert rep["missing"] == [] and rep["mismatch"] == [] and rep["unwritten"] == [], rep
    assert "model.layers.1.self_attn.qkv_proj.weight_scale_inv" in rep["params"]
    d = rep["dtypes"]
    assert d["model.layers.1.self_attn.qkv_proj.weight"][:1] == ["torch.float8_e4m3fn"]
    assert d["model.layers.1.self_attn.qkv_proj.weight_scale_inv"][2] == [4, 2]  # (256+128+128)/128
    assert d["model.layers.0.mlp.gate_up_proj.weight_scale_inv"][2] == [6, 2]
    assert d["model.layers.0.mlp.down_proj.weight_scale_inv"][2] == [2, 3]
    assert d["model.embed_tokens.weight"][0] == "torch.bfloat16"
    # everything SGLang has (but KV-cache scales) was written by us
    assert {n for n in rep["params"] if not n.endswith((".k_scale", ".v_scale"))} == set(d)


if __name__ == "__main__":
    print(json.dumps(_child()))
