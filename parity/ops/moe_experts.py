"""The MoE contract's experts on a GPU: every token's output bitwise independent of the batch.

The problem
-----------
``parity.moe.experts`` (the CPU contract) runs each expert's gated MLP with ``F.linear`` on the rows
routed to it. On a GPU ``F.linear`` is cuBLAS, which picks its kernel (tiles, split-K) from the
number of rows: an expert that gets 3 rows in one decode step and 300 in a prefill sums a token's
products in different orders, so a token's output depends on which other tokens share its experts.
SGLang's fused Triton MoE (``fused_experts``) picks its tile configuration from the batch size too,
and combines in bf16 inside its down-projection kernel.

Semantics (the contract of this op)
-----------------------------------
Exactly ``parity.moe.experts`` with ``F.linear`` replaced by ``parity.ops.batch_invariant_matmul``
(one fixed tile configuration, no split-K, fp32 accumulation in increasing K blocks; a row's bits
depend only on the row and the weight):

1. the (token, slot) pairs sorted by expert, stable (token order within an expert);
2. per expert, on its rows: ``gate_up = bi_linear(x, w13[e])`` (bf16), ``gate, up = chunk(2)``,
   ``act = silu(gate) * up`` (PyTorch's bf16 elementwise ops, as ``parity.moe.expert_mlp``),
   ``y = bi_linear(act, w2[e])`` (bf16);
3. ``parity.moe.combine``: fp32, slot 0 first, one rounding to bf16.

Two implementations of step 2, the same bits (``tests/test_moe_gpu.py`` checks it on the device; the
interpreter check in ``tests/test_moe_contract.py``):

- ``"grouped"`` (default): one launch per projection over all experts. The sorted rows are cut into
  ``BLOCK_M``-row tiles that never straddle two experts (an expert's last tile is partly masked);
  each program finds its tile's expert by a binary search over the cumulative tile counts, gathers
  its rows by token index (no gathered copy of the activations), and runs **the batch-invariant
  kernel's own K loop** with its canonical ``CONFIG`` (tiles, warps, ``tl.dot`` sequence), so an
  output element has the bits ``batch_invariant_mm`` gives it, whichever family member that call
  dispatches to by M (the family test, ``tests/test_batch_invariant_matmul_gpu.py``). No host
  synchronisation.
- ``"loop"``: ``batch_invariant_mm`` once per non-empty expert (a host sync for the counts, 2 launches
  per active expert). The reference of the grouped kernel; also what the CPU runs (there
  ``batch_invariant_linear`` is ``F.linear``, so on the CPU this op computes ``parity.moe.experts``
  bit for bit).

Why the result is batch-invariant: a row's projections depend only on the row and the expert's
weight (the kernel's M-invariance; which tile a row lands in and where in it changes nothing), the
elementwise ops are per element, the gather / scatter are exact, and the combine is per token.

Backward (``torch.autograd``): the gathers, ``silu * up`` and the combine are PyTorch ops; the two
projections are an ``autograd.Function`` whose backward is ``F.linear``'s (``grad @ W`` and
``grad^T @ x`` per expert, cuBLAS on the GPU); the gradient of a token's input sums its k slots in
fp32 (deterministic: no atomics). Gradients are checked against a float64 reference with a bound,
not bitwise: they are not part of the contract.

Trade-offs: the grouped kernel launches ``cdiv(T k, BLOCK_M) + min(E, T k)`` M tiles (an upper bound on
what the routing needs, known without a host synchronisation; the spare programs exit after the
search), and a decode step wastes most of each tile's 64 rows (at one token the layer is bound by
reading 8 experts' weights anyway). The combine and ``silu * up`` are separate PyTorch kernels (about
30 launches per layer at top-8): the price of computing them exactly as ``parity.moe`` does; a fused
combine would need explicitly rounded (``.rn``) multiplies and adds so that the compiler cannot
contract them into FMAs. ``benchmarks/bench_moe.py`` measures both implementations against the plain
cuBLAS loop, HF's experts and SGLang's ``fused_experts``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from parity import moe
from parity.ops import batch_invariant_matmul as bim

IMPLS = ("grouped", "loop")
DEFAULT_IMPL = "grouped"

_empty = torch.empty  # tests poison outputs through this


def _on_kernel_path(t: torch.Tensor) -> bool:
    """The Triton kernels run on CUDA tensors (and under the interpreter); elsewhere ``F.linear``."""
    return t.is_cuda or bim._interpreting()


@triton.jit(do_not_specialize=["num_tiles"])
def _grouped_mm_kernel(
    X, SRC, W, Y, OFFSETS, TILE_CUM,
    num_tiles,
    N: tl.constexpr, K: tl.constexpr, E: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    sxm, sxk, swe, swn, swk, sym, syn,
    HAS_SRC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    OUT_BF16_INTERP: tl.constexpr,
):  # fmt: skip
    """``Y[r] = X[SRC[r]] @ W[e(r)]^T`` for the expert-sorted rows r; the K loop and the store are
    ``batch_invariant_matmul._bi_matmul_kernel``'s, line for line."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order over (M tile, N tile), as the batch-invariant kernel (scheduling only)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_tiles - first_m, GROUP_M)
    tile = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    # this tile's expert: the first e with TILE_CUM[e] > tile (E when the tile is spare)
    lo = tile * 0
    hi = lo + E
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        above = tl.load(TILE_CUM + tl.minimum(mid, E - 1)) > tile
        open_ = lo < hi
        hi = tl.where(open_ & above, mid, hi)
        lo = tl.where(open_ & (~above), mid + 1, lo)
    expert = lo
    if expert >= E:
        return
    tiles_before = tl.load(TILE_CUM + expert - 1, mask=expert > 0, other=0)
    row_end = tl.load(OFFSETS + expert + 1)
    rm = tl.load(OFFSETS + expert) + (tile - tiles_before) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < row_end
    mask_n = rn < N
    if HAS_SRC:
        rows = tl.load(SRC + rm, mask=mask_m, other=0)
    else:
        rows = rm
    x_ptrs = X + rows.to(tl.int64)[:, None] * sxm + rk[None, :] * sxk
    w_ptrs = W + expert.to(tl.int64) * swe + rn.to(tl.int64)[None, :] * swn + rk[:, None] * swk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # increasing K order, as the batch-invariant kernel
        kmask = (k0 + rk) < K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
        if OUT_BF16_INTERP:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    y_ptrs = Y + rm.to(tl.int64)[:, None] * sym + rn[None, :] * syn
    mask = mask_m[:, None] & mask_n[None, :]
    if OUT_BF16_INTERP:
        bits = acc.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(acc != acc, 0x7FC0, r)
        tl.store(y_ptrs, r.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)


