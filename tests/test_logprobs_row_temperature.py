"""Per-row temperatures in the logprob kernel (``parity.ops.policy_loss``, ``ROW_T``) and the server
sampler's entry point ``parity.logprobs.sampled_token_logprobs``: bitwise ``token_logprobs`` (the rows
grouped by temperature on the host, each group one scalar-temperature launch), without the host reading
a temperature or waiting for an id check.

The kernel runs under the Triton interpreter in a child Python (this file's ``__main__``) and on CUDA
(GPU-marked, with PyTorch's sync debug mode set to raise: no host synchronisation). Rows with T == 1
skip the division, as the contract says (the kernel branches per row); the T == 1 rows carry ``-0.0``
and ``-inf`` logits. (Dividing them by 1 would give the same logprobs: the row max is ``+0.0``-normed
and ``-inf`` is kept, so the branch saves instructions, not bits.) Negative control: the rows'
logprobs under one shared temperature differ, so the per-row checks cannot pass by ignoring the
temperatures.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from parity.logprobs import sampled_token_logprobs, token_logprobs
from parity.ops.policy_loss import _use_triton, fused_logprobs
from tests.helpers import assert_same_bits, count_differing, run_under_triton_interpreter

TEMPERATURES = (0.5, 0.7, 1.0, 1.3)


def batch(rows: int, vocab: int, device: str = "cpu", seed: int = 0):
    """bf16 logits [rows, vocab] with special values in the T == 1 rows, ids, SGLang-shaped [rows, 1]
    fp32 temperatures (every value of TEMPERATURES present)."""
    g = torch.Generator().manual_seed(seed * 101 + rows + vocab)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(torch.bfloat16)
    temps = torch.tensor(TEMPERATURES)[torch.arange(rows) % len(TEMPERATURES)]
    ones = (temps == 1.0).nonzero()[:, 0]
    logits[ones[0], :7] = torch.tensor([-0.0, float("-inf"), float("-inf"), -0.0, 0.0, 1.0, -2.0])
    logits[ones[-1], 3] = float("-inf")
    ids = torch.randint(0, vocab, (rows,), generator=g)
    ids[ones[0]] = 0  # the -0.0 logit
    return logits.to(device), ids.to(device), temps.view(-1, 1).to(device)


def check(device: str) -> None:
    for rows, vocab, dtype in (
        (12, 4099, torch.bfloat16),
        (5, 2048, torch.bfloat16),
        (9, 300, torch.float32),
    ):
        logits, ids, temps = batch(rows, vocab, device)
        logits = logits.to(dtype)  # fp32: SGLang's next-token logits (the kernel's unpaired loads)
        want = token_logprobs(logits, ids, temps)  # grouped by temperature on the host
        assert_same_bits(sampled_token_logprobs(logits, ids, temps), want, f"{rows}x{vocab} sampled")
        if _use_triton(logits):
            assert_same_bits(
                fused_logprobs(logits, ids, temps.view(-1)), want, f"{rows}x{vocab} per-row kernel"
            )
        # negative control: one shared temperature is not the rows' own
        assert count_differing(fused_logprobs(logits, ids, 0.7), want) > 0
        print(f"ok {device} {rows}x{vocab} {dtype}")
    # an id outside [0, V): NaN in that row only, the others unchanged
    logits, ids, temps = batch(8, 1000, device, seed=1)
    bad = ids.clone()
    bad[2], bad[5] = -1, 1000
    got = sampled_token_logprobs(logits, bad, temps)
    assert math.isnan(got[2].item()) and math.isnan(got[5].item())
    keep = torch.tensor([i not in (2, 5) for i in range(8)], device=device)
    assert_same_bits(got[keep], token_logprobs(logits, ids, temps)[keep], "other rows")


def test_cpu_reference_path_groups_rows_and_marks_bad_ids():
    check("cpu")


def test_per_row_temperatures_need_the_kernel_off_cuda():
    logits, ids, temps = batch(4, 300)
    with pytest.raises(TypeError, match="per-row temperatures"):
        fused_logprobs(logits, ids, temps.view(-1))


def test_kernel_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "interpreter checks passed" in proc.stdout, proc.stdout[-4000:]


@pytest.mark.gpu
def test_kernel_on_cuda_without_host_synchronisation():
    check("cuda")
    logits, ids, temps = batch(64, 151936, "cuda", seed=2)
    logits = logits.float()  # as SGLang's sampler holds them
    want = token_logprobs(logits, ids, temps)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        got = sampled_token_logprobs(logits, ids, temps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_same_bits(got, want, "64 x 151936")


# ---------------------------------------------------------------------------------------------------
# Child process (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------


def _child() -> None:
    from parity.ops import policy_loss
    from tests.helpers import interpreter_checks

    interpreter_checks(policy_loss, check)  # under the interpreter: the kernel, per-row path


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _child()
