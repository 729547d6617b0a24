"""The contract's logprob (``parity.ops.policy_loss``) for a few rows, each row spread over many programs.

The problem
-----------
The server reports each sampled token's logprob under the numerics contract (``policy_loss``'s module
docstring: a row's ``TILE = 2048`` lanes accumulate ``exp_c`` tile after tile under the running max,
then a fixed pairwise tree). The forward kernel gives each row to one program, which is right for a
trainer's thousands of rows and wrong for a decode step's 1-64: one program walks the row's 75 tiles
(V = 151936) alone, finding each tile's max across all its warps before it can add the tile -- 80 us
per decode step on an H200 whatever the batch, where the logits' bytes take under 1 us to read.

The op
------
The same steps, split where the contract allows it. A lane's sum depends only on its own elements and
the sequence of running maxima, and the running max after tile ``t`` is the max of the tile maxima so
far. So:

1. ``_tile_max_kernel``, one program per (row, tile): the tile's exact max of ``x / T`` (the contract's
   ``_tile_max`` on the contract's scaled values, the last tile padded with ``-inf``);
2. ``_lane_sums_kernel``, one program per (row, ``LANES`` lanes): walks the tiles in order, each
   tile's lanes advanced by the contract's own ``_step_lanes`` given that tile's max -- the same
   operations in the same order on every lane as the one-program kernel, hence the same lane sums;
3. ``_finish_kernel``, one program per row: the contract's lane tree, fp64 ``log S`` and logprob of
   the action's logit.

Every output bit is the contract's (the tests compare with :func:`policy_loss.logprobs_reference`
and with the one-program kernel). Trade-off: the logits are read twice (the tile maxima, then the
lanes) and ``4 * TILE`` bytes of lane sums per row go through memory, against one read; at decode's
row counts the time is latency, not bytes. The launcher takes per-row temperatures (SGLang's
``[B, 1]``, never read by the host) and serves rows up to :data:`MAX_ROWS`; ``fused_logprobs`` sends
larger batches to the one-program kernel.

The host's share
----------------
The server calls this once per decode step outside its CUDA graphs, and at one request a decode step
waits on the host (an H200 runs the step's kernels in less time than SGLang's scheduler and the
sampler take to launch them). So the launcher does on the host only what it must: three allocations
and three launches. Each row's ``RN32(1 / T)`` is an IEEE division inside the kernels (``div_rn``: the
value ``policy_loss._row_inverses`` computes with a torch division on the device), and an id outside
``[0, V)`` -- a sampler bug -- gives a NaN logprob inside the finish kernel (its logit never read),
where the host used to queue seven torch operations per call (two for 1 / T, five to clamp the ids
and mask the result): 255 -> 197 us of host time per call at one row on an H200's host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.ops.policy_loss import (
    CONTRACT_FMA,
    CONTRACT_TILE,
    _check_tile,
    _fma_mode,
    _interpreting,
    _log_f64,
    _logp_of,
    _scale,
    _step_lanes,
    _tile_max,
    _tree_sum,
)

LANES = 128  # lanes per program of the lane-sum kernel (a launch choice: any divisor of TILE, same bits)
NUM_STAGES = 4  # the lane-sum kernel's pipelined tile loads
MAX_ROWS = 256  # fused_logprobs takes this path up to this many rows: faster on the H200 up to 256 rows
# of 32k/152k columns (device time 1.25x/1.31x), slower from 512 (bench_split_lane_logprobs.py)


@triton.jit
def _row_inverse(t_row):
    """RN32(1 / T): IEEE division, the bits of ``policy_loss._row_inverses`` (torch's fp32 division)."""
    return tl.math.div_rn(tl.full([], 1.0, tl.float32), t_row)


@triton.jit
def _row_scaled(ptr, mask, t_row, inv_row, FMA: tl.constexpr):
    """Logits at ``ptr`` (``-inf`` where not ``mask``) as fp32 (exact) over the row's T: the contract's
    step 1, skipped where T == 1 (a division would turn -0.0 into +0.0), as the one-program kernel."""
    x = tl.load(ptr, mask=mask, other=float("-inf")).to(tl.float32)
    if t_row != 1.0:
        x = _scale(x, t_row, inv_row, True, FMA)
    return x


@triton.jit
def _tile_max_kernel(X, sx, TEMPS, TMAX, V: tl.constexpr, TILE: tl.constexpr, FMA: tl.constexpr,
                     INTERP: tl.constexpr):  # fmt: skip
    N_TILES: tl.constexpr = (V + TILE - 1) // TILE
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    cols = t * TILE + tl.arange(0, TILE)
    t_row = tl.load(TEMPS + row)
    x = _row_scaled(X + row * sx + cols, cols < V, t_row, _row_inverse(t_row), FMA)
    tl.store(TMAX + row * N_TILES + t, _tile_max(x, INTERP))


@triton.jit
def _lane_sums_kernel(X, sx, TEMPS, TMAX, S, M, V: tl.constexpr, TILE: tl.constexpr,
                      LANES: tl.constexpr, FMA: tl.constexpr, NUM_STAGES: tl.constexpr):  # fmt: skip
    N_TILES: tl.constexpr = (V + TILE - 1) // TILE
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * LANES
    lanes = first + tl.arange(0, LANES)
    t_row = tl.load(TEMPS + row)
    inv_row = _row_inverse(t_row)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([LANES], tl.float32)
    w = tl.zeros([LANES], tl.float32)  # (entropy lanes: not asked for, never updated)
    for t in tl.range(0, N_TILES, num_stages=NUM_STAGES):
        cols = t * TILE + lanes
        x = _row_scaled(X + row * sx + cols, cols < V, t_row, inv_row, FMA)
        tmax = tl.load(TMAX + row * N_TILES + t)
        m, s, _s2, w, _w2 = _step_lanes(x, x, tmax, tmax, m, s, s, w, w, False, False, FMA, False)
    tl.store(S + row * TILE + lanes, s)
    if first == 0:
        tl.store(M + row, m)


@triton.jit
def _finish_kernel(X, sx, TEMPS, IDS, S, M, LOGP, V: tl.constexpr, TILE: tl.constexpr,
                   LOG2_TILE: tl.constexpr, FMA: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    t_row = tl.load(TEMPS + row)
    action = tl.load(IDS + row)
    valid = (action >= 0) & (action < V)  # outside [0, V): a NaN logprob, the logit never read
    xt = tl.load(X + row * sx + tl.where(valid, action, 0)).to(tl.float32)  # the action's logit (step 1)
    if t_row != 1.0:
        xt = _scale(xt, t_row, _row_inverse(t_row), True, FMA)
    s_tot = _tree_sum(tl.load(S + row * TILE + tl.arange(0, TILE)), TILE, LOG2_TILE)
    logp, _ok = _logp_of(xt, tl.load(M + row), _log_f64(s_tot))
    tl.store(LOGP + row, tl.where(valid, logp, float("nan")))


_empty = torch.empty  # tests poison outputs through this


def split_lane_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """The contract's fp32 logprob of ``ids[r]`` under ``logits[r] / temperatures[r]``: ``[N]``.

    ``logits``: ``[N, V]`` bf16/fp16/fp32 with unit stride along V; ``ids``: int64 ``[N]`` (one outside
    ``[0, V)`` gives NaN, never a clamped value; the host never checks them); ``temperatures``: fp32
    ``[N]`` (T == 1: no division).
    CUDA, or the CPU under the Triton interpreter."""
    if logits.dim() != 2 or logits.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"split_lane_logprobs: [N, V] bf16/fp16/fp32 logits, got {logits.dtype} "
                        f"{tuple(logits.shape)}")  # fmt: skip
    n, vocab = logits.shape
    if ids.shape != (n,) or ids.dtype != torch.int64:
        raise TypeError(f"split_lane_logprobs: int64 ids [{n}], got {ids.dtype} {tuple(ids.shape)}")
    if temperatures.shape != (n,) or temperatures.dtype != torch.float32:
        raise TypeError(f"split_lane_logprobs: fp32 temperatures [{n}], got {temperatures.dtype} "
                        f"{tuple(temperatures.shape)}")  # fmt: skip
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    if vocab == 0:
        raise ValueError("split_lane_logprobs: no columns")
    logp = _empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return logp
    tile = CONTRACT_TILE
    log2_tile = _check_tile(tile)
    fma = _fma_mode(CONTRACT_FMA)
    temps = temperatures.contiguous()
    n_tiles = triton.cdiv(vocab, tile)
    tmax = _empty((n, n_tiles), dtype=torch.float32, device=dev)
    lane_sums = _empty((n, tile), dtype=torch.float32, device=dev)
    m = _empty(n, dtype=torch.float32, device=dev)
    sx = logits.stride(0)
    opts = dict(enable_fp_fusion=False)  # every a * b + c of the contract is spelled out
    _tile_max_kernel[(n, n_tiles)](logits, sx, temps, tmax, vocab, TILE=tile, FMA=fma,
                                   INTERP=_interpreting(), num_warps=8, **opts)  # fmt: skip
    _lane_sums_kernel[(n, tile // LANES)](
        logits, sx, temps, tmax, lane_sums, m, vocab, TILE=tile, LANES=LANES, FMA=fma,
        NUM_STAGES=NUM_STAGES, num_warps=1, **opts,
    )  # fmt: skip
    _finish_kernel[(n,)](logits, sx, temps, ids.contiguous(), lane_sums, m, logp, vocab, TILE=tile,
                         LOG2_TILE=log2_tile, FMA=fma, num_warps=8, **opts)  # fmt: skip
    return logp
