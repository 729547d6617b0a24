"""Batch-invariant aten overrides: a reversible mode in which PyTorch's matmuls, ``log_softmax`` and
``mean`` over the last dimension compute every row independently of the batch.

The problem
-----------
The GPU patches route the model's known layers explicitly (``batch_invariant_linear`` for the linear
layers and the lm_head, the contract's logprob in the sampler). Code they do not name -- a custom
head, a value model, a user's loss, a library's helper -- still reaches cuBLAS and PyTorch's CUDA
reductions, whose kernel and reduction order follow the shape of the batch: a token's numbers then
depend on what it was batched with. ``batch_invariant_mode()`` swaps the aten kernels themselves
(``torch.library``) while it is on, so such code gets batch-invariant rows without being edited.

Semantics (while the mode is on, for tensors on its dispatch key)
-----------------------------------------------------------------
- ``aten::mm(a, b)`` = ``batch_invariant_mm(a, b.T)`` (bf16/fp16; ``b.T`` is a strided view, no copy);
  ``aten::addmm(bias, a, b)`` the same with the bias added in fp32 before the one rounding (the
  ``nn.Linear`` form: 1-D bias, ``beta = alpha = 1``). ``F.linear`` and ``@`` reach these.
- ``aten::_log_softmax(x, -1)`` = the logprob contract's matrix (``parity.ops.policy_loss``: fixed
  2048-lane online reduction, fp32), cast to ``x``'s dtype unless ``half_to_float``.
- ``aten::mean.dim(x, [-1])`` = a fixed-order fp32 row sum (:func:`row_mean`: blocks of ``BLOCK``
  in increasing order, each summed by one ``tl.sum`` of a fixed shape), divided by the row length,
  rounded once to the result dtype.

Anything else these ops are asked (fp32 matmuls, ``beta != 1``, other dimensions, batched 3-D
``bmm``) raises ``NotImplementedError`` naming the mode: computing it with PyTorch's own kernel would
silently give batch-dependent bits, which is what the mode exists to exclude. Ops not listed are
untouched.

Reversibility: the overrides live in one ``torch.library.Library("aten", "IMPL")`` created when the
mode is entered and destroyed when it is left (in ``finally``), which restores PyTorch's kernels. The
mode does not nest (entering it twice raises).

Trade-off: the batch-invariant GEMM (tile configurations from one bitwise-equal family, chosen by M
and the weight's shape: see ``batch_invariant_matmul``) and a one-program-per-row mean are slower than
cuBLAS and PyTorch's reductions at some shapes; the mode is meant for the few ops the explicit
patches do not cover, not as a blanket speed-neutral switch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from parity.ops.batch_invariant_matmul import _interpreting, batch_invariant_mm
from parity.ops.policy_loss import logprobs_matrix_reference

BLOCK = 1024  # the mean's block of columns (part of its definition: changes the bits)
_SUPPORTED_MM = (torch.bfloat16, torch.float16)
_active: list[torch.library.Library] = []


class BatchInvariantModeError(NotImplementedError):
    """An op reached the batch-invariant mode with arguments it does not define."""

    def __init__(self, op: str, what: str) -> None:
        super().__init__(f"batch_invariant_mode: aten::{op} {what} is not defined batch-invariantly")


# ---- the overrides ---------------------------------------------------------------------------------
def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() != 2 or b.dim() != 2 or a.dtype not in _SUPPORTED_MM or b.dtype != a.dtype:
        raise BatchInvariantModeError("mm", f"of {a.dtype}{list(a.shape)} x {b.dtype}{list(b.shape)}")
    return batch_invariant_mm(a, b.t())


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    if beta != 1 or alpha != 1:
        raise BatchInvariantModeError("addmm", f"with beta={beta}, alpha={alpha}")
    if bias.dim() != 1 or bias.dtype != a.dtype:
        raise BatchInvariantModeError("addmm", f"with a {bias.dtype}{list(bias.shape)} bias")
    if a.dim() != 2 or b.dim() != 2 or a.dtype not in _SUPPORTED_MM or b.dtype != a.dtype:
        raise BatchInvariantModeError("addmm", f"of {a.dtype}{list(a.shape)} x {b.dtype}{list(b.shape)}")
    return batch_invariant_mm(a, b.t(), bias)


def _log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    if dim not in (-1, x.dim() - 1):
        raise BatchInvariantModeError("_log_softmax", f"over dim {dim} of a {x.dim()}-D tensor")
    out = logprobs_matrix_reference(x, 1.0)  # fp32, the logprob contract
    return out if half_to_float or x.dtype == torch.float32 else out.to(x.dtype)


def _mean_dim(x: torch.Tensor, dim, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    dims = [dim] if isinstance(dim, int) else list(dim or [])
    if [d % max(x.dim(), 1) for d in dims] != [x.dim() - 1]:
        raise BatchInvariantModeError("mean", f"over dims {dims} of a {x.dim()}-D tensor (last dim only)")
    if not x.is_floating_point():
        raise BatchInvariantModeError("mean", f"of a {x.dtype} tensor")
    out = row_mean(x).to(dtype or x.dtype)
    return out.unsqueeze(-1) if keepdim else out


_OVERRIDES = {
    "mm": _mm,
    "addmm": _addmm,
    "_log_softmax": _log_softmax,
    "mean.dim": _mean_dim,
}


@contextlib.contextmanager
def batch_invariant_mode(device: str = "cuda") -> Iterator[None]:
    """Route ``aten::mm``/``addmm``/``_log_softmax``/``mean.dim`` on ``device`` ("cuda"; "cpu" under the
    Triton interpreter, for tests) through the batch-invariant implementations; restore PyTorch's
    kernels on exit."""
    key = {"cuda": "CUDA", "cpu": "CPU"}.get(device)
    if key is None:
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if key == "CPU" and not _interpreting():
        raise ValueError("the batch-invariant mode on the CPU needs TRITON_INTERPRET=1 (tests only)")
    if _active:
        raise RuntimeError("batch_invariant_mode is already on (it does not nest)")
    lib = torch.library.Library("aten", "IMPL")
    _active.append(lib)
    try:
        for op, fn in _OVERRIDES.items():
            lib.impl(op, fn, key)
        yield
    finally:
        _active.remove(lib)
        lib._destroy()  # unregisters every kernel registered above: PyTorch's own are back


def is_active() -> bool:
    return bool(_active)


# ---- the mean's row sum ----------------------------------------------------------------------------
@triton.jit(do_not_specialize=["R"])
def _row_sum_kernel(X, Y, R, C: tl.constexpr, stride_r, BLOCK_C: tl.constexpr):
    """One program per row: fp32 sum of the row in blocks of BLOCK_C, in increasing order."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        mask = (c0 + cols) < C
        acc += tl.load(X + row * stride_r + c0 + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row, tl.sum(acc, axis=0))


def row_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the last dimension, fp32: per row, lane ``i`` of a ``BLOCK``-lane fp32 accumulator
    adds columns ``i, i + BLOCK, ...`` in increasing order, then one ``tl.sum`` of the lanes (a fixed
    tree for a fixed ``BLOCK``), then one division by the row length. A row's bits depend on the row
    only."""
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        _row_sum_kernel[(rows.shape[0],)](rows, out, rows.shape[0], c, rows.stride(0), BLOCK_C=BLOCK)
    return (out / c).view(x.shape[:-1])
