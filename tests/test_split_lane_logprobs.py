"""The contract's logprob with each row spread over many programs (``parity.ops.split_lane_logprobs``):
bit for bit the plain-PyTorch contract (``policy_loss.logprobs_reference``, row by row at the row's own
temperature) under the Triton interpreter (a child Python, this file's ``__main__``) and on CUDA
(GPU-marked, also against the one-program kernel): bf16/fp16/fp32 logits, one tile, a tile and one
column, many tiles with a partial one, 5 columns, T == 1 rows (no division) with -0.0 and -inf logits,
rows whose max is NaN or -inf (NaN), ids outside ``[0, V)`` (NaN, checked on the device: the host
never reads the ids), rows that are slices of a wider buffer, poisoned outputs and scratch.
``fused_logprobs`` takes this path for per-row temperatures up to ``MAX_ROWS`` rows.

Negative controls: the contract with another tile width (other lanes, another tree) and torch's
``log_softmax`` give other bits on the same rows, so the checks cannot pass with any close logprob.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from parity.ops import split_lane_logprobs as op
from parity.ops.policy_loss import CONTRACT_TILE, _contract_rows, _scaled, logprobs_reference
from tests.helpers import assert_same_bits, count_differing, run_under_triton_interpreter

# (rows, vocab, dtype): decode-like rows over one tile, one tile + 1, several tiles + a partial, tiny
CASES = (
    (4, CONTRACT_TILE, torch.float32),
    (3, CONTRACT_TILE + 1, torch.float16),
    (3, 4 * CONTRACT_TILE + 5, torch.bfloat16),
    (2, 5, torch.float32),
)
TEMPERATURES = (1.0, 0.7, 1.3, 0.5)


def rows(n, vocab, dtype, device="cpu", seed=0):
    """Logits (a slice of a wider buffer), ids, fp32 per-row temperatures; row 0 (T == 1) holds -0.0
    and -inf logits and picks the -0.0 one."""
    g = torch.Generator().manual_seed(seed * 31 + n + vocab)
    wide = 4 * torch.randn(n, vocab + 3, generator=g)
    logits = wide[:, 1 : vocab + 1]
    logits[0, : min(3, vocab)] = torch.tensor([-0.0, float("-inf"), 2.0])[: min(3, vocab)]
    ids = torch.randint(0, vocab, (n,), generator=g)
    ids[0] = 0
    temps = torch.tensor(TEMPERATURES, dtype=torch.float32)[torch.arange(n) % len(TEMPERATURES)]
    return logits.to(dtype).to(device), ids.to(device), temps.to(device)


def contract(logits, ids, temps):
    return torch.cat(
        [logprobs_reference(logits[r : r + 1], ids[r : r + 1], float(temps[r])) for r in range(len(ids))]
    )


def check_cases(device: str) -> None:
    for n, vocab, dtype in CASES:
        logits, ids, temps = rows(n, vocab, dtype, device)
        before = logits.clone()
        got = op.split_lane_logprobs(logits, ids, temps)
        assert_same_bits(
            got, contract(logits.cpu(), ids.cpu(), temps.cpu()).to(device), f"{n}x{vocab} {dtype}"
        )
        assert torch.equal(logits, before), "the input was written"
    # rows whose max is NaN, +inf or -inf (all -inf): NaN, the other rows unchanged
    logits, ids, temps = rows(4, 3000, torch.float32, device, seed=1)
    logits[1, 2500] = float("nan")
    logits[2, 7] = float("inf")
    logits[3] = float("-inf")
    got = op.split_lane_logprobs(logits, ids, temps)
    assert got[1:].isnan().all(), got
    assert_same_bits(got[:1], contract(logits[:1].cpu(), ids[:1].cpu(), temps[:1].cpu()).to(device), "row 0")
    # ids outside [0, V): NaN (a clamped id would give a finite logprob), the other rows unchanged
    logits, ids, temps = rows(4, 3000, torch.bfloat16, device, seed=2)
    want = contract(logits.cpu(), ids.cpu(), temps.cpu()).to(device)
    ids[1], ids[2] = -1, 3000
    got = op.split_lane_logprobs(logits, ids, temps)
    assert got[1:3].isnan().all() and not want[1:3].isnan().any(), got
    assert_same_bits(got[[0, 3]], want[[0, 3]], "rows beside ids out of range")
    print(f"ok {device}")


def test_negative_controls_other_lanes_and_log_softmax_give_other_bits():
    """On 256 rows, the contract with half the tile width (other lanes, another tree) and torch's
    log_softmax differ from the contract in some logprobs: a check that passes is not passing for any
    close value."""
    logits, ids, temps = rows(256, 4 * CONTRACT_TILE + 5, torch.float32)
    temps = torch.ones_like(temps)
    want = contract(logits, ids, temps)
    other_tile = _contract_rows(_scaled(logits, 1.0), ids, CONTRACT_TILE // 2, True, False)[0]
    log_softmax = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, None])[:, 0]
    for name, other in (("tile / 2", other_tile), ("log_softmax", log_softmax)):
        differ = count_differing(other, want)
        print(f"{name} vs the contract: {differ} of 256 logprobs differ")
        assert differ > 0, name


def test_bad_input_is_refused():
    logits, ids, temps = rows(2, 10, torch.float32)
    with pytest.raises(TypeError):
        op.split_lane_logprobs(logits.double(), ids, temps)
    with pytest.raises(TypeError):
        op.split_lane_logprobs(logits, ids.int(), temps)
    with pytest.raises(TypeError):
        op.split_lane_logprobs(logits, ids, temps.double())
    with pytest.raises(TypeError):
        op.split_lane_logprobs(logits, ids[:1], temps)
    with pytest.raises(ValueError):
        op.split_lane_logprobs(logits[:, :0], ids, temps)


def test_kernel_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=900)
    assert "interpreter checks passed" in proc.stdout, proc.stdout[-4000:]


def test_kernels_compile_for_sm90():
    """The three kernels compile for sm_90 (no GPU needed): the server's sampler runs them on every
    decode step, so a compile error would stop it."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles with the real Triton JIT")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    common = dict(X="*bf16", sx="i64", TEMPS="*fp32", TMAX="*fp32", S="*fp32", M="*fp32", IDS="*i64",
                  LOGP="*fp32")  # fmt: skip
    consts = dict(V=151936, TILE=CONTRACT_TILE, LOG2_TILE=11, FMA=1, INTERP=False, LANES=op.LANES,
                  NUM_STAGES=op.NUM_STAGES)  # fmt: skip
    for fn in (op._tile_max_kernel, op._lane_sums_kernel, op._finish_kernel):
        sig = {a: "constexpr" if a in consts else common[a] for a in fn.arg_names}
        used = {a: consts[a] for a in fn.arg_names if a in consts}
        k = triton.compile(ASTSource(fn, sig, constexprs=used), target=GPUTarget("cuda", 90, 32))
        assert ".entry" in k.asm["ptx"]


