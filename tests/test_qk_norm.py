"""Qwen3's per-head q/k norms as one kernel (``parity.ops.qk_norm``): the Triton kernel under the
Triton interpreter (a child Python, this file's ``__main__``) and on CUDA (GPU-marked) against the
plain-PyTorch reference bit for bit, on q/k as SGLang hands them over (column slices of one qkv row),
odd head counts, head dims 64 / 128 / 96 (not a power of two), wide-exponent rows, poisoned outputs.
On CUDA also against ``rms_norm_pairwise_kernel`` on contiguous copies: the unfused path (the
``rmsnorm_cuda`` patch) that the one kernel replaces.

Negative control: SGLang's fused q/k norm formula (the weight multiplied in fp32 before the one
rounding) gives other bits on the same inputs, so the checks cannot pass with any norm of the right
values.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from parity.ops.qk_norm import qk_rms_norm, qk_rms_norm_reference
from parity.ops.rms_norm_pairwise import pairwise_sum_of_squares
from tests.helpers import assert_same_bits, count_differing, run_under_triton_interpreter

BF16 = torch.bfloat16
# (tokens, q heads, k heads, head dim, eps)
CASES = (
    (1, 16, 8, 128, 1e-6),
    (37, 5, 1, 64, 1e-6),
    (3, 3, 2, 96, 1e-5),
    (0, 4, 2, 64, 1e-6),
)


def inputs(tokens, hq, hk, head_dim, device="cpu", seed=0):
    """q / k as SGLang's qkv split hands them over, rows of mixed scale, and weights near 1."""
    g = torch.Generator().manual_seed(seed * 7919 + tokens * 31 + head_dim)
    scale = torch.exp2(torch.randint(-6, 7, (tokens, 1), generator=g).float())
    qkv = (scale * torch.randn(tokens, (hq + 2 * hk) * head_dim, generator=g)).to(BF16).to(device)
    q, k, _ = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    qw = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(BF16).to(device)
    kw = (1 + 0.3 * torch.randn(head_dim, generator=g)).to(BF16).to(device)
    return q, k, qw, kw


def fused_fp32_weight(x: torch.Tensor, weight: torch.Tensor, eps: float, head_dim: int) -> torch.Tensor:
    """SGLang's fused q/k norm formula: ``(h * inv * w)`` in fp32, rounded once (HF rounds h * inv
    first); the same variance, so only that rounding differs."""
    h = x.reshape(-1, head_dim).float()
    variance = pairwise_sum_of_squares(h) / head_dim
    inv = 1.0 / torch.sqrt(variance + eps)
    return (h * inv * weight.float()).to(x.dtype).reshape(x.shape)


def check_cases(device: str) -> None:
    for tokens, hq, hk, head_dim, eps in CASES:
        q, k, qw, kw = inputs(tokens, hq, hk, head_dim, device=device)
        before = (q.clone(), k.clone())
        got_q, got_k = qk_rms_norm(q, k, qw, kw, eps, head_dim)
        want_q, want_k = qk_rms_norm_reference(q, k, qw, kw, eps, head_dim)
        assert got_q.is_contiguous() and got_k.is_contiguous()
        assert_same_bits(got_q, want_q, f"{(tokens, hq, hk, head_dim)} q")
        assert_same_bits(got_k, want_k, f"{(tokens, hq, hk, head_dim)} k")
        assert torch.equal(q, before[0]) and torch.equal(k, before[1]), "the inputs were written"
        print(f"ok {device} {(tokens, hq, hk, head_dim)}")


