"""The grouped FP8 quantization launch (``weight_sync.fp8.block_quant_grouped``) and the bucket fill
built on it (``plan_fill`` / ``fill_bucket_from``), against the per-weight reference.

- In this process (CPU): the reference dispatch, the table, the refusals, and the kernel compiled for
  sm_90 without a GPU (its weight loads and e4m3 stores must be 16-byte vector accesses, which the
  alignment hints exist for).
- In a child under ``TRITON_INTERPRET=1`` (this file run as a script): the kernel itself on odd
  shapes (edge rows), several dtypes, NaN / ±Inf weights, a single-weight group, a grid smaller than
  the block count (programs loop and prefetch across weights), poisoned outputs; and
  ``fill_bucket_from`` against ``fill_bucket``.
- On a GPU (marked): Llama-like shapes on fresh random inputs, bitwise.

Compared bits: every byte of the destination buffer (so bytes outside the planned tensors must keep
their poison), except the e4m3 bytes of a block holding NaN/Inf, which mean nothing (its NaN scale
marks the block, and the flag the weight).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import interpreter_results

POISON = 0x7F  # float8_e4m3fn NaN bits, and a NaN-looking fp32 pattern in scale slots (0x7F7F7F7F)
BLOCK = 128


def make_group(specs, gen: torch.Generator, device="cpu", dtype=torch.bfloat16, gap=48):
    """Weights ``specs`` = [(shape, special)] laid out in a source buffer at 16-byte aligned offsets
    that are not multiples of 128 (with garbage between), their outputs interleaved in a poisoned
    destination buffer. ``special``: None, "nan", "inf", "-inf", "zero" or "huge"."""
    from weight_sync.fp8.block_quant_grouped import GroupedWeight, plan_grouped

    item = torch.empty((), dtype=dtype).element_size()
    src_off, dst_off, weights, tensors = gap, 16, [], []
    for i, ((n, k), special) in enumerate(specs):
        w = torch.randn(n, k, generator=gen) * float(torch.rand((), generator=gen) * 4 + 0.01)
        if special == "zero":
            w.zero_()
        elif special == "huge":
            w[n // 2, k - 1] = 1e30 if dtype == torch.float32 else 6e4
        elif special is not None:
            w[n - 1, k // 2] = float(special)
        tensors.append(w.to(dtype))
        scale_off = dst_off + -(-(n * k) // 16) * 16 + 16
        weights.append(GroupedWeight(f"layers.{i}.proj.weight", (n, k), src_off, dst_off, scale_off))
        src_off += -(-(n * k * item) // 16) * 16 + gap
        dst_off = -(-(scale_off + -(-n // BLOCK) * (k // BLOCK) * 4) // 16) * 16 + 32
    src = torch.randint(0, 256, (src_off + 64,), dtype=torch.uint8, generator=gen)
    for w, t in zip(weights, tensors, strict=True):
        src[w.src_offset : w.src_offset + t.numel() * item].view(dtype).copy_(t.flatten())
    dst = torch.full((dst_off + 64,), POISON, dtype=torch.uint8)
    return src.to(device), dst.to(device), plan_grouped(weights, dtype), tensors


def nonfinite_block_bytes(group, dst: torch.Tensor) -> torch.Tensor:
    """A mask over ``dst``: the e4m3 bytes of every block whose scale is NaN (meaningless bytes)."""
    mask = torch.zeros(dst.numel(), dtype=torch.bool)
    for w in group.weights:
        n, k = w.shape
        nb, kb = -(-n // BLOCK), k // BLOCK
        s = dst[w.scale_offset : w.scale_offset + nb * kb * 4].cpu().view(torch.float32).view(nb, kb)
        for i, j in torch.isnan(s).nonzero().tolist():
            rows = torch.arange(i * BLOCK, min((i + 1) * BLOCK, n))
            for r in rows.tolist():
                a = w.q_offset + r * k + j * BLOCK
                mask[a : a + BLOCK] = True
    return mask


def compare(label: str, got: torch.Tensor, want: torch.Tensor, group) -> str | None:
    """None if ``got`` == ``want`` byte for byte outside the e4m3 bytes of non-finite blocks."""
    got, want = got.cpu(), want.cpu()
    skip = nonfinite_block_bytes(group, want)
    if not torch.equal(nonfinite_block_bytes(group, got), skip):
        return f"{label}: the non-finite blocks differ"
    diff = (got != want) & ~skip
    if bool(diff.any()):
        first = int(diff.nonzero()[0])
        return f"{label}: {int(diff.sum())} of {got.numel()} bytes differ (first at byte {first})"
    return None


def grouped_vs_reference(label, specs, gen, device="cpu", dtype=torch.bfloat16, **kw) -> str | None:
    from weight_sync.fp8.block_quant_grouped import (
        fp8_block_quant_grouped_torch,
        fp8_block_quant_grouped_triton,
    )

    src, dst, group, _ = make_group(specs, gen, device, dtype)
    want = dst.clone()
    want_bad = fp8_block_quant_grouped_torch(src, want, group)
    got_bad = fp8_block_quant_grouped_triton(src, dst, group, **kw)
    if not torch.equal(got_bad.cpu(), want_bad.cpu()):
        return f"{label}: flags {got_bad.tolist()} != reference {want_bad.tolist()}"
    return compare(label, dst, want, group)


ODD_SPECS = [
    ((129, 256), None),
    ((128, 384), "nan"),
    ((5, 128), None),
    ((300, 640), "inf"),
    ((1, 128), "zero"),
    ((256, 128), "-inf"),
    ((131, 384), "huge"),
]


# ---------------------------------------------------------------------------------------------------
# This process (CPU)
# ---------------------------------------------------------------------------------------------------


def test_reference_writes_each_weight_as_the_single_weight_reference():
    from weight_sync.fp8 import fp8_block_quant_torch
    from weight_sync.fp8.block_quant_grouped import fp8_block_quant_grouped

    gen = torch.Generator().manual_seed(1)
    src, dst, group, tensors = make_group(ODD_SPECS, gen)
    poisoned = dst.clone()
    bad = fp8_block_quant_grouped(src, dst, group)  # CPU, no interpreter: the reference
    assert bad.tolist() == [0, 1, 0, 1, 0, 1, 0]
    touched = torch.zeros(dst.numel(), dtype=torch.bool)
    for w, t in zip(group.weights, tensors, strict=True):
        q, s = fp8_block_quant_torch(t, check=False)
        n, k = w.shape
        assert torch.equal(dst[w.q_offset : w.q_offset + n * k], q.view(torch.uint8).flatten())
        got_s = dst[w.scale_offset : w.scale_offset + s.numel() * 4].view(torch.float32)
        assert torch.equal(got_s.isnan(), s.flatten().isnan())
        assert torch.equal(got_s.nan_to_num(0), s.flatten().nan_to_num(0))
        touched[w.q_offset : w.q_offset + n * k] = True
        touched[w.scale_offset : w.scale_offset + s.numel() * 4] = True
    assert torch.equal(dst[~touched], poisoned[~touched])  # nothing else written


def test_table_numbers_blocks_across_weights():
    from weight_sync.fp8.block_quant_grouped import COL_FIRST, COL_KBLOCKS, COL_SRC

    gen = torch.Generator().manual_seed(2)
    _, _, group, _ = make_group(ODD_SPECS, gen)
    blocks = [-(-n // BLOCK) * (k // BLOCK) for (n, k), _ in ODD_SPECS]
    firsts = [sum(blocks[:i]) for i in range(len(blocks))]
    assert group.table[:, COL_FIRST].tolist() == firsts
    assert group.n_blocks == sum(blocks)
    assert group.table[:, COL_KBLOCKS].tolist() == [k // BLOCK for (_, k), _ in ODD_SPECS]
    assert group.table[:, COL_SRC].tolist() == [w.src_offset // 2 for w in group.weights]


@pytest.mark.parametrize(
    "shape, dtype, offsets, ok",
    [
        ((128, 256), torch.bfloat16, (0, 0, 0), True),
        ((3, 128), torch.float32, (16, 32, 4), True),
        ((128, 200), torch.bfloat16, (0, 0, 0), False),  # K % 128 != 0: column masks
        ((128, 256), torch.bfloat16, (8, 0, 0), False),  # source not 16-byte aligned
        ((128, 256), torch.bfloat16, (0, 8, 0), False),  # e4m3 bytes not 16-byte aligned
        ((128, 256), torch.bfloat16, (0, 0, 2), False),  # scales not fp32-aligned
        ((128,), torch.bfloat16, (0, 0, 0), False),
        ((128, 256), torch.float64, (0, 0, 0), False),
    ],
)
def test_groupable(shape, dtype, offsets, ok):
    from weight_sync.fp8.block_quant_grouped import groupable

    assert groupable(shape, dtype, *offsets) is ok


def test_refuses_bad_plans_and_buffers():
    from weight_sync.fp8.block_quant_grouped import GroupedWeight, fp8_block_quant_grouped, plan_grouped

    with pytest.raises(ValueError, match="cannot join a grouped launch"):
        plan_grouped([GroupedWeight("a", (128, 200), 0, 0, 0)], torch.bfloat16)
    with pytest.raises(ValueError, match="at least one weight"):
        plan_grouped([], torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    src, dst, group, _ = make_group(ODD_SPECS[:2], gen)
    before = dst.clone()
    with pytest.raises(ValueError, match="destination buffer holds"):
        fp8_block_quant_grouped(src, dst[: group.dst_extent - 1], group)
    with pytest.raises(ValueError, match="source buffer holds"):
        fp8_block_quant_grouped(src[: group.src_extent - 1], dst, group)
    with pytest.raises(ValueError, match="source buffer must be a contiguous 1-D uint8"):
        fp8_block_quant_grouped(src.view(torch.int16), dst, group)
    with pytest.raises(ValueError, match="aligned address"):
        fp8_block_quant_grouped(src, dst[1:], group)
    assert torch.equal(dst, before)  # nothing written


def test_kernel_compiles_to_16_byte_accesses_for_sm90():
    """The alignment hints (16-byte offsets, K % 128 == 0) must give vector loads of the weights and
    vector stores of the e4m3 bytes: scalar 2-byte loads or 1-byte stores would cost bandwidth."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from weight_sync.fp8.block_quant_grouped import _fp8_block_quant_grouped_kernel as kernel

    names = list(kernel.arg_names)
    consts = dict(
        EPS=1e-10, FP8_MAX=448.0, BLOCK=128, COLS=8, STEPS=4, SRC_ALIGN=8, SOFT_CAST=False,
        DIV_MODE=1, INTERPRET=False, N_ITERS=0,
    )  # fmt: skip
    types = dict(
        src_ptr="*bf16", q_ptr="*u8", s_ptr="*fp32", bad_ptr="*i32", table_ptr="*i64",
        n_weights="i32", n_blocks="i32",
    )  # fmt: skip
    sig = {n: "constexpr" if n in consts else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
    compiled = compile(
        ASTSource(kernel, sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=8),
    )
    ptx = compiled.asm["ptx"]
    loads = re.findall(r"ld\.global(?:\.\w+)*", ptx)
    stores = re.findall(r"st\.global(?:\.\w+)*", ptx)
    print("loads", sorted(set(loads)), "stores", sorted(set(stores)))
    # 128x128 bf16 over 256 threads: 64 values = 128 bytes = 8 vector loads per block (the first
    # block before the loop, the next one in it); 64 e4m3 bytes = 4 vector stores.
    assert loads.count("ld.global.v4.b32") == 16, loads
    assert stores.count("st.global.v4.b32") == 4, stores
    assert not [x for x in loads if x.endswith((".b16", ".u16"))], loads
    assert not [x for x in stores if x.endswith((".b8", ".u8", ".b16"))], stores


# ---------------------------------------------------------------------------------------------------
# Under the interpreter
# ---------------------------------------------------------------------------------------------------


def _fill_case(gen) -> str | None:
    """``fill_bucket_from`` (grouped + single launches + byte copies, from one source buffer) against
    ``fill_bucket`` (one launch per weight, from the tensors) on a plan with every kind of entry."""
    from weight_sync.fp8 import (
        DEFAULT_POLICY,
        SourceTensor,
        fill_bucket,
        fill_bucket_from,
        plan_bucket,
        plan_fill,
    )

    params = {
        "model.layers.0.input_layernorm.weight": torch.randn(130, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(129, 256, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(3, 257, generator=gen).to(torch.bfloat16),
        "model.layers.0.post_attention_layernorm.weight": torch.randn(130, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(130, 384, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 128, generator=gen).to(torch.float16),
    }
    params["model.layers.0.mlp.down_proj.weight"][7, 300] = float("nan")
    src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=gen)
    sources, off = {}, 32
    for name, t in params.items():
        sources[name] = SourceTensor(off, tuple(t.shape), t.dtype)
        src[off : off + t.numel() * t.element_size()].view(t.dtype).copy_(t.flatten())
        off += -(-(t.numel() * t.element_size()) // 16) * 16 + 16
    plan = plan_bucket([(n, t.shape, t.dtype) for n, t in params.items()], DEFAULT_POLICY, start=48)
    fill = plan_fill(plan, sources)
    if len(fill.grouped) != 2 or [q.source for q in fill.single] != [
        "model.layers.0.self_attn.k_proj.weight"
    ]:
        return f"unexpected plan: {fill}"
    got = torch.full((plan.nbytes + 64,), POISON, dtype=torch.uint8)
    want = got.clone()
    flags = fill_bucket_from(got, fill, src)
    fill_bucket(want, plan, params, check=False)
    bad = dict(zip(fill.quantized, flags.tolist(), strict=True))
    if bad != {n: int(n.endswith("down_proj.weight")) for n in fill.quantized}:
        return f"flags {bad}"
    if not torch.equal(got, want):
        return f"fill_bucket_from differs from fill_bucket in {int((got != want).sum())} bytes"
    return None


def _child() -> dict:
    from weight_sync.fp8.block_quant import _interpreting

    gen = torch.Generator().manual_seed(20)
    out = {"interpreting": _interpreting(), "cases": {}}
    cases = {
        "bf16-odd-shapes-nonfinite": dict(specs=ODD_SPECS),
        "fp16": dict(specs=[((130, 256), None), ((7, 128), "nan")], dtype=torch.float16),
        "fp32": dict(specs=[((129, 128), "huge"), ((2, 256), None)], dtype=torch.float32),
        "one-weight": dict(specs=[((257, 384), "inf")]),
        "one-program-per-sm": dict(specs=ODD_SPECS[:4], programs_per_sm=1),
    }
    for label, kw in cases.items():
        out["cases"][label] = grouped_vs_reference(label, gen=gen, **kw)
    out["cases"]["fill-bucket-from"] = _fill_case(gen)
    return out


@pytest.fixture(scope="module")
def interpreted():
    return interpreter_results(Path(__file__).resolve())


def test_child_ran_under_the_interpreter(interpreted):
    assert interpreted["interpreting"] is True
    assert len(interpreted["cases"]) == 6


@pytest.mark.parametrize(
    "case",
    ["bf16-odd-shapes-nonfinite", "fp16", "fp32", "one-weight", "one-program-per-sm", "fill-bucket-from"],
)
def test_interpreted_grouped_kernel_bitwise(interpreted, case):
    assert interpreted["cases"][case] is None, interpreted["cases"][case]


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_grouped_kernel_bitwise_on_llama_shapes():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))  # fresh each run
    specs = [((4096, 4096), None), ((1024, 4096), None), ((14336, 4096), "nan"), ((4096, 14336), None)]
    specs += ODD_SPECS
    msg = grouped_vs_reference("llama-layer", specs, gen, device="cuda")
    assert msg is None, msg


if __name__ == "__main__":
    print(json.dumps(_child()))
