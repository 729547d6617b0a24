"""HF's SiLU-and-mul as one kernel (``parity.ops.silu_and_mul``): the Triton kernel under the Triton
interpreter (a child Python, this file's ``__main__``) and on CUDA (GPU-marked) against HF's formula
``F.silu(gate) * up`` bit for bit: bf16 and fp16, every one of the 65536 gate patterns (zeros,
subnormals, infinities; NaN gates give NaN), odd widths, rows that are slices of a wider buffer, a
3-D input, poisoned outputs. The table is torch's ``F.silu`` on the same device, so the claim is the
kernel's indexing, product and rounding.

Negative control: sgl_kernel's formula (the product in fp32, rounded once) gives other bits on the
same inputs, so the checks cannot pass with any SiLU-and-mul of the right values.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parity.ops.silu_and_mul import silu_and_mul, silu_and_mul_reference, silu_table
from tests.helpers import assert_same_bits, count_differing, run_under_triton_interpreter

DTYPES = (torch.bfloat16, torch.float16)
# (leading shape, d): decode and prefill rows, an odd width, a width past one program's block
SHAPES = (((1,), 1376), ((37,), 5), ((2, 3), 1025), ((0,), 64))


def buffer_rows(lead, d, dtype, device, seed=0):
    """[*lead, 2 d] rows that are slices of a wider buffer (row stride 2 d + 3), gate and up of mixed
    scale."""
    g = torch.Generator().manual_seed(seed * 7919 + d)
    wide = 4 * torch.randn(*lead, 2 * d + 3, generator=g)
    return wide.to(dtype).to(device)[..., 1 : 2 * d + 1]


def all_gate_patterns(dtype, device, seed=0):
    """[256, 512] rows: gate = every 16-bit pattern except NaNs (once), up random."""
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    gates = patterns[~patterns.isnan()]
    gates = torch.cat([gates, gates[: 65536 - gates.numel()]])  # refill to 65536 (finite repeats)
    up = (2 * torch.randn(65536, generator=torch.Generator().manual_seed(seed))).to(dtype)
    return torch.cat([gates.view(256, 256), up.view(256, 256)], dim=-1).to(device)


def fused_fp32(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return (F.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)


def check_cases(device: str) -> None:
    for dtype in DTYPES:
        table = silu_table(dtype, torch.device(device))
        for lead, d in SHAPES:
            x = buffer_rows(lead, d, dtype, device)
            before = x.clone()
            got = silu_and_mul(x, table)
            assert got.is_contiguous()
            assert_same_bits(got, silu_and_mul_reference(x), f"{dtype} {lead} d={d}")
            assert torch.equal(x, before), "the input was written"
        x = all_gate_patterns(dtype, device)
        assert_same_bits(silu_and_mul(x, table), silu_and_mul_reference(x), f"{dtype}: all gate patterns")
        nan_gates = torch.cat([torch.full((3, 4), float("nan")), torch.ones(3, 4)], -1).to(dtype).to(device)
        assert silu_and_mul(nan_gates, table).isnan().all(), "NaN gates must give NaN"
        print(f"ok {device} {dtype}")


def test_negative_control_the_fp32_product_gives_other_bits():
    for dtype in DTYPES:
        x = all_gate_patterns(dtype, "cpu", seed=1)
        differ = count_differing(fused_fp32(x), silu_and_mul_reference(x))
        print(
            f"{dtype}: fp32 product rounded once vs HF's two roundings: {differ} of {x.numel() // 2} differ"
        )
        assert differ > 0


def test_table_is_torchs_silu_at_every_pattern():
    """Row ``i`` of the table is ``F.silu`` of the pattern ``i`` (the index arithmetic the kernel uses:
    the 16 bits read as an unsigned integer)."""
    for dtype in DTYPES:
        table = silu_table(dtype, torch.device("cpu"))
        for bits in (0, 1, 0x3F80, 0x7F80, 0x8000, 0xBF80, 0xC0A0, 0xFFFF - 0x0080):
            value = torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype)
            want = F.silu(value)
            got = table[bits : bits + 1]
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)) or (
                got.isnan() and want.isnan()
            )


def test_bad_input_is_refused():
    table = silu_table(torch.bfloat16, torch.device("cpu"))
    with pytest.raises(TypeError):
        silu_and_mul(torch.zeros(2, 8), table)  # fp32
    with pytest.raises(TypeError):
        silu_and_mul(torch.zeros(2, 8, dtype=torch.float16), table)  # another dtype's table
    with pytest.raises(ValueError):
        silu_and_mul(torch.zeros(2, 7, dtype=torch.bfloat16), table)  # odd last dim
    with pytest.raises(TypeError):
        silu_table(torch.float32, torch.device("cpu"))


def test_kernel_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "interpreter checks passed" in proc.stdout, proc.stdout[-4000:]


@pytest.mark.parametrize("dtype, cvt", [("bf16", "cvt.rn.bf16.f32"), ("fp16", "cvt.rn.f16.f32")])
def test_kernel_compiles_for_sm90_with_one_rounding(dtype, cvt):
    """Compiled for sm_90 (no GPU needed): the fp32 product and one round-to-nearest conversion."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles with the real Triton JIT")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from parity.ops import silu_and_mul as op

    types = dict(XB="*i16", sx="i32", TABLE="*i16", OUT=f"*{dtype}", D="i32")
    consts = dict(DTYPE=tl.bfloat16 if dtype == "bf16" else tl.float16, BLOCK_D=op.BLOCK, EXACT_RNE=False)
    fn = op._silu_and_mul_kernel
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    ptx = k.asm["ptx"]
    assert "fma" not in ptx, "an fma: the product must be rounded by itself"
    # the exact fp32 product rounded once: as mul.f32 + cvt.rn, or folded by LLVM into the 16-bit
    # multiply (mul.bf16 / mul.f16, round-to-nearest by default), the same single rounding
    folded = "mul.bf16" if dtype == "bf16" else "mul.f16"
    assert ("mul.f32" in ptx or "mul.rn.f32" in ptx) and cvt in ptx or folded in ptx, ptx[:2000]


@pytest.mark.gpu
def test_kernel_equals_hf_formula_on_cuda():
    check_cases("cuda")
    x = buffer_rows((8192,), 3072, torch.bfloat16, "cuda", seed=2)  # a prefill-sized batch
    table = silu_table(torch.bfloat16, torch.device("cuda"))
    assert_same_bits(silu_and_mul(x, table), silu_and_mul_reference(x), "8192 x 3072")
    differ = count_differing(fused_fp32(x), silu_and_mul_reference(x))
    print(f"CUDA: fp32 product rounded once vs HF's: {differ} of {x.numel() // 2} elements differ")
    assert differ > 0


# ---------------------------------------------------------------------------------------------------
# Child process (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------


def _child() -> None:
    from parity.ops import silu_and_mul as op
    from tests.helpers import interpreter_checks

    interpreter_checks(op, check_cases)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _child()
