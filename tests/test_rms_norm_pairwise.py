"""The GPU contract's RMSNorm (``parity.ops.rms_norm_pairwise``): the plain-PyTorch reference on the CPU,
the Triton kernel under the Triton interpreter (a child Python, this file's ``__main__``) and on CUDA
(GPU-marked), against the reference bit for bit.

Negative control: PyTorch's ``mean`` (``parity.contract.rms_norm``, the CPU contract, and what the
server's norm computed before the ``rmsnorm_cuda`` patch took the pairwise kernel) gives other bits on
the same rows, so the kernel == reference checks cannot pass with any RMSNorm in HF's order.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from parity import contract
from parity.ops.rms_norm_pairwise import add_rms_norm_pairwise, pairwise_sum_of_squares, rms_norm_pairwise
from tests.helpers import assert_same_bits, count_differing, run_under_triton_interpreter

BF16 = torch.bfloat16
EPS = 1e-6
# Leading shapes and hidden sizes: one row, a head_dim (the q/k norms), odd and non-power-of-two H.
SHAPES = ((1, 64), (5, 128), (3, 96), (7, 1024), (2, 5120), (4, 3, 128), (0, 256))


def inputs(shape, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed * 1009 + sum(shape) * 7 + len(shape))
    scale = torch.exp2(torch.randint(-4, 5, shape[:-1] + (1,), generator=g, device=device).float())
    x = (torch.randn(shape, generator=g, device=device) * scale).to(BF16)
    residual = (torch.randn(shape, generator=g, device=device) * 2).to(BF16)
    weight = (1 + 0.3 * torch.randn(shape[-1], generator=g, device=device)).to(BF16)
    return x, residual, weight


def control_rows(device="cpu"):
    """2000 rows of hidden 8192: PyTorch's mean and the pairwise tree give other fp32 variances in most
    rows, hence (near a bf16 rounding boundary) other bf16 outputs in some elements."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(2000, 8192, generator=g, device=device).to(BF16)
    w = (1 + 0.3 * torch.randn(8192, generator=g, device=device)).to(BF16)
    return x, w


def test_pairwise_sum_is_the_stated_tree():
    h = torch.tensor([[1.0, 2.0**-24, 2.0**-24, 3.0, 5.0]])
    # squares [1, 2^-48, 2^-48, 9, 25, 0, 0, 0] -> [1 + 2^-48, 2^-48 + 9, 25, 0] -> [1 + (9 + 2^-48), 25]
    want = torch.tensor([[((1.0 + 2.0**-48) + (2.0**-48 + 9.0)) + (25.0 + 0.0)]])
    assert torch.equal(pairwise_sum_of_squares(h), want)


def test_residual_form_is_the_bf16_add_then_the_norm():
    x, residual, weight = inputs((6, 384))
    normed, summed = add_rms_norm_pairwise(x, residual, weight, EPS)
    assert torch.equal(summed, residual + x)
    assert torch.equal(normed, rms_norm_pairwise(residual + x, weight, EPS))


def test_negative_control_torch_mean_gives_other_bits():
    x, w = control_rows()
    differ = count_differing(contract.rms_norm(x, w, EPS), rms_norm_pairwise(x, w, EPS))
    print(f"contract.rms_norm (PyTorch's mean) vs the pairwise tree: {differ} of {x.numel()} elements differ")
    assert differ > 0


def test_gradient_matches_a_float64_rmsnorm():
    """The trainer differentiates the reference (also the kernel's backward): gradients of HF's RMSNorm
    within bf16 rounding of a float64 computation."""
    x, _, weight = inputs((9, 200), seed=3)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    xb, wb = x.clone().requires_grad_(), weight.clone().requires_grad_()
    upstream = torch.randn(9, 200, generator=torch.Generator().manual_seed(5))
    (rms_norm_pairwise(xb, wb, EPS).float() * upstream).sum().backward()
    h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    ((w64 * h) * upstream.double()).sum().backward()
    for name, got, want in (("x", xb.grad, x64.grad), ("weight", wb.grad, w64.grad)):
        err = float((got.double() - want).norm() / want.norm())
        print(f"{name}: relative gradient error {err:.2e}")
        assert err < 0.02, (name, err)


def test_kernel_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=600)
    assert "interpreter checks passed" in proc.stdout, proc.stdout[-4000:]


