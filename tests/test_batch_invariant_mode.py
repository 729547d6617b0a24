"""``parity.ops.batch_invariant_mode``: PyTorch's own ops, routed through batch-invariant kernels while
the mode is on, and PyTorch's kernels back when it is left.

On the CPU the mode registers for the CPU dispatch key and the Triton kernels run under the
interpreter, in a child Python with ``TRITON_INTERPRET=1`` (this file's ``__main__``); the GPU test
(marked) registers for CUDA. Each check compares with ``torch.equal`` against the op the override
calls directly, checks rows against the same rows in a larger batch, and has a negative control.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import describe_mismatch, run_under_triton_interpreter

BF16 = torch.bfloat16


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert torch.equal(got, want), f"{what}: {describe_mismatch(got, want)}"


def check_mode(device: str) -> None:
    """Every claim of the mode on ``device`` (run in the interpreter child on the CPU)."""
    from parity.logprobs import logprobs_matrix
    from parity.ops import batch_invariant_mode as bim
    from parity.ops.batch_invariant_matmul import batch_invariant_mm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 96, generator=g).to(BF16).to(device)
    w = (torch.randn(80, 96, generator=g) * 0.1).to(BF16).to(device)
    b = torch.randn(80, generator=g).to(BF16).to(device)
    logits = (3 * torch.randn(9, 3000, generator=g)).to(BF16).to(device)
    values = torch.randn(21, 2500, generator=g).to(device)

    with bim.batch_invariant_mode(device):
        assert bim.is_active()
        mm, linear, linear3d = x @ w.T, F.linear(x, w, b), F.linear(x.view(1, 37, 96), w, b)
        mm_rows, linear_rows = x[:5] @ w.T, F.linear(x[3:4], w, b)
        logp, logp_rows = torch.log_softmax(logits, -1), torch.log_softmax(logits[2:3].float(), -1)
        mean, mean_rows = values.mean(-1), values[4:6].mean(dim=-1, keepdim=True)
        with pytest.raises(NotImplementedError, match="batch_invariant_mode: aten::mm"):
            _ = x.float() @ w.float().T  # fp32 matmul: not defined, refused (never cuBLAS's bits)
        with pytest.raises(NotImplementedError, match="batch_invariant_mode: aten::mean"):
            values.mean(0)
        with pytest.raises(RuntimeError, match="does not nest"), bim.batch_invariant_mode(device):
            pass
    assert not bim.is_active()

    assert_bitwise(mm, batch_invariant_mm(x, w), "x @ w.T")
    assert_bitwise(linear, batch_invariant_mm(x, w, b), "F.linear")
    assert_bitwise(linear3d[0], linear, "F.linear on a 3-D input")
    assert_bitwise(mm_rows, mm[:5], "rows 0..4 alone")
    assert_bitwise(linear_rows, linear[3:4], "row 3 alone")
    assert_bitwise(logp, logprobs_matrix(logits, 1.0).to(BF16), "log_softmax (bf16)")
    assert_bitwise(logp_rows, logprobs_matrix(logits[2:3].float(), 1.0), "log_softmax row 2 alone (fp32)")
    assert_bitwise(mean_rows[:, 0], mean[4:6], "mean rows 4..5 alone")
    err = (mean.double() - values.double().mean(-1)).abs().max().item()
    assert err < 1e-6, f"mean off by {err:.3e}"
    # Negative control: after the mode, PyTorch's kernels are back (fp32 matmul runs again, and its
    # log_softmax is not the contract's bit for bit).
    _ = x.float() @ w.float().T
    assert not torch.equal(torch.log_softmax(logits.float(), -1), logprobs_matrix(logits.float(), 1.0))


def test_mode_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "batch-invariant mode checks passed" in proc.stdout, proc.stdout[-4000:]


def test_cpu_mode_needs_the_interpreter():
    from parity.ops.batch_invariant_mode import batch_invariant_mode

    with pytest.raises(ValueError, match="TRITON_INTERPRET"), batch_invariant_mode("cpu"):
        pass
    with pytest.raises(ValueError, match="device"), batch_invariant_mode("tpu"):
        pass


@pytest.mark.gpu
def test_mode_on_the_gpu():
    check_mode("cuda")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through the pytest test above"
    check_mode("cpu")
    print("batch-invariant mode checks passed")
