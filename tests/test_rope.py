"""HF's rotary embedding as one kernel (``parity.ops.rope``): the Triton kernel under the Triton
interpreter (a child Python, this file's ``__main__``) and on CUDA (GPU-marked) against the
plain-PyTorch reference bit for bit, on strided q/k views (SGLang's split of the qkv projection),
odd head counts, a head dim whose half is not a power of two, bf16 and fp16, poisoned outputs.
The reference is HF's formula (``test_gpu_op_patches.py`` checks the patch against HF's modules).

Negative control: the rotation in fp32 rounded once (sgl_kernel's) gives other bits on the same
inputs, so the kernel == reference checks cannot pass with any rotation of the right values.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from parity.ops.rope import apply_rope, cos_sin_table, hf_inv_freq, rope_reference
from tests.helpers import assert_same_bits, count_differing, run_under_triton_interpreter

# (tokens, q heads, k heads, head dim, dtype, max positions)
CASES = (
    (1, 16, 8, 128, torch.bfloat16, 40960),
    (37, 4, 2, 64, torch.bfloat16, 4096),
    (5, 3, 1, 96, torch.float16, 512),
    (0, 4, 2, 64, torch.bfloat16, 64),
)


def inputs(tokens, hq, hk, head_dim, dtype, max_pos, device="cpu", seed=0):
    """Positions, and q / k as the views SGLang hands RoPE: splits of one [tokens, (hq + 2 hk) d] row."""
    g = torch.Generator().manual_seed(seed * 7919 + tokens * 31 + head_dim)
    positions = torch.randint(0, max_pos, (tokens,), generator=g)
    qkv = (3 * torch.randn(tokens, (hq + 2 * hk) * head_dim, generator=g)).to(dtype)
    positions, qkv = positions.to(device), qkv.to(device)
    q, k, _ = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    cos, sin = cos_sin_table(hf_inv_freq(head_dim, 1e6), max_pos, dtype, torch.device(device))
    return positions, q, k, cos, sin


def fused_once(positions, x, cos, sin, head_dim):
    """sgl_kernel's rotation: fp32 throughout, rounded once."""
    c = torch.cat((cos[positions], cos[positions]), -1)[:, None, :].float()
    s = torch.cat((sin[positions], sin[positions]), -1)[:, None, :].float()
    h = x.reshape(positions.shape[0], -1, head_dim).float()
    half = head_dim // 2
    return (h * c + torch.cat((-h[..., half:], h[..., :half]), -1) * s).to(x.dtype).reshape(x.shape)


def check_cases(device: str) -> None:
    for case in CASES:
        positions, q, k, cos, sin = inputs(*case, device=device)
        head_dim = case[3]
        got_q, got_k = apply_rope(positions, q, k, cos, sin)
        assert_same_bits(got_q, rope_reference(positions, q, cos, sin, head_dim), f"{case} q")
        assert_same_bits(got_k, rope_reference(positions, k, cos, sin, head_dim), f"{case} k")
        print(f"ok {device} {case}")


def test_table_rows_do_not_depend_on_the_positions_computed_together():
    """Row p of the table is what HF computes for position p alone (elementwise ops)."""
    cos, sin = cos_sin_table(hf_inv_freq(128, 1e6), 40960, torch.bfloat16, torch.device("cpu"))
    for p in (0, 1, 4095, 40959):
        one_c, one_s = cos_sin_table(hf_inv_freq(128, 1e6), p + 1, torch.bfloat16, torch.device("cpu"))
        assert_same_bits(cos[p], one_c[p], f"cos row {p}")
        assert_same_bits(sin[p], one_s[p], f"sin row {p}")


def test_negative_control_rounding_once_gives_other_bits():
    positions, q, _, cos, sin = inputs(64, 16, 8, 128, torch.bfloat16, 40960, seed=1)
    differ = count_differing(
        fused_once(positions, q, cos, sin, 128), rope_reference(positions, q, cos, sin, 128)
    )
    print(f"fp32-once rotation vs HF's: {differ} of {q.numel()} elements differ")
    assert differ > 0


def test_bad_input_is_refused():
    positions, q, k, cos, sin = inputs(3, 4, 2, 64, torch.bfloat16, 64)
    with pytest.raises(TypeError, match="apply_rope"):
        apply_rope(positions, q.float(), k, cos, sin)
    with pytest.raises(ValueError, match="key"):
        apply_rope(positions, q, k[:, :-1], cos, sin)
    with pytest.raises(ValueError, match="query"):
        apply_rope(positions[:2], q, k, cos, sin)
    with pytest.raises(ValueError, match="cos"):
        apply_rope(positions, q, k, cos, sin[:, :-1])


def test_kernel_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "interpreter checks passed" in proc.stdout, proc.stdout[-4000:]


def test_kernel_compiles_for_sm90_without_fma():
    """Compiled for sm_90 (no GPU needed): every product rounded before its sum (fusion off)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles with the real Triton JIT")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from parity.ops import rope

    types = dict(POS="*i64", Q="*bf16", sq="i32", K="*bf16", sk="i32", COS="*bf16", SIN="*bf16")
    types.update(OQ="*bf16", OK="*bf16", HQ="i32", HK="i32")
    consts = dict(HALF=64, BLOCK_D=64, BLOCK_H=16, INTERP=False)
    fn = rope._rope_kernel
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs=consts)
    k = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, enable_fp_fusion=False)
    )
    ptx = k.asm["ptx"]
    assert "mul.rn.f32" in ptx or "mul.f32" in ptx
    assert "fma.rn.f32" not in ptx, "an fma in the PTX: fusion must be off"
    assert "cvt.rn.bf16.f32" in ptx


@pytest.mark.gpu
def test_kernel_equals_reference_on_cuda():
    check_cases("cuda")
    # every position of a 40960 table, a decode-sized and a prefill-sized batch
    for tokens in (1, 8, 16384):
        positions, q, k, cos, sin = inputs(tokens, 32, 8, 128, torch.bfloat16, 40960, device="cuda", seed=2)
        got_q, got_k = apply_rope(positions, q, k, cos, sin)
        assert_same_bits(got_q, rope_reference(positions, q, cos, sin, 128), f"{tokens} tokens q")
        assert_same_bits(got_k, rope_reference(positions, k, cos, sin, 128), f"{tokens} tokens k")
    positions = torch.arange(40960, device="cuda")
    _, q, k, cos, sin = inputs(40960, 2, 1, 128, torch.bfloat16, 40960, device="cuda", seed=3)
    assert_same_bits(
        apply_rope(positions, q, k, cos, sin)[0], rope_reference(positions, q, cos, sin, 128), "all"
    )
    # negative control on the device
    differ = count_differing(
        fused_once(positions, q, cos, sin, 128), rope_reference(positions, q, cos, sin, 128)
    )
    print(f"CUDA: fp32-once rotation vs HF's: {differ} of {q.numel()} elements differ")
    assert differ > 0


# ---------------------------------------------------------------------------------------------------
# Child process (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------


def _child() -> None:
    from parity.ops import rope
    from tests.helpers import interpreter_checks

    interpreter_checks(rope, check_cases)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _child()
