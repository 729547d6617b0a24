"""The Triton kernel itself on the CPU, through Triton's interpreter (``TRITON_INTERPRET=1``).

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when ``weight_sync.fp8`` is first
imported, so the checks run in a child process started with the variable set (this file, run as a
script). Under the interpreter the kernel takes its integer round-to-nearest-even path for the e4m3
cast (the interpreter's own fp8 conversion does not round to nearest even); the GPU tests check
that this path and the hardware conversion give the same bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import interpreter_results


def _launch_variants() -> dict[str, dict]:
    """Every launch configuration the benchmark sweeps (CANDIDATE_CONFIGS), one per behaviour the
    interpreter can see (which program handles which block, when it loads it, masks), plus code paths
    no candidate takes (persistent groups of 3 in order 0, prefetching persistent groups).
    The interpreter ignores num_warps, num_stages, maxnreg and the cache hints, which only the compiler
    sees (the GPU tests run every candidate); persistent grids get 2 "SMs" here, so programs loop."""
    from weight_sync.fp8.block_quant import CANDIDATE_CONFIGS

    out: dict[str, dict] = {}
    seen = set()
    for c in CANDIDATE_CONFIGS:
        key = (
            c.group_k,
            c.prefetch and (c.group_k > 1 or c.persistent > 0),
            c.order,
            c.persistent,
            c.unmasked,
        )
        if key not in seen:
            seen.add(key)
            out[f"candidate-{c.name}"] = {"config": c}
    out["persistent-group3"] = {"persistent": 1, "group_k": 3, "num_stages": 3, "prefetch": False}
    out["persistent-prefetch-group2-order1"] = {"persistent": 1, "prefetch": True, "group_k": 2, "order": 1}
    return out


LAUNCH_VARIANTS = _launch_variants()
VARIANTS = {"default": {}, "reciprocal-variant": {"div_mode": 2}, **LAUNCH_VARIANTS}
# Launch options move blocks between programs, not values: their variants run the cases with edge
# blocks on both axes (2x3 and 3x3 blocks) and with whole blocks only (the unmasked path).
LAUNCH_CASES = {"randn(129, 257)x0.02", "zero-blocks", "huge-per-block"}


def _child() -> dict:
    """Runs under TRITON_INTERPRET=1: every adversarial case through the interpreted kernel."""
    import torch

    from tests.test_fp8_block_quant import POISON_Q, _kernel_vs_reference, adversarial_cases
    from weight_sync.fp8 import (
        DEFAULT_POLICY,
        NonFiniteWeightError,
        bucket_view,
        fill_bucket,
        fp8_block_quant_torch,
        fp8_block_quant_triton,
        plan_bucket,
    )
    from weight_sync.fp8.block_quant import _interpreting

    results: dict = {"interpreting": _interpreting(), "cases": {}}
    for variant, kw in VARIANTS.items():
        gen = torch.Generator().manual_seed(20)
        for label, w in adversarial_cases(gen):
            if variant in LAUNCH_VARIANTS:
                if label not in LAUNCH_CASES:
                    continue
            elif variant != "default" and w.numel() > 70000:
                continue  # keep the run short: the exhaustive cases once
            results["cases"][f"{variant}/{label}"] = _kernel_vs_reference(w, label, **kw)

    # The first non-finite block named: NaN and Inf; then NaN alone (no Inf in the weight: the
    # interpreter's tl.max skips NaN, so the kernel counts them).
    for key, layer, bad in (
        ("nonfinite", 1, {(260, 5): "nan", (130, 390): "inf"}),
        ("nonfinite_nan_only", 2, {(260, 5): "nan"}),
    ):
        w = torch.randn(300, 400).to(torch.bfloat16)
        for at, value in bad.items():
            w[at] = float(value)
        try:
            fp8_block_quant_triton(w, name=f"model.layers.{layer}.mlp.up_proj.weight")
            results[key] = "no error"
        except NonFiniteWeightError as e:
            results[key] = [e.name, e.block_row, e.block_col]

    # A bucket filled through the interpreted kernel, at unaligned-to-128 offsets after a bf16 norm.
    gen = torch.Generator().manual_seed(21)
    params = {
        "model.layers.0.input_layernorm.weight": torch.randn(130, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(129, 257, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(130, 300, generator=gen).to(torch.bfloat16),
    }
    plan = plan_bucket([(n, t.shape, t.dtype) for n, t in params.items()], DEFAULT_POLICY, align=16, start=48)
    bucket = torch.full((plan.nbytes + 64,), POISON_Q, dtype=torch.uint8)
    fill_bucket(bucket, plan, params)
    ok = True
    for name, t in params.items():
        entries = {e.role: e for e in plan.entries if e.source == name}
        if "fp8_weight" in entries:
            q, s = fp8_block_quant_torch(t)
            ok &= torch.equal(
                bucket_view(bucket, entries["fp8_weight"]).view(torch.uint8), q.view(torch.uint8)
            )
            ok &= torch.equal(bucket_view(bucket, entries["fp8_scale"]), s)
        else:
            ok &= torch.equal(bucket_view(bucket, entries["passthrough"]), t)
    results["bucket"] = bool(ok)
    return results


@pytest.fixture(scope="module")
def interpreted():
    return interpreter_results(Path(__file__).resolve())


def test_child_ran_under_the_interpreter(interpreted):
    assert interpreted["interpreting"] is True
    assert len(interpreted["cases"]) > 40
    for variant in LAUNCH_VARIANTS:  # each launch variant ran every launch case
        assert sum(k.startswith(variant + "/") for k in interpreted["cases"]) == len(LAUNCH_CASES), variant


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_interpreted_kernel_bitwise_equals_reference(interpreted, variant):
    bad = [m for k, m in interpreted["cases"].items() if k.startswith(variant + "/") and m]
    assert not bad, "\n".join(bad)


def test_interpreted_kernel_names_first_nonfinite_block(interpreted):
    assert interpreted["nonfinite"] == ["model.layers.1.mlp.up_proj.weight", 1, 3]


def test_interpreted_kernel_flags_a_nan_only_block(interpreted):
    assert interpreted["nonfinite_nan_only"] == ["model.layers.2.mlp.up_proj.weight", 2, 0]


def test_interpreted_kernel_fills_bucket_at_offsets(interpreted):
    assert interpreted["bucket"] is True


if __name__ == "__main__":
    print(json.dumps(_child()))
