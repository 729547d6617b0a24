"""The fused all-reduce + residual + RMSNorm Triton kernel under the Triton interpreter (CPU), and its
plain-PyTorch references.

The interpreter must be chosen before ``triton.jit`` decorates the kernel, so the kernel checks run
in a child Python with ``TRITON_INTERPRET=1`` (this file's ``__main__``): the kernel reads k ranks'
partials through a table of pointers (here host pointers to CPU tensors, on the GPU the peers'
symmetric-memory buffers) and must equal the unfused reference path bit for bit. The one-shot kernel
(copy-in, barriers, persistent row loop) runs there with world 1: a rank meeting itself.

The synchronisation's lowering on the GPU is checked without one: the one-shot kernel compiled for
sm_90 must issue its flag atomics from one predicated thread, the peers' with release / acquire
semantics at system scope (a weaker scope would race with the peer GPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from parity import contract
from parity.ops.fused_allreduce_rmsnorm import reference_allreduce_add_rms_norm, residual_before_rounding
from parity.ops.rms_norm_pairwise import pairwise_sum_of_squares, rms_norm_pairwise
from parity.tp import rank_order_sum
from tests.helpers import run_under_triton_interpreter

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16

# (world, rows, hidden): power-of-two and not (5120), one row, many ranks.
SHAPES = ((2, 5, 128), (2, 1, 96), (3, 4, 256), (4, 3, 1024), (8, 2, 512), (2, 3, 5120))


def inputs(world: int, rows: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 1000 + world * 100 + hidden)
    scale = torch.exp2(torch.randint(-3, 4, (world, rows, hidden), generator=g).float())
    partials = list((torch.randn(world, rows, hidden, generator=g) * scale).to(BF16))
    residual = (torch.randn(rows, hidden, generator=g) * 4).to(BF16)
    weight = (1 + 0.3 * torch.randn(hidden, generator=g)).to(BF16)
    return partials, residual, weight


def test_reference_path_is_rank_order_sum_then_the_contract():
    partials, residual, weight = inputs(4, 16, 128)
    normed, summed = reference_allreduce_add_rms_norm(partials, residual, weight, 1e-6, fused_norm=False)
    want_normed, want_summed = contract.add_rms_norm(rank_order_sum(partials), residual, weight, 1e-6)
    assert torch.equal(summed, want_summed) and torch.equal(normed, want_normed)
    # The default (the GPU contract) shares the residual sum; its norm is the pairwise-tree one.
    p_normed, p_summed = reference_allreduce_add_rms_norm(partials, residual, weight, 1e-6)
    assert torch.equal(p_summed, summed)
    assert torch.equal(p_normed, rms_norm_pairwise(summed, weight, 1e-6))


def test_negative_control_residual_before_rounding_differs():
    partials, residual, weight = inputs(2, 64, 1024)
    _, summed = reference_allreduce_add_rms_norm(partials, residual, weight, 1e-6)
    _, bug = residual_before_rounding(partials, residual, weight, 1e-6)
    frac = float((bug.double() != summed.double()).float().mean())
    assert frac > 0.05, frac


def test_pairwise_rms_norm_differs_from_torch_mean_only_rarely():
    """Why the GPU contract's norm is not ``contract.rms_norm``: torch's CPU ``mean`` reduces in another
    order, so the fp32 variance differs in the last bits in many rows; rarely in bf16 outputs."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2000, 1024, generator=g) * 3).to(BF16)
    w = (1 + 0.3 * torch.randn(1024, generator=g)).to(BF16)
    h = x.float()
    var_rows = int((h.pow(2).mean(-1, keepdim=True) != pairwise_sum_of_squares(h) / 1024).sum())
    out = int((contract.rms_norm(x, w, 1e-6).double() != rms_norm_pairwise(x, w, 1e-6).double()).sum())
    print(f"variance differs in {var_rows} of 2000 rows; normed in {out} of {x.numel()} elements")
    assert var_rows > 0