class ExpertLayout(NamedTuple):
    """Where every (token, slot) pair goes: rows sorted by expert (stable), and the tile map."""

    src: torch.Tensor  # [R] token of each sorted row (R = tokens * k)
    inverse: torch.Tensor  # [T, k] sorted row of each (token, slot)
    offsets: torch.Tensor  # [E + 1] int32: first sorted row of each expert, then R
    tile_cum: torch.Tensor  # [E] int32: M tiles of experts 0..e (each expert's rows in whole tiles)
    num_tiles: int  # launched M tiles: an upper bound on tile_cum[-1]


def expert_layout(ids: torch.Tensor, num_experts: int) -> ExpertLayout:
    """The sort of :func:`parity.moe.experts` (stable by expert id) plus the grouped kernel's tile map."""
    block_m = bim.CONFIG.block_m
    tokens, k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    # a scatter-add rather than bincount: no host synchronisation (an id out of range fails loudly)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    tile_cum = torch.cumsum((counts + block_m - 1) // block_m, 0).to(torch.int32)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=ids.device)
    rows = tokens * k
    return ExpertLayout(
        src=order // k,
        inverse=inverse.view(tokens, k),
        offsets=offsets,
        tile_cum=tile_cum,
        num_tiles=triton.cdiv(rows, block_m) + min(num_experts, rows),
    )