@pytest.mark.gpu
def test_kernel_equals_reference_on_cuda():
    from parity.ops.rms_norm_pairwise import rms_norm, rms_norm_pairwise_kernel

    for shape in SHAPES + ((8192, 4096), (3, 8192)):
        x, residual, weight = inputs(shape, device="cuda")
        want = rms_norm_pairwise(x, weight, EPS)
        assert_same_bits(rms_norm_pairwise_kernel(x, weight, EPS)[0], want, f"{shape}")
        normed, summed = rms_norm_pairwise_kernel(x, weight, EPS, residual)
        want_n, want_s = add_rms_norm_pairwise(x, residual, weight, EPS)
        assert_same_bits(summed, want_s, f"{shape} summed")
        assert_same_bits(normed, want_n, f"{shape} normed")
    # rows do not depend on how many rows are normalised together
    x, _, weight = inputs((8192, 1024), seed=1, device="cuda")
    full = rms_norm_pairwise_kernel(x, weight, EPS)[0]
    for m in (1, 2, 3, 64, 129, 1000):
        assert_same_bits(rms_norm_pairwise_kernel(x[:m], weight, EPS)[0], full[:m], f"rows at M={m}")
    # the autograd form: the kernel's forward, the reference's gradients
    xk, wk = x[:37].clone().requires_grad_(), weight.clone().requires_grad_()
    xr, wr = x[:37].clone().requires_grad_(), weight.clone().requires_grad_()
    out = rms_norm(xk, wk, EPS)
    assert_same_bits(out, rms_norm_pairwise(xr, wr, EPS), "autograd forward")
    upstream = torch.randn_like(out)
    out.backward(upstream)
    rms_norm_pairwise(xr, wr, EPS).backward(upstream)
    assert_same_bits(xk.grad, xr.grad, "dx")
    assert_same_bits(wk.grad, wr.grad, "dweight")
    # negative control on the device: PyTorch's CUDA mean gives other bits on these rows
    cx, cw = control_rows("cuda")
    differ = count_differing(contract.rms_norm(cx, cw, EPS), rms_norm_pairwise_kernel(cx, cw, EPS)[0])
    print(f"CUDA: contract.rms_norm vs the pairwise kernel: {differ} of {cx.numel()} elements differ")
    assert differ > 0


# ---------------------------------------------------------------------------------------------------
# Child process (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------


def _child() -> None:
    from parity.ops import rms_norm_pairwise as op
    from parity.ops.rms_norm_pairwise import _PairwiseRMSNorm, rms_norm_pairwise_kernel
    from tests.helpers import nan_empty

    assert os.environ.get("TRITON_INTERPRET") == "1"
    op._empty = nan_empty  # every output element must be written
    for shape in SHAPES:
        x, residual, weight = inputs(shape)
        normed, summed = rms_norm_pairwise_kernel(x, weight, EPS)
        normed_r, summed_r = rms_norm_pairwise_kernel(x, weight, EPS, residual)
        assert summed is None
        assert_same_bits(normed, rms_norm_pairwise(x, weight, EPS), f"{shape}")
        want_n, want_s = add_rms_norm_pairwise(x, residual, weight, EPS)
        assert_same_bits(summed_r, want_s, f"{shape} summed")
        assert_same_bits(normed_r, want_n, f"{shape} normed")
        print(f"ok {shape}")
    # A strided input (SGLang's q/k views) is normalised as its contiguous copy.
    x, _, weight = inputs((5, 256), seed=2)
    assert_same_bits(rms_norm_pairwise_kernel(x[:, :128], weight[:128], EPS)[0],
                     rms_norm_pairwise(x[:, :128].contiguous(), weight[:128], EPS), "strided")  # fmt: skip
    # The autograd form: the kernel's forward, the reference's gradients, bit for bit.
    x, _, weight = inputs((4, 160), seed=4)
    xk, wk = x.clone().requires_grad_(), weight.clone().requires_grad_()
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = _PairwiseRMSNorm.apply(xk, wk, EPS)
    upstream = torch.randn(4, 160, generator=torch.Generator().manual_seed(9)).to(BF16)
    out.backward(upstream)
    ref = rms_norm_pairwise(xr, wr, EPS)
    ref.backward(upstream)
    assert_same_bits(out, ref, "autograd forward")
    assert_same_bits(xk.grad, xr.grad, "dx")
    assert_same_bits(wk.grad, wr.grad, "dweight")
    # Bad input: a clear error, nothing computed.
    for bad, what in (((x.float(), weight), "dtype"), ((x, weight[:-1]), "shape")):
        try:
            rms_norm_pairwise_kernel(*bad, EPS)
        except (TypeError, ValueError) as exc:
            print(f"refused {what}: {exc}")
        else:
            raise AssertionError(f"{what} accepted")
    print("interpreter checks passed")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _child()