def test_one_shot_flags_compile_to_single_thread_system_scope_atomics():
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from parity.ops.fused_allreduce_rmsnorm import _one_shot_kernel

    names = list(_one_shot_kernel.arg_names)
    constexprs = dict(WORLD=2, BLOCK_H=1024, LOG2_BLOCK_H=10, NORM=True, EXACT_RNE=False)
    types = {"n_rows": "i32", "n_programs": "i32", "rank": "i32", "region": "i32", "H": "i32", "eps": "fp32"}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "*bf16") for n in names}
    signature.update(inbox_table="*i64", flag_table="*i64")
    # Triton's wheel ships ptxas: this compiles for sm_90 on a machine without a GPU.
    compiled = compile(ASTSource(_one_shot_kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    ordered = [
        line.strip()
        for line in compiled.asm["ptx"].splitlines()
        if re.search(r"\.(acquire|release|acq_rel)", line)
    ]
    # Per peer (the static loop over WORLD = 2 ranks, each skipping itself at run time): publish (release
    # exchange), wait published (acquire load; Triton lowers the atomic add of 0 to one); plus the
    # programs' counter at GPU scope. Each issued by one predicated thread.
    kinds = {
        r"ld\.global\.sys\.acquire\.b32": 2,
        r"atom\.global\.sys\.release\.exch\.b32": 2,
        r"atom\.global\.gpu\.acq_rel\.add\.u32": 1,
    }
    assert len(ordered) == sum(kinds.values()), ordered
    for kind, n in kinds.items():
        assert sum(bool(re.match(rf"@%p\d+ {kind} ", line)) for line in ordered) == n, (kind, ordered)


def test_kernel_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "interpreter checks passed" in proc.stdout, proc.stdout[-4000:]


# ---------------------------------------------------------------------------------------------------
# Child process
# ---------------------------------------------------------------------------------------------------


def _child() -> None:
    from parity.ops.fused_allreduce_rmsnorm import (
        allreduce_add_rms_norm_local,
        flag_count,
        one_shot_allreduce_add_rms_norm,
    )
    from tests.helpers import describe_mismatch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    for world, rows, hidden in SHAPES:
        partials, residual, weight = inputs(world, rows, hidden)
        for fused_norm in (True, False):
            normed, summed = allreduce_add_rms_norm_local(
                partials, residual, weight, 1e-6, fused_norm=fused_norm
            )
            want_n, want_s = reference_allreduce_add_rms_norm(
                partials, residual, weight, 1e-6, fused_norm=fused_norm
            )
            what = f"world={world} rows={rows} hidden={hidden} fused_norm={fused_norm}"
            assert torch.equal(summed, want_s), f"{what} summed: {describe_mismatch(summed, want_s)}"
            assert torch.equal(normed, want_n), f"{what} normed: {describe_mismatch(normed, want_n)}"
        # Negative control: the kernel is not the residual-before-rounding bug.
        _, bug = residual_before_rounding(partials, residual, weight, 1e-6)
        assert not torch.equal(bug, summed), f"world={world} hidden={hidden}: bug indistinguishable"
        print(f"ok world={world} rows={rows} hidden={hidden}")
    # Specials: zeros, a -0.0 partial, huge values rounding to inf in bf16.
    partials, residual, weight = inputs(2, 2, 128, seed=1)
    partials[0][0].zero_()
    partials[1][0].zero_()
    partials[0][0, :4] = -0.0
    partials[1][1, :2] = 3.0e38
    partials[0][1, :2] = 3.0e38
    normed, summed = allreduce_add_rms_norm_local(partials, residual, weight, 1e-6, fused_norm=True)
    want_n, want_s = reference_allreduce_add_rms_norm(partials, residual, weight, 1e-6, fused_norm=True)
    assert torch.equal(summed.view(torch.int16), want_s.view(torch.int16)), "specials: summed bits"
    assert torch.equal(normed[0].view(torch.int16), want_n[0].view(torch.int16)), "specials: normed bits"
    # The one-shot kernel, world 1 (it pushes to no peer and waits for none: the inbox stays poisoned):
    # the row loop with fewer programs than rows, as many, and more allowed than rows; three calls on
    # the same flags (the call count and the programs' counter).
    for rows, max_programs in ((1, 1), (7, 3), (4, 4), (3, 8)):
        partials, residual, weight = inputs(1, rows, 256, seed=2)
        inbox = torch.full((2 * rows * 256,), float("nan"), dtype=BF16)
        flags = torch.zeros(flag_count(1, max_programs), dtype=torch.int32)
        tables = dict(
            inbox_table=torch.tensor([inbox.data_ptr()]), flag_table=torch.tensor([flags.data_ptr()])
        )
        for call in range(3):
            normed, summed = one_shot_allreduce_add_rms_norm(
                partials[0], residual, weight, 1e-6, rank=0, world=1, max_programs=max_programs,
                region=rows * 256, **tables,
            )  # fmt: skip
            want_n, want_s = reference_allreduce_add_rms_norm(partials, residual, weight, 1e-6)
            what = f"one-shot rows={rows} max_programs={max_programs} call {call}"
            assert torch.equal(summed, want_s), f"{what} summed: {describe_mismatch(summed, want_s)}"
            assert torch.equal(normed, want_n), f"{what} normed: {describe_mismatch(normed, want_n)}"
            assert inbox.isnan().all(), f"{what}: a rank wrote to its own inbox"
            want_flags = [call + 1, 0] + [0] * max_programs
            assert flags.tolist() == want_flags, f"{what}: flags {flags.tolist()} != {want_flags}"
        print(f"ok one-shot rows={rows} max_programs={max_programs}")
    print("interpreter checks passed")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _child()