def test_negative_control_the_fp32_weight_multiply_gives_other_bits():
    q, _k, qw, _kw = inputs(301, 16, 8, 128, seed=1)
    want = qk_rms_norm_reference(q, _k, qw, _kw, 1e-6, 128)[0]
    differ = count_differing(fused_fp32_weight(q, qw, 1e-6, 128), want)
    print(f"fp32 weight multiply vs HF's rounding first: {differ} of {q.numel()} elements differ")
    assert differ > 0


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda q, k, qw, kw: (q.float(), k, qw, kw, 64), TypeError),
        (lambda q, k, qw, kw: (q, k[:2], qw, kw, 64), ValueError),  # token counts differ
        (lambda q, k, qw, kw: (q, k, qw, kw, 48), ValueError),  # head_dim does not divide
        (lambda q, k, qw, kw: (q, k, qw[:32], kw, 64), ValueError),  # weight shape
        (lambda q, k, qw, kw: (q[:, ::2], k, qw, kw, 32), ValueError),  # column stride 2
        (lambda q, k, qw, kw: (q.reshape(3, -1, 64), k, qw, kw, 64), ValueError),  # 3-D
    ],
)
def test_bad_input_is_refused(change, error):
    q, k, qw, kw = inputs(3, 4, 2, 64)
    q2, k2, qw2, kw2, head_dim = change(q, k, qw, kw)
    with pytest.raises(error):
        qk_rms_norm(q2, k2, qw2, kw2, 1e-6, head_dim)


def test_kernel_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "interpreter checks passed" in proc.stdout, proc.stdout[-4000:]


def test_kernel_compiles_for_sm90_without_fma():
    """Compiled for sm_90 (no GPU needed): fusion off, IEEE division and sqrt, bf16 round-to-nearest."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles with the real Triton JIT")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from parity.ops import qk_norm
    from parity.ops.rms_norm_pairwise import launch_options

    opts = launch_options(128)
    types = dict(Q="*bf16", sq="i32", K="*bf16", sk="i32", QW="*bf16", KW="*bf16", OQ="*bf16", OK="*bf16")
    types.update(HQ="i32", HK="i32", D="i32", eps="fp32")
    consts = {n: opts[n] for n in ("BLOCK_H", "LOG2_BLOCK_H")} | dict(EXACT_RNE=False)
    fn = qk_norm._qk_norm_kernel
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    k = triton.compile(
        ASTSource(fn, sig, constexprs=consts),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=opts["num_warps"], enable_fp_fusion=opts["enable_fp_fusion"]),
    )
    ptx = k.asm["ptx"]
    assert "fma.rn.f32" not in ptx, "an fma in the PTX: fusion must be off"
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
    assert "cvt.rn.bf16.f32" in ptx


@pytest.mark.gpu
def test_kernel_equals_reference_and_the_unfused_kernels_on_cuda():
    from parity.ops.rms_norm_pairwise import rms_norm_pairwise_kernel

    check_cases("cuda")
    for tokens in (1, 8, 4099):  # decode-sized and prefill-sized
        q, k, qw, kw = inputs(tokens, 16, 8, 128, device="cuda", seed=2)
        got_q, got_k = qk_rms_norm(q, k, qw, kw, 1e-6, 128)
        # the unfused path: contiguous copies [tokens * heads, head_dim], one norm kernel each
        want_q = rms_norm_pairwise_kernel(q.reshape(-1, 128), qw, 1e-6)[0].reshape(q.shape)
        want_k = rms_norm_pairwise_kernel(k.reshape(-1, 128), kw, 1e-6)[0].reshape(k.shape)
        assert_same_bits(got_q, want_q, f"{tokens} tokens q vs the unfused kernel")
        assert_same_bits(got_k, want_k, f"{tokens} tokens k vs the unfused kernel")
        assert_same_bits(got_q, qk_rms_norm_reference(q, k, qw, kw, 1e-6, 128)[0], f"{tokens} q vs reference")
    differ = count_differing(fused_fp32_weight(q, qw, 1e-6, 128), got_q)
    print(f"CUDA: fp32 weight multiply vs the kernel: {differ} of {q.numel()} elements differ")
    assert differ > 0


# ---------------------------------------------------------------------------------------------------
# Child process (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------


def _child() -> None:
    from parity.ops import qk_norm
    from tests.helpers import interpreter_checks

    interpreter_checks(qk_norm, check_cases)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _child()