def grouped_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    layout: ExpertLayout,
    gather: bool,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[r] = x[src[r] if gather else r] @ weight[e(r)]^T`` for every sorted row r, one launch
    with the batch-invariant kernel's ``CONFIG`` (the layout's tiles are ``CONFIG.block_m`` rows).
    ``x``: [T, K] (gather) or [R, K]; ``weight``: [E, N, K]; returns [R, N] in x's dtype."""
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise NotImplementedError(f"grouped expert matmul: x {x.dtype}, weight {weight.dtype} (bf16/fp16)")
    if x.dtype == torch.float16 and bim._interpreting():
        raise NotImplementedError("fp16 outputs need the GPU's cvt.rn (the interpreter rounds bf16 only)")
    num_experts, n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x [{x.shape[0]}, {x.shape[1]}] against expert weights {tuple(weight.shape)}")
    rows = layout.src.numel()
    if out is None:
        out = _empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    c = bim.CONFIG
    grid = (layout.num_tiles * triton.cdiv(n, c.block_n),)
    _grouped_mm_kernel[grid](
        x, layout.src, weight, out, layout.offsets, layout.tile_cum,
        layout.num_tiles,
        n, k, num_experts, num_experts.bit_length(),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        out.stride(0), out.stride(1),
        HAS_SRC=gather,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        OUT_BF16_INTERP=bim._interpreting() and x.dtype == torch.bfloat16,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip
    return out


def loop_mm(x: torch.Tensor, weight: torch.Tensor, layout: ExpertLayout, gather: bool) -> torch.Tensor:
    """The same product as :func:`grouped_mm`, one ``batch_invariant_linear`` per non-empty expert
    (``F.linear`` on the CPU). Synchronises with the host for the expert counts."""
    rows = x[layout.src] if gather else x
    bounds = layout.offsets.tolist()
    out = rows.new_empty((rows.shape[0], weight.shape[1]))
    for e in range(weight.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            out[a:b] = bim.batch_invariant_linear(rows[a:b], weight[e])
    return out


class _ExpertLinear(torch.autograd.Function):
    """The per-expert projection: forward by the chosen implementation, backward as ``F.linear``'s."""

    @staticmethod
    def forward(ctx, x, weight, src, inverse, offsets, tile_cum, num_tiles, gather, impl):
        layout = ExpertLayout(src, inverse, offsets, tile_cum, num_tiles)
        ctx.save_for_backward(x, weight, src, inverse, offsets)
        ctx.gather = gather
        if impl == "grouped":
            return grouped_mm(x, weight, layout, gather)
        return loop_mm(x, weight, layout, gather)

    @staticmethod
    def backward(ctx, grad):
        x, weight, src, inverse, offsets = ctx.saved_tensors
        rows = x[src] if ctx.gather else x
        bounds = offsets.tolist()
        grad_rows = torch.zeros_like(rows) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for e in range(weight.shape[0]):
            a, b = bounds[e], bounds[e + 1]
            if b == a:
                continue
            g = grad[a:b]
            if grad_rows is not None:
                grad_rows[a:b] = g @ weight[e]
            if grad_w is not None:
                grad_w[e] = g.t() @ rows[a:b]
        grad_x = grad_rows
        if grad_rows is not None and ctx.gather:
            # each token's k slot gradients summed in fp32 by one reduction (deterministic: no atomics)
            grad_x = grad_rows.to(moe.accumulation_dtype(x.dtype))[inverse].sum(1).to(x.dtype)
        return grad_x, grad_w, None, None, None, None, None, None, None


def _expert_linear(x, weight, layout: ExpertLayout, gather: bool, impl: str) -> torch.Tensor:
    return _ExpertLinear.apply(
        x, weight, layout.src, layout.inverse, layout.offsets, layout.tile_cum, layout.num_tiles, gather, impl
    )


def moe_experts(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """The routed experts of every token, combined: [T, H] in ``hidden.dtype``; the GPU form of
    :func:`parity.moe.experts` (same arguments: ``weights``/``ids`` [T, k] from ``parity.moe.route``,
    ``w13`` [E, 2I, H] gate rows first, ``w2`` [E, H, I]). Differentiable.

    ``impl``: ``"grouped"`` (one Triton launch per projection, the default) or ``"loop"`` (the
    batch-invariant kernel per expert): the same bits. Off the kernel path (CPU tensors, no
    interpreter) the projections are ``F.linear`` per expert: ``parity.moe.experts``' bits."""
    impl = DEFAULT_IMPL if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not _on_kernel_path(hidden):
        impl = "loop"
    tokens, hidden_size = hidden.shape
    layout = expert_layout(ids, w13.shape[0])
    gate, up = _expert_linear(hidden, w13, layout, True, impl).chunk(2, dim=-1)
    act = F.silu(gate) * up  # parity.moe.expert_mlp's elementwise ops, in the model dtype
    by_expert = _expert_linear(act, w2, layout, False, impl)
    per_slot = by_expert[layout.inverse]  # [T, k, H]: back to (token, slot) order, exact
    return moe.combine(weights, per_slot)


def router_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The router matmul on the kernel path: ``batch_invariant_linear`` (what SGLang's ``gate`` runs
    under the ``linear_batch_invariant`` patch) with ``F.linear``'s backward; ``F.linear`` elsewhere."""
    return bim.batch_invariant_linear(x, weight)


def sparse_moe_block(
    hidden: torch.Tensor,
    router_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    renormalize: bool,
    *,
    impl: str | None = None,
) -> torch.Tensor:
    """Router matmul, ``parity.moe.route``, :func:`moe_experts`: the whole block as the GPU server
    computes it (``gate`` -> patched top-k -> patched experts)."""
    weights, ids = moe.route(router_linear(hidden, router_weight), top_k, renormalize)
    return moe_experts(hidden, weights, ids, w13, w2, impl=impl)