@pytest.mark.gpu
def test_kernel_equals_the_contract_and_the_one_program_kernel_on_cuda():
    from parity.ops.policy_loss import _forward

    check_cases("cuda")
    logits, ids, temps = rows(64, 151936, torch.float32, "cuda", seed=2)  # a decode step's rows
    got = op.split_lane_logprobs(logits, ids, temps)
    one_program = _forward(logits, ids, None, None, None, None, temps, 0, False, CONTRACT_TILE, True)[0]
    assert_same_bits(got, one_program, "64 x 151936 vs the one-program kernel")


# ---------------------------------------------------------------------------------------------------
# Child process (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------


def _dispatch_check() -> None:
    """fused_logprobs sends per-row temperatures up to MAX_ROWS rows here, larger batches elsewhere; on
    this path an id outside [0, V) is NaN (check_ids=False, the server's) or a ValueError (the default),
    as on the others."""
    from parity.ops.policy_loss import fused_logprobs

    calls = []
    real = op.split_lane_logprobs
    op.split_lane_logprobs = lambda *a: calls.append(len(a[1])) or real(*a)
    max_rows, op.MAX_ROWS = op.MAX_ROWS, 2
    try:
        for n in (2, 3):
            logits, ids, temps = rows(n, 300, torch.float32)
            assert_same_bits(fused_logprobs(logits, ids, temps), contract(logits, ids, temps), f"{n} rows")
    finally:
        op.split_lane_logprobs, op.MAX_ROWS = real, max_rows
    assert calls == [2], calls
    logits, ids, temps = rows(2, 300, torch.float32)
    ids[1] = 300
    got = fused_logprobs(logits, ids, temps, check_ids=False)
    assert got[1].isnan() and not got[0].isnan(), got
    with pytest.raises(ValueError, match="outside"):
        fused_logprobs(logits, ids, temps)


def _child() -> None:
    from tests.helpers import interpreter_checks

    _dispatch_check()
    interpreter_checks(op, check_cases)  # outputs and scratch poisoned with NaN


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _child()
