"""Fused policy-ratio + KL (+ entropy) from logits: Triton forward/backward and the plain-PyTorch contract.

The problem
-----------
Every PPO/GRPO step turns policy logits ``[N, V]`` into the per-token logprob of the sampled action,
the importance ratio against the rollout's logprob, a KL penalty against a reference policy and,
optionally, the entropy. Plain PyTorch materialises ``logits.float()``, ``log_softmax`` and their
gradients: several ``[N, V]`` fp32 tensors (GBs at V = 152k) and ~6 passes over HBM. This op reads the
logits once in the forward (twice with reference logits) and once more in the backward, which writes
``dlogits`` directly in the logits' dtype; its scratch is ``O(N)``.

The numerics contract (why this file defines its own log-softmax)
-----------------------------------------------------------------
truepolicy needs the trainer's logprob to be *bitwise* the rollout's. Bitwise equality with
``torch.log_softmax`` cannot be had from Triton: PyTorch's CUDA kernels (the persistent
"spatial"/``cunn_SoftMaxForward`` kernels) sum ``exp`` with a block reduction whose order depends on
the row length and launch shape, its CPU kernel sums vectorised chunks with ``vec::reduce_all``, the
two disagree with each other in the last bits, and both use their own ``expf``/``logf`` (CUDA libdevice
vs SLEEF), which Triton's ``tl.exp`` (``ex2.approx``) matches neither. Even the temperature division
differs: CUDA's ``x / python_float`` multiplies by the fp32 reciprocal, the CPU divides.

So the logprob is *defined* here by a reduction whose every rounding is spelled out, reproducible with
IEEE-754 ``+ - * /`` (correctly rounded on every CPU and GPU), fused multiply-add, exact bit
operations and comparisons -- and nothing else:

1. ``xs = float32(x) / T`` (``T`` rounded to fp32, one per call or one per row; skipped when
   ``T == 1``), computed as
   ``q = x * RN(1/T); xs = fma(x - q T, RN(1/T), q)`` with ``x - q T`` an exact fma (Markstein's
   theorem: this is the correctly rounded IEEE quotient; tested on every finite bf16 value).
2. The row is cut into tiles of ``TILE = 2048`` columns (the last one padded with ``-inf``). ``TILE``
   accumulators ("lanes") are kept, lane ``j`` owning columns ``j, j + TILE, j + 2 TILE, ...``.
3. Tiles are visited left to right. ``M <- max(M, max(tile))`` (exact; NaN propagates; ``+0.0`` added
   so that ``-0.0`` becomes ``+0.0``). When ``M`` grows, every lane is rescaled: ``s <- s * e(M_old -
   M)``. Then ``s_j <- s_j + e(xs_j - M)``, where ``e(t) = exp_c(max(t, -86))`` (the clamp keeps
   ``2^k`` normal without a select; such terms are < 2^-124 against a sum >= 1). Each step is an
   elementwise fp32 operation, so the order of the sum is fixed by the definition, not by a
   reduction tree of the hardware. (Entropy: ``w_j += e * max(t, -86)``, rescaled the same way.)
4. The ``TILE`` lanes are combined by a fixed pairwise tree: ``s'[i] = s[2i] + s[2i+1]``, 11 levels.
5. ``log S`` is computed in fp64 by exponent/mantissa split and the ``atanh`` series (division and
   polynomial in IEEE fp64), and ``logp = float32((float64(xs_t) - float64(M)) - log S)``.

``exp_c(t)`` splits the exact product ``t * log2(e)`` into ``k + f``: ``z = fma(t, log2e, 1.5 * 2^23)``
rounds it to the integer ``k`` (held in z's low mantissa bits), ``f = fma(t, log2e, -k)`` (one
rounding, ``|f| <= 1/2``); ``2^f`` by a degree-5 polynomial evaluated by Horner's rule with *fused*
multiply-add (``fma``), and ``2^k`` applied by adding ``k << 23`` to the bit pattern. Relative error
<= 2e-7 (plus ``|t|`` times the rounding of the constant log2(e)); ``exp_c(0) == 1`` exactly, so the
ratio is exactly 1.0 on policy; ``exp_c(t) = 0`` for ``k < -125``, ``+inf`` for ``k > 127``. The fma
is native in Triton (``tl.fma``) and emulated exactly in PyTorch (fp64 product + TwoSum +
round-to-odd, then rounding to fp32: Boldo-Melquiond). The Triton interpreter (numpy) computes
``tl.fma`` as two roundings, so under ``TRITON_INTERPRET=1`` the kernel uses the same exact emulation.

Bitwise guarantees: the Triton kernel (GPU), the plain-PyTorch :func:`logprobs_reference` (CPU and
GPU) and the kernel under the Triton interpreter return identical bits for logp, ratio, KL and
entropy, for bf16/fp16/fp32 logits, any ``N``, ``V``, temperature. Relation to
``torch.log_softmax``: not bitwise (it cannot be, see above); the difference is a few fp32 ulps (both
are within ~3e-7 of the float64 value for logits of moderate size). Gradients are not part of the
contract: the backward uses the hardware ``exp2`` and fma contraction; they match float64 to ~1e-6.
Rows whose max is NaN or +-inf give NaN outputs (never a silent value).

Trade-offs
----------
* The software ``exp`` (7 fma + 3 other instructions instead of one ``MUFU.EX2``; ~16 instructions
  per element in all, from the SASS) makes the forward close to issue-bound on an H100 at bf16
  (1.2 G elements/ms of HBM bandwidth); it is the price of a formula that a CPU reproduces bit for
  bit. Measured (H100, N = 8192, bf16, V = 151936): forward 0.92 ms = 0.90 of the copy bandwidth
  (Liger's ``ex2.approx`` kernel: 0.91 ms), backward 1.73 ms = 0.95. Every ``a * b + c`` of the
  contract is an explicit fma or an explicit pair of roundings: the forward kernel is compiled with
  ``enable_fp_fusion=False``. The backward is not in the contract and uses the hardware ``exp2``.
* Kernel configuration never changes the bits: only ``TILE`` does, and it is part of the contract (2048
  was the fastest of 1024 / 2048 / 4096 / 8192). The forward's launch options (:class:`FwdLaunch`:
  warps, two tiles per step, a software-pipelined tile loop, several rows per program, a persistent
  grid streaming rows through one pipelined loop, bf16 read as word pairs, packed bf16x2 max/min) only
  decide which program runs which row, when a tile's loads are issued and how a tile's exact max is
  found; each row still runs the contract's steps in order, and the only reductions whose order the
  hardware picks are exact (a max, a min that only selects between two equal-valued formulas, and the
  sums of two of the lane tree). The defaults are a fixed table per vocabulary class
  (``FWD_LAUNCH`` / ``BWD_LAUNCH``, :func:`v_class`), chosen by the benchmark's sweep, never tuned at
  run time.
* ``T != 1`` costs 3 more instructions per element (the Markstein division), entropy 3 more.
* With one row per program (the original launch), the per-row tail (lane tree, fp64 log) and the
  load latency that nothing hides while a program reduces a tile are visible at small V (0.85 of the
  copy bandwidth at V = 32768); the pipelined tile loop and rows-per-program options address that, and
  the stream option removes the two DRAM waits left per row (its first tiles; its action logit / old /
  reference logprob, which every launch now loads before the tile loop instead of after it).

KL conventions (``d = ref_logp - logp``, per sampled token, estimating KL(pi || pi_ref)):
``k1 = logp - ref_logp``, ``k2 = d^2 / 2``, ``k3 = exp(d) - d - 1`` (>= 0; for ``|d| < 1/2`` the
Taylor series ``d^2/2 + d^3/6 + ... + d^8/8!`` avoids the cancellation). Entropy is
``H = -sum_v p_v log p_v`` of the temperature-scaled distribution, in nats.
Masked rows (``mask == False``): ``logp = 0``, ``ratio = 1``, ``kl = 0``, ``entropy = 0`` and zero
gradient; their action ids are never read. Unmasked ids outside ``[0, V)`` raise ``ValueError``.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from parity.ops.device import sm_count

# ----------------------------------------------------------------------------------------------------
# Contract constants. Every fp32 constant below is exactly representable in fp32 (so rounding a
# Python float to fp32 -- in Triton, numpy or PyTorch -- is exact and cannot differ between them).
# ----------------------------------------------------------------------------------------------------
CONTRACT_TILE = 2048  # lanes of the online reduction (part of the contract: changes the bits)
CONTRACT_FMA = True  # Horner's rule of exp_c with fused multiply-add (part of the contract)

_LOG2E_F = 1.44269502162933349609375  # fp32(log2(e))
_MAGIC_F = 12582912.0  # 1.5 * 2^23: fma(t, log2e, MAGIC) rounds t log2e to an integer (low mantissa bits)
# 2^f on [-1/2, 1/2], degree 5, near-minimax in relative error (Lawson), coefficients rounded to fp32.
_P0 = 1.0
_P1 = 0.6931470036506653
_P2 = 0.24022242426872253
_P3 = 0.05550733953714371
_P4 = 0.009671509265899658
_P5 = 0.0013264698209241033
_K_LO = -125.0  # k below this: exp_c = 0 (2^f 2^k would leave the normal range)
_K_HI = 127.0  # k above this: exp_c = +inf
_T_MIN = -86.0  # softmax terms: exp_c(max(t, -86)); k >= -124 keeps 2^k normal
_SQRT2_F = 1.41421353816986083984375  # fp32(sqrt(2)): mantissas above it are halved before the log
_LN2_D = 0.6931471805599453  # fp64 ln(2)
# log(m) = 2u (1 + u^2/3 + u^4/5 + ...), u = (m-1)/(m+1), |u| <= 0.1716: 12 terms reach fp64 precision.
_L = [1.0 / (2 * k + 1) for k in range(12)]
# k3 series: k3(d) = d^2 (1/2 + d (1/6 + d (1/24 + ...))) for |d| < 1/2 (fp32-rounded 1/n!).
_K = [float(torch.tensor(1.0 / math.factorial(n), dtype=torch.float32)) for n in range(2, 9)]

for _name, _value in (("_P1", _P1), ("_P2", _P2), ("_P3", _P3), ("_P4", _P4), ("_P5", _P5)):
    assert float(torch.tensor(_value, dtype=torch.float32)) == _value, _name

# Triton sees module globals only as constexprs.
LOG2E: tl.constexpr = tl.constexpr(_LOG2E_F)
MAGIC: tl.constexpr = tl.constexpr(_MAGIC_F)
P0: tl.constexpr = tl.constexpr(_P0)
P1: tl.constexpr = tl.constexpr(_P1)
P2: tl.constexpr = tl.constexpr(_P2)
P3: tl.constexpr = tl.constexpr(_P3)
P4: tl.constexpr = tl.constexpr(_P4)
P5: tl.constexpr = tl.constexpr(_P5)
K_LO: tl.constexpr = tl.constexpr(_K_LO)
K_HI: tl.constexpr = tl.constexpr(_K_HI)
T_MIN: tl.constexpr = tl.constexpr(_T_MIN)
SQRT2_F: tl.constexpr = tl.constexpr(_SQRT2_F)
LN2_D: tl.constexpr = tl.constexpr(_LN2_D)
L0: tl.constexpr = tl.constexpr(_L[0])
L1: tl.constexpr = tl.constexpr(_L[1])
L2: tl.constexpr = tl.constexpr(_L[2])
L3: tl.constexpr = tl.constexpr(_L[3])
L4: tl.constexpr = tl.constexpr(_L[4])
L5: tl.constexpr = tl.constexpr(_L[5])
L6: tl.constexpr = tl.constexpr(_L[6])
L7: tl.constexpr = tl.constexpr(_L[7])
L8: tl.constexpr = tl.constexpr(_L[8])
L9: tl.constexpr = tl.constexpr(_L[9])
L10: tl.constexpr = tl.constexpr(_L[10])
L11: tl.constexpr = tl.constexpr(_L[11])
K2: tl.constexpr = tl.constexpr(_K[0])
K3: tl.constexpr = tl.constexpr(_K[1])
K4: tl.constexpr = tl.constexpr(_K[2])
K5: tl.constexpr = tl.constexpr(_K[3])
K6: tl.constexpr = tl.constexpr(_K[4])
K7: tl.constexpr = tl.constexpr(_K[5])
K8: tl.constexpr = tl.constexpr(_K[6])

KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}
# FMA modes of the kernels: 0 = separate multiply and add (the fma=False contract variant), 1 = native
# fma (GPU), 2 = exact emulation in fp64 (Triton interpreter, whose tl.fma rounds twice).
_FMA_OFF, _FMA_NATIVE, _FMA_EMULATED = 0, 1, 2


@dataclass(frozen=True)
class FwdLaunch:
    """Launch options of the forward kernel. None changes a bit: they decide which program handles which
    row and when a tile's loads are issued; every row runs the contract's reduction over its tiles in
    order, and its only order-free steps are exact (a max, sums of two).

    - ``num_warps``: warps per program (one row at a time per program);
    - ``unroll``: 2 issues the loads of two tiles before reducing them (one after the other);
    - ``num_stages``: > 1 lets Triton software-pipeline the tile loop (``cp.async`` of the next
      ``num_stages - 1`` tiles into shared memory while the current one is reduced);
    - ``rows``: rows per program: the grid is ``ceil(N / rows)`` programs and program ``p`` handles rows
      ``p, p + grid, p + 2 grid, ...`` (fewer, longer-lived programs; no per-row program launch);
    - ``stream``: > 0 runs :func:`_policy_fwd_stream_kernel` on a persistent grid of ``stream`` programs
      per SM (at most N), each streaming its rows' tiles through ONE pipelined loop: the next row's first
      tiles are in flight during this row's last tiles and tail, and the per-row inputs (action logit,
      old / reference logprob) are fetched a row ahead (``unroll`` and ``rows`` must be 1; V < TILE, or
      reference logits of another dtype, run the one-row-per-program kernel with the same warps/stages);
    - ``pairs``: bf16 rows are read as 32-bit words of two logits, split with one instruction per element
      (lanes kept as even / odd halves; the lane tree's first level is their sum). Needs bf16, an even V
      and 4-byte aligned rows, else ignored;
    - ``packed`` (with ``pairs``, T == 1, else ignored): each tile's max and min come from packed
      ``max/min.NaN.bf16x2`` reductions (Hopper fuses three operands: ~0.25 instructions per element
      instead of one FMNMX), and a tile whose min is within 86 of the running max skips the clamp
      ``max(t, -86)``, which is then the identity (rounding is monotone). sm_90 SASS of the tile loop,
      1 warp, per 2048-column tile: 996 instructions (w1u1s3r1), 985 streamed with pairs, ~909 with
      packed too (a tile needing the clamp: ~972). With 4 warps the min / max cross warps: no gain.
    """

    num_warps: int = 4
    unroll: int = 1
    num_stages: int = 1
    rows: int = 1
    stream: int = 0
    pairs: bool = False
    packed: bool = False

    @property
    def name(self) -> str:
        name = f"w{self.num_warps}u{self.unroll}s{self.num_stages}r{self.rows}"
        name += f"g{self.stream}" if self.stream else ""
        return name + ("p" if self.pairs else "") + ("h" if self.packed else "")

    def validate(self) -> FwdLaunch:
        if self.num_warps not in (1, 2, 4, 8, 16) or self.unroll not in (1, 2):
            raise ValueError(f"bad forward launch {self}")
        if self.num_stages < 1 or self.rows < 1 or not 0 <= self.stream <= 64:
            raise ValueError(f"bad forward launch {self}")
        if self.stream and (self.unroll != 1 or self.rows != 1):
            raise ValueError(f"a stream launch has unroll 1 and rows 1 (its grid is stream x SMs): {self}")
        if self.packed and not self.pairs:
            raise ValueError(f"packed needs pairs: {self}")
        return self


@dataclass(frozen=True)
class BwdLaunch:
    """Launch options of the backward kernel: columns per loop step (capped at V rounded up to a power of
    two) and warps. The backward is not part of the contract."""

    block: int = 16384
    num_warps: int = 16

    @property
    def name(self) -> str:
        return f"b{self.block}w{self.num_warps}"


# Default launch per vocabulary class (a fixed table, no run-time tuning): "small" is V <= 65536, where a
# row is at most 32 contract tiles and the per-row work (lane tree, fp64 log, per-token outputs) is a
# visible share; "large" is everything above. `benchmarks/bench_policy_loss.py --sweep` times every
# FWD_CANDIDATES / BWD_CANDIDATES entry per V on the GPU and prints the best bitwise entry per class as
# these two lines. "small" holds the sweep's choice at V=32768 on an H200 (N=8192, bf16; every candidate
# bitwise the original): forward w1u1s3r1 0.718 of copy vs 0.651 for the original launch, backward
# b16384w32 0.947 vs 0.942. "large" holds the original launch (one row per program, 4 warps; backward
# 16384 columns per step, 16 warps) until a sweep at large V is pasted here.
SMALL_V_MAX = 65536
# Sweep on an H200 (2026-11-28, N=8192): w1u1s3r1ph 0.80 of copy at V=32768 (previous 0.72), 0.84 at
# 151936 (the best bitwise candidate there); backward b32768w32 0.96 at 151936.
FWD_LAUNCH: dict[str, FwdLaunch] = {
    "small": FwdLaunch(num_warps=1, unroll=1, num_stages=3, rows=1, stream=0, pairs=True, packed=True),
    "large": FwdLaunch(num_warps=1, unroll=1, num_stages=3, rows=1, stream=0, pairs=True, packed=True),
}
BWD_LAUNCH: dict[str, BwdLaunch] = {
    "small": BwdLaunch(block=16384, num_warps=32),
    "large": BwdLaunch(block=32768, num_warps=32),
}
# The forward configurations the benchmark sweeps (and the GPU tests check bitwise against the contract).
# Tried and removed (no gain; H200 sweep, N=8192, fraction of the copy at V=32768 / 151936, all bitwise),
# against the default w1u1s3r1ph's 0.797 / 0.820 (and w1u1s3r1g12ph's 0.759 / 0.748), aimed at its per-row
# losses (first-tile DRAM wait, pipeline drain, partial tile, tail) and at latency 12 resident 1-warp
# programs per SM cannot hide:
# - a register cap (ptxas maxnreg) for more resident programs: 144 (14 per SM) 0.762 / 0.741, with 4
#   stages 0.755 / 0.728;
# - L2 prefetch hints (prefetch.global.L2) of a row's partial tile and of the first tiles of the row
#   expected to start next (the next wave's, 12 programs per SM): 0.795 / 0.778; with a cap of 152 (13 per
#   SM) 0.761 / 0.804;
# - 2 warps per program: 0.758 / 0.767; capped at 80 registers (12 per SM) 0.729 / 0.774;
# - streamed rows, 14 per SM (g14, cap 144, partial-tile hint): 0.579 / 0.550.
# Best of them 0.795 / 0.804 vs the default's 0.797 / 0.820: register caps 80-152, prefetch hints, 2
# warps and g14 need a new idea, not a retry.
FWD_CANDIDATES: tuple[FwdLaunch, ...] = tuple(
    FwdLaunch(num_warps=w, unroll=u, num_stages=st, rows=r)
    for w, u, st, r in [
        (4, 1, 1, 1), (4, 2, 1, 1), (2, 1, 1, 1), (1, 1, 1, 1),  # the original launch and its neighbours
        (4, 1, 2, 1), (4, 1, 3, 1), (4, 1, 4, 1), (2, 1, 3, 1), (2, 1, 4, 1), (1, 1, 3, 1), (8, 1, 3, 1),
        (4, 2, 3, 1), (2, 2, 3, 1),  # pipelined tile loop
        (4, 1, 1, 4), (2, 1, 1, 8), (4, 1, 3, 4), (4, 1, 3, 8), (2, 1, 3, 4), (2, 1, 3, 8), (1, 1, 3, 8),
        # ^ several rows per program
        (1, 1, 2, 1), (1, 1, 4, 1), (1, 1, 5, 1), (1, 2, 3, 1), (1, 1, 3, 4), (2, 1, 5, 1),
        # ^ around the best at V=32768 on an H200 (w1u1s3r1, 0.72 of copy)
    ]
) + tuple(
    FwdLaunch(num_warps=w, num_stages=st, stream=g, pairs=True, packed=h)
    for w, st, g, h in [
        # streamed rows (persistent grid, pipeline across rows), bf16 pairs, packed max/min: 1 warp per
        # program (168 registers on sm_90: at most 12 resident per SM, 8-12 KB of tiles in flight each)
        (1, 3, 12, True), (1, 2, 12, True), (1, 4, 12, True), (1, 3, 12, False),
        (1, 3, 8, True),  # 8 per SM: N = 8192 rows on 132 SMs split 7.8 / program (12: 5.2, a ragged tail)
        (2, 3, 8, True),  # 2 warps per program (96 registers), 16 warps per SM
        # the one-row-per-program kernel: the small-V best with pairs + packed; the large-V default with
        # pairs only (with 4 warps the packed min / max each need a cross-warp reduction: no gain)
        (1, 3, 0, True), (4, 1, 0, False),
    ]
)  # fmt: skip
BWD_CANDIDATES: tuple[BwdLaunch, ...] = tuple(
    BwdLaunch(b, w) for b, w in [(4096, 8), (8192, 8), (8192, 16), (16384, 16), (16384, 32), (32768, 32)]
)


def v_class(vocab: int) -> str:
    """``"small"`` for V <= SMALL_V_MAX, else ``"large"`` (the key of FWD_LAUNCH / BWD_LAUNCH)."""
    return "small" if vocab <= SMALL_V_MAX else "large"


# Output allocator (tests swap it for one that poisons, to check that every element is written).
_empty = torch.empty


class PolicyLossOutput(NamedTuple):
    """Per-token outputs, all fp32 with the logits' leading shape. ``kl``/``entropy`` are ``None``
    unless a reference / ``entropy=True`` was given."""

    logp: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor | None
    entropy: torch.Tensor | None


# ====================================================================================================
# Triton: contract arithmetic (exp_c, log, fma)
# ====================================================================================================
@triton.jit
def _full(ref, value):
    """``value`` (a constant or a scalar) as an fp32 tensor of ``ref``'s shape (no arithmetic: adding
    it to zeros would cost an FADD per element, since x + 0.0 cannot be folded for x = -0.0)."""
    return tl.full(ref.shape, value, tl.float32)


@triton.jit
def _fma32(a, b, c, FMA: tl.constexpr):
    """fp32 a * b + c (b, c of a's shape): one rounding (FMA = 1 native, 2 emulated) or two (FMA = 0)."""
    if FMA == 1:
        return tl.fma(a, b, c)
    elif FMA == 2:
        # a * b is exact in fp64 (24 + 24 bits). TwoSum gives s + e == a*b + c exactly. Rounding s to
        # odd (if e != 0 and s's last bit is even, step s one fp64 ulp towards e) and then to fp32 is
        # the correctly rounded fp32 fma, since fp64 has >= 24 + 2 bits (Boldo & Melquiond 2008).
        p = a.to(tl.float64) * b.to(tl.float64)
        cd = c.to(tl.float64)
        s = p + cd
        bp = s - p
        e = (p - (s - bp)) + (cd - bp)
        sb = s.to(tl.int64, bitcast=True)
        fix = (e != 0.0) & ((sb & 1) == 0) & (tl.abs(s) < float("inf"))  # inf / NaN: kept
        up = (e > 0.0) == (s > 0.0)  # moving away from zero: +1 on the magnitude bits
        sb = tl.where(fix, tl.where(up, sb + 1, sb - 1), sb)
        return sb.to(tl.float64, bitcast=True).to(tl.float32)  # cvt.rn: round to nearest even
    else:
        return a * b + c  # two roundings: the kernels run with fp contraction disabled


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _exp2_parts(t, FMA: tl.constexpr):
    """(-k, r): t log2(e) = k + f with k an integer (held as the float -k), r = 2^f (polynomial) * 2^k.
    (Triton's unary minus is 0 - x, an FADD per element: MAGIC - z gives -k directly.)"""
    log2e = _full(t, LOG2E)
    z = _fma32(t, log2e, _full(t, MAGIC), FMA)  # exact t log2e rounded to an integer k: bits 0x4B400000 + k
    nk = MAGIC - z  # exact: -k as a float
    f = _fma32(t, log2e, nk, FMA)  # t log2e - k, rounded once: |f| <= 1/2
    p = _fma32(_full(f, P5), f, _full(f, P4), FMA)
    p = _fma32(p, f, _full(f, P3), FMA)
    p = _fma32(p, f, _full(f, P2), FMA)
    p = _fma32(p, f, _full(f, P1), FMA)
    p = _fma32(p, f, _full(f, P0), FMA)  # 2^f in [0.707, 1.415]; exactly 1.0 at f = 0
    # (0x4B400000 + k) << 23 == k << 23 (mod 2^32): adding it to p's bits multiplies p by 2^k exactly
    # while the result stays a normal number (guaranteed for -125 <= k <= 127 by the callers).
    r = ((z.to(tl.int32, bitcast=True) << 23) + p.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    return nk, r


@triton.jit
def _exp_neg(t, FMA: tl.constexpr):
    """exp_c of a softmax term (t <= 0): the argument is clamped at T_MIN = -86, so the result stays a
    normal number (>= 2^-124.1) and no select is needed. Such terms are < 2^-124 against a sum >= 1."""
    _k, r = _exp2_parts(_max_nan(t, T_MIN), FMA)
    return r


@triton.jit
def _exp_any(t, FMA: tl.constexpr):
    """exp_c(t) for any t (per-token ratio, k3): 0 / +inf outside the normal range, NaN kept."""
    nk, r = _exp2_parts(t, FMA)
    r = tl.where(nk > -K_LO, 0.0, r)  # k < -125
    r = tl.where(nk < -K_HI, float("inf"), r)  # k > 127
    return tl.where(t != t, t, r)


@triton.jit
def _log_f64(s):
    """fp64 log of a positive normal fp32 ``s``: exponent/mantissa split, then the atanh series."""
    bits = s.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # mantissa in [1, 2)
    big = m > SQRT2_F
    m = tl.where(big, m * 0.5, m)  # exact; m in [0.707, 1.415]
    e = tl.where(big, e + 1, e)
    md = m.to(tl.float64)  # exact
    u = (md - 1.0) / (md + 1.0)  # IEEE fp64 division
    u2 = u * u
    q = tl.full(u2.shape, L11, tl.float64)
    q = q * u2 + L10
    q = q * u2 + L9
    q = q * u2 + L8
    q = q * u2 + L7
    q = q * u2 + L6
    q = q * u2 + L5
    q = q * u2 + L4
    q = q * u2 + L3
    q = q * u2 + L2
    q = q * u2 + L1
    q = q * u2 + L0
    return e.to(tl.float64) * LN2_D + (u + u) * q


@triton.jit
def _k3(d, FMA: tl.constexpr):
    """exp(d) - d - 1, with the Taylor series where it would cancel (|d| < 1/2)."""
    s = _full(d, K8)
    s = s * d + K7
    s = s * d + K6
    s = s * d + K5
    s = s * d + K4
    s = s * d + K3
    s = s * d + K2
    series = (d * d) * s
    direct = (_exp_any(d, FMA) - d) - 1.0
    return tl.where((d < 0.5) & (d > -0.5), series, direct)


@triton.jit
def _tree_sum(v, TILE: tl.constexpr, LOG2_TILE: tl.constexpr):
    """Fixed pairwise tree over the lanes: v'[i] = v[2i] + v[2i+1], LOG2_TILE levels."""
    for i in tl.static_range(LOG2_TILE):
        v = tl.sum(tl.reshape(v, [TILE >> (i + 1), 2]), 1)
    return tl.sum(v, 0)  # one element left: the sum of one value is that value


@triton.jit
def _tile_max(x, INTERP: tl.constexpr):
    """Exact max of a tile, NaN-propagating (tl.max ignores NaN)."""
    if INTERP:
        # the interpreter runs a custom combine function once per element (minutes); its argmax
        # reduction is numpy's np.max, which propagates NaN like max.NaN.f32 does on the GPU
        mx, _i = tl.max(x, 0, return_indices=True)
        return mx
    else:
        return tl.reduce(x, 0, _max_nan)


@triton.jit
def _rescaled(s, w, m, m_new, alpha, ENTROPY: tl.constexpr):
    """One lane tensor when the running max grows from m to m_new (alpha = e(m - m_new)): s' = alpha s;
    w holds sum e_i (x_i - m), so w' = alpha (w + (m - m_new) s)."""
    if ENTROPY:
        delta = tl.where(m == float("-inf"), 0.0, m - m_new)  # m = -inf: s = 0, no -inf * 0
        w = (w + s * delta) * alpha
    return s * alpha, w


@triton.jit
def _accumulate(t, s, w, CLAMP: tl.constexpr, FMA: tl.constexpr, ENTROPY: tl.constexpr):
    """s += e(t) per lane (entropy: w += e(t) max(t, -86), the same clamped t as in e: finite where
    x = -inf). CLAMP = False where no lane is below the clamp: exp_c(t) is then the same value."""
    if CLAMP:
        e = _exp_neg(t, FMA)
        tc = _max_nan(t, T_MIN)
    else:
        _k, e = _exp2_parts(t, FMA)
        tc = t
    s = s + e
    if ENTROPY:
        w = w + e * tc
    return s, w


@triton.jit
def _step_lanes(xe, xo, tmax, tmin, m, se, so, we, wo, TWO: tl.constexpr, SKIP_CLAMP: tl.constexpr,
                FMA: tl.constexpr, ENTROPY: tl.constexpr):  # fmt: skip
    """Step 3 of the module docstring for one tile whose exact max is ``tmax``, held as one lane tensor
    (``xe``, state ``se``/``we``; TWO = False: ``xo``/``so``/``wo`` pass through untouched) or as its even
    and odd lanes (TWO). SKIP_CLAMP: ``tmin`` is the tile's exact min, and when RN(tmin - M) >= -86 no
    lane can reach the clamp (every t = RN(x - M) >= RN(tmin - M), rounding being monotone), so the lanes
    take exp_c(t) without it: the same values, one instruction less per element."""
    m_new = _max_nan(m, tmax) + 0.0  # exact; + 0.0 turns -0.0 into +0.0
    if m_new > m:  # the running max grew: rescale every lane (never taken once m is NaN)
        alpha = _exp_neg(m - m_new, FMA)  # exp_c(-86) when m was -inf, while s and w are still 0
        se, we = _rescaled(se, we, m, m_new, alpha, ENTROPY)
        if TWO:
            so, wo = _rescaled(so, wo, m, m_new, alpha, ENTROPY)
    m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # an all -inf prefix: t = -inf, not NaN
    te = xe - m_safe
    to = xo
    if TWO:
        to = xo - m_safe
    if SKIP_CLAMP:
        if tmin - m_safe >= T_MIN:  # (False for NaN, -inf)
            se, so, we, wo = _accumulate_lanes(te, to, se, so, we, wo, TWO, False, FMA, ENTROPY)
        else:
            se, so, we, wo = _accumulate_lanes(te, to, se, so, we, wo, TWO, True, FMA, ENTROPY)
    else:
        se, so, we, wo = _accumulate_lanes(te, to, se, so, we, wo, TWO, True, FMA, ENTROPY)
    return m, se, so, we, wo


@triton.jit
def _accumulate_lanes(te, to, se, so, we, wo, TWO: tl.constexpr, CLAMP: tl.constexpr, FMA: tl.constexpr,
                      ENTROPY: tl.constexpr):  # fmt: skip
    """:func:`_accumulate` of the one or two lane tensors of :func:`_step_lanes`."""
    se, we = _accumulate(te, se, we, CLAMP, FMA, ENTROPY)
    if TWO:
        so, wo = _accumulate(to, so, wo, CLAMP, FMA, ENTROPY)
    return se, so, we, wo


@triton.jit
def _tile_update(x, m, s, w, FMA: tl.constexpr, ENTROPY: tl.constexpr, INTERP: tl.constexpr):
    """One tile of the contract's online reduction (step 3 of the module docstring)."""
    m, s, _s2, w, _w2 = _step_lanes(x, x, _tile_max(x, INTERP), m, m, s, s, w, w, False, False, FMA, ENTROPY)
    return m, s, w


@triton.jit
def _scale(x, temperature, inv_t, HAS_T: tl.constexpr, FMA: tl.constexpr):
    """x / T. With fma: Markstein's correction of q = x * RN(1/T) (3 instructions instead of ~10 for
    div.rn), the correctly rounded quotient; -inf stays -inf (its correction would be NaN)."""
    if HAS_T:
        if FMA == 0:
            x = tl.math.div_rn(x, temperature)  # IEEE division
        else:
            q = x * inv_t
            rem = _fma32(q, _full(q, -temperature), x, FMA)  # x - q T, exact (scalar negation: free)
            x = tl.where(x == float("-inf"), x, _fma32(rem, _full(q, inv_t), q, FMA))
    return x


@triton.jit
def _load_scaled(ptr, temperature, inv_t, HAS_T: tl.constexpr, FMA: tl.constexpr):
    x = tl.load(ptr).to(tl.float32)  # exact upcast
    return _scale(x, temperature, inv_t, HAS_T, FMA)


# PAIRS (bf16 logits only): a tile is loaded as TILE / 2 32-bit words, each holding two logits (little
# endian: the even column in the low half), and split with one shift or one AND per element -- the
# generic bf16 -> fp32 conversion spends two instructions on every high half (PRMT + SHF). Lanes 2i and
# 2i + 1 live in two [TILE / 2] tensors ``s_even[i]`` and ``s_odd[i]``: every lane sees the same operations
# in the same order, and the first level of the lane tree, s[2i] + s[2i+1], is ``s_even + s_odd``.
NEG_INF_PAIR: tl.constexpr = tl.constexpr(-8323200)  # int32 0xFF80FF80: two bf16 -inf (the tile padding)


@triton.jit
def _split_pair(wd, temperature, inv_t, HAS_T: tl.constexpr, FMA: tl.constexpr):
    """int32 words of two bf16 -> (even, odd) columns as fp32 (exact), scaled."""
    xe = (wd << 16).to(tl.float32, bitcast=True)
    xo = (wd & -65536).to(tl.float32, bitcast=True)  # -65536 == 0xFFFF0000
    return _scale(xe, temperature, inv_t, HAS_T, FMA), _scale(xo, temperature, inv_t, HAS_T, FMA)


@triton.jit
def _tile_update_pairs(
    xe, xo, m, se, so, we, wo, FMA: tl.constexpr, ENTROPY: tl.constexpr, INTERP: tl.constexpr
):
    """:func:`_tile_update` of one tile held as its even and odd columns (lanes): the same operations
    per lane. The tile max is exact whatever the order (a pairwise max first, then the reduction)."""
    tmax = _tile_max(_max_nan(xe, xo), INTERP)
    return _step_lanes(xe, xo, tmax, m, m, se, so, we, wo, True, False, FMA, ENTROPY)


@triton.jit
def _bf16x2_max(a, b):
    """Per-half max.NaN of two words of two bf16 (exact; a NaN half gives a NaN half)."""
    return tl.inline_asm_elementwise(
        "max.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _bf16x2_min(a, b):
    """Per-half min.NaN of two words of two bf16 (exact; a NaN half gives a NaN half)."""
    return tl.inline_asm_elementwise(
        "min.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1
    )


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tile_min(x, INTERP: tl.constexpr):
    """Exact min of a tile, NaN-propagating (see _tile_max)."""
    if INTERP:
        mn, _i = tl.min(x, 0, return_indices=True)
        return mn
    else:
        return tl.reduce(x, 0, _min_nan)


@triton.jit
def _tile_update_packed(
    wd, m, se, so, we, wo, FMA: tl.constexpr, ENTROPY: tl.constexpr, INTERP: tl.constexpr
):
    """:func:`_tile_update_pairs` of a tile of bf16 words (PACKED, T == 1: the words are the values).
    The tile's max and min come from packed reductions of the words (max.NaN / min.NaN.bf16x2; Hopper
    fuses three operands per instruction: ~0.25 instructions per element, instead of one FMNMX per
    element for the max), exact whatever the order. With the min, a tile where no lane can reach the
    clamp skips it (one FMNMX per element saved; see :func:`_step_lanes`); otherwise (a wide tile, -inf,
    NaN) the lanes take the clamped path. Under the interpreter (no inline asm) the tile max / min are
    taken over the fp32 halves: the same values."""
    xe = (wd << 16).to(tl.float32, bitcast=True)
    xo = (wd & -65536).to(tl.float32, bitcast=True)
    if INTERP:
        tmax = _max_nan(_tile_max(xe, INTERP), _tile_max(xo, INTERP))
        tmin = _min_nan(_tile_min(xe, INTERP), _tile_min(xo, INTERP))
    else:
        mw = tl.reduce(wd, 0, _bf16x2_max)
        nw = tl.reduce(wd, 0, _bf16x2_min)
        tmax = _max_nan((mw << 16).to(tl.float32, bitcast=True), (mw & -65536).to(tl.float32, bitcast=True))
        tmin = _min_nan((nw << 16).to(tl.float32, bitcast=True), (nw & -65536).to(tl.float32, bitcast=True))
    return _step_lanes(xe, xo, tmax, tmin, m, se, so, we, wo, True, True, FMA, ENTROPY)


@triton.jit
def _tile_step(raw, m, s, s2, w, w2, temperature, inv_t, HAS_T: tl.constexpr, FMA: tl.constexpr,
               ENTROPY: tl.constexpr, INTERP: tl.constexpr, PAIRS: tl.constexpr,
               PACKED: tl.constexpr):  # fmt: skip
    """One full tile of a row (``raw``: its loaded elements, or with PAIRS its words of two bf16, whose
    even / odd lanes are ``s``/``w`` and ``s2``/``w2``; without PAIRS ``s2``/``w2`` are unused). PACKED
    applies with T == 1 only."""
    if PAIRS:
        if PACKED and not HAS_T:
            m, s, s2, w, w2 = _tile_update_packed(raw, m, s, s2, w, w2, FMA, ENTROPY, INTERP)
        else:
            xe, xo = _split_pair(raw, temperature, inv_t, HAS_T, FMA)
            m, s, s2, w, w2 = _tile_update_pairs(xe, xo, m, s, s2, w, w2, FMA, ENTROPY, INTERP)
    else:
        x = _scale(raw.to(tl.float32), temperature, inv_t, HAS_T, FMA)  # exact upcast, then x / T
        m, s, w = _tile_update(x, m, s, w, FMA, ENTROPY, INTERP)
    return m, s, s2, w, w2


@triton.jit
def _pairs_partial(words, n_full, V: tl.constexpr, HALF: tl.constexpr, temperature, inv_t,
                   HAS_T: tl.constexpr, FMA: tl.constexpr):  # fmt: skip
    """The last, partial tile as (even, odd) columns, padded with -inf (V is even)."""
    wc = n_full * HALF + tl.arange(0, HALF)
    wd = tl.load(words + wc, mask=wc < V // 2, other=NEG_INF_PAIR)
    return _split_pair(wd, temperature, inv_t, HAS_T, FMA)


@triton.jit
def _row_stats(
    row_ptr,
    V: tl.constexpr,
    temperature,
    inv_t,
    HAS_T: tl.constexpr,
    TILE: tl.constexpr,
    LOG2_TILE: tl.constexpr,
    FMA: tl.constexpr,
    ENTROPY: tl.constexpr,
    UNROLL: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    INTERP: tl.constexpr,
    PAIRS: tl.constexpr = False,
    PACKED: tl.constexpr = False,
):
    """(M, log S in fp64, S, W) of one row under the contract. UNROLL = 2 issues the loads of two tiles
    before reducing them (more bytes in flight); the tiles are still reduced one after the other.
    NUM_STAGES > 1 has Triton pipeline the loop's loads (the next tiles arrive during this one's math).
    PAIRS: bf16 rows read as 32-bit words (4-byte aligned row, V even; see NEG_INF_PAIR), lanes split
    even / odd; PACKED: with PAIRS and T == 1, the tile max / min from packed bf16x2 reductions (see
    _tile_update_packed)."""
    # -inf, but not a compile-time constant: with a constant, LLVM's optimizer of rows of a single tile
    # (V <= TILE) ran for minutes (Triton 3.6). temperature * 0.0 is 0.0 at run time (T > 0 finite).
    m = tl.full([], float("-inf"), tl.float32) + temperature * 0.0
    LW: tl.constexpr = TILE // 2 if PAIRS else TILE  # lanes per tensor (two tensors with PAIRS)
    if PAIRS:
        ptr = row_ptr.to(tl.pointer_type(tl.int32))
    else:
        ptr = row_ptr
    lanes = tl.arange(0, LW)
    s = tl.zeros([LW], tl.float32)
    s2 = tl.zeros([LW], tl.float32)
    w = tl.zeros([LW], tl.float32)
    w2 = tl.zeros([LW], tl.float32)
    n_full: tl.constexpr = V // TILE
    if UNROLL == 2:
        n_pairs: tl.constexpr = n_full // 2
        for it in tl.range(0, n_pairs, num_stages=NUM_STAGES):  # full tiles: no bounds mask
            r0 = tl.load(ptr + (2 * it) * LW + lanes)
            r1 = tl.load(ptr + (2 * it + 1) * LW + lanes)
            m, s, s2, w, w2 = _tile_step(r0, m, s, s2, w, w2, temperature, inv_t, HAS_T, FMA, ENTROPY, INTERP,
                                         PAIRS, PACKED)  # fmt: skip
            m, s, s2, w, w2 = _tile_step(r1, m, s, s2, w, w2, temperature, inv_t, HAS_T, FMA, ENTROPY, INTERP,
                                         PAIRS, PACKED)  # fmt: skip
        if n_full % 2 == 1:
            r = tl.load(ptr + (n_full - 1) * LW + lanes)
            m, s, s2, w, w2 = _tile_step(r, m, s, s2, w, w2, temperature, inv_t, HAS_T, FMA, ENTROPY, INTERP,
                                         PAIRS, PACKED)  # fmt: skip
    else:
        for it in tl.range(0, n_full, num_stages=NUM_STAGES):
            r = tl.load(ptr + it * LW + lanes)
            m, s, s2, w, w2 = _tile_step(r, m, s, s2, w, w2, temperature, inv_t, HAS_T, FMA, ENTROPY, INTERP,
                                         PAIRS, PACKED)  # fmt: skip
    return _row_end(row_ptr, m, s, s2, w, w2, V, temperature, inv_t, HAS_T, TILE, LOG2_TILE, FMA, ENTROPY,
                    INTERP, PAIRS)  # fmt: skip


@triton.jit
def _row_end(base, m, s, s2, w, w2, V: tl.constexpr, temperature, inv_t, HAS_T: tl.constexpr,
             TILE: tl.constexpr, LOG2_TILE: tl.constexpr, FMA: tl.constexpr, ENTROPY: tl.constexpr,
             INTERP: tl.constexpr, PAIRS: tl.constexpr):  # fmt: skip
    """The end of one row's pass after its full tiles (state as in :func:`_tile_step`): its partial
    tile (if any), the lane tree and log S. Returns (M, log S in fp64, S, W)."""
    n_full: tl.constexpr = V // TILE
    if PAIRS:
        if n_full * TILE < V:
            words = base.to(tl.pointer_type(tl.int32))
            xe, xo = _pairs_partial(words, n_full, V, TILE // 2, temperature, inv_t, HAS_T, FMA)
            m, s, s2, w, w2 = _tile_update_pairs(xe, xo, m, s, s2, w, w2, FMA, ENTROPY, INTERP)
        s_tot = _tree_sum(s + s2, TILE // 2, LOG2_TILE - 1)  # level 1 of the lane tree, then the others
        if ENTROPY:
            w_tot = _tree_sum(w + w2, TILE // 2, LOG2_TILE - 1)
        else:
            w_tot = 0.0
    else:
        if n_full * TILE < V:  # the last, partial tile: padding is -inf (contributes exp_c(-86) ~ 0)
            cols = n_full * TILE + tl.arange(0, TILE)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            x = _scale(x, temperature, inv_t, HAS_T, FMA)
            m, s, w = _tile_update(x, m, s, w, FMA, ENTROPY, INTERP)
        s_tot = _tree_sum(s, TILE, LOG2_TILE)
        if ENTROPY:
            w_tot = _tree_sum(w, TILE, LOG2_TILE)
        else:
            w_tot = 0.0
    return m, _log_f64(s_tot), s_tot, w_tot


@triton.jit
def _logp_of(xt, m, log_s):
    """The contract's logprob of the (scaled) action logit ``xt``; NaN unless M is finite."""
    # fp32 -> fp64 casts are exact; the difference of two fp32 is exact in fp64 (for |xt|, |m| within
    # 2^29 of each other), so the only rounding is the final one to fp32
    logp = ((xt.to(tl.float64) - m.to(tl.float64)) - log_s).to(tl.float32)
    ok = (m > float("-inf")) & (m < float("inf"))  # False for NaN too
    return tl.where(ok, logp, float("nan")), ok


@triton.jit
def _store_policy(row, logp, ok, m, log_s, s_tot, w_tot, old, LOGP, RATIO, ENT, LSE,
                  HAS_OLD: tl.constexpr, ENTROPY: tl.constexpr, FMA: tl.constexpr):  # fmt: skip
    """LOGP, LSE, RATIO and ENT of one live row (``old``: the rollout's logprob, unused without HAS_OLD)."""
    tl.store(LOGP + row, logp)
    tl.store(LSE + row, tl.where(ok, (m.to(tl.float64) + log_s).to(tl.float32), float("nan")))
    if HAS_OLD:
        ratio = _exp_any(logp - old, FMA)
    else:
        ratio = _exp_any(logp - logp, FMA)
    tl.store(RATIO + row, ratio)
    if ENTROPY:
        # H = log S - sum e_i (xs_i - M) / S, in fp64 from the fp32 lane sums.
        ent = (log_s - w_tot.to(tl.float64) / s_tot.to(tl.float64)).to(tl.float32)
        tl.store(ENT + row, tl.where(ok, ent, float("nan")))
    else:
        tl.store(ENT + row, 0.0)


@triton.jit
def _kl_of(logp, ref, KL_MODE: tl.constexpr, FMA: tl.constexpr):
    if KL_MODE == 1:
        kl = logp - ref
    elif KL_MODE == 2:
        d = ref - logp
        kl = (d * d) * 0.5
    else:
        kl = _k3(ref - logp, FMA)
    return kl


@triton.jit
def _store_masked(row, LOGP, RATIO, KL, ENT, LSE):
    """Neutral outputs of a masked row."""
    tl.store(LOGP + row, 0.0)
    tl.store(RATIO + row, 1.0)
    tl.store(KL + row, 0.0)
    tl.store(ENT + row, 0.0)
    tl.store(LSE + row, 0.0)


# ====================================================================================================
# Triton: kernels
# ====================================================================================================
@triton.jit
def _policy_fwd_row(
    row,  # int64
    X, x_sb, x_sl, R, r_sb, r_sl, IDS, OLD, REF_LP, MASK, LOGP, RATIO, KL, ENT, LSE,
    L, V: tl.constexpr, temperature, inv_t,
    HAS_T: tl.constexpr, HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr, REF_MODE: tl.constexpr,
    KL_MODE: tl.constexpr, ENTROPY: tl.constexpr, TILE: tl.constexpr, LOG2_TILE: tl.constexpr,
    FMA: tl.constexpr, UNROLL: tl.constexpr, NUM_STAGES: tl.constexpr, INTERP: tl.constexpr,
    PAIRS: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """Every output of one row."""
    masked = False
    if HAS_MASK:
        masked = tl.load(MASK + row) == 0
    if masked:  # neutral outputs; the action id is not read
        _store_masked(row, LOGP, RATIO, KL, ENT, LSE)
    else:
        _policy_fwd_live_row(
            row, X, x_sb, x_sl, R, r_sb, r_sl, IDS, OLD, REF_LP, LOGP, RATIO, KL, ENT, LSE,
            L, V, temperature, inv_t, HAS_T, HAS_OLD, REF_MODE, KL_MODE, ENTROPY, TILE, LOG2_TILE,
            FMA, UNROLL, NUM_STAGES, INTERP, PAIRS, PACKED,
        )  # fmt: skip


@triton.jit
def _policy_fwd_live_row(
    row,
    X, x_sb, x_sl, R, r_sb, r_sl, IDS, OLD, REF_LP, LOGP, RATIO, KL, ENT, LSE,
    L, V: tl.constexpr, temperature, inv_t,
    HAS_T: tl.constexpr, HAS_OLD: tl.constexpr, REF_MODE: tl.constexpr,
    KL_MODE: tl.constexpr, ENTROPY: tl.constexpr, TILE: tl.constexpr, LOG2_TILE: tl.constexpr,
    FMA: tl.constexpr, UNROLL: tl.constexpr, NUM_STAGES: tl.constexpr, INTERP: tl.constexpr,
    PAIRS: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    b = row // L
    li = row - b * L
    tok = tl.load(IDS + row)  # int64, validated on the host
    x_row = X + (b * x_sb + li * x_sl)  # int64 offsets: N * V may exceed 2^31
    # The per-row scalars are loaded before the tile loop, which hides their latency (the action's logit
    # is a DRAM access: the row streamed through L2 long before the loop ends).
    xt = _load_scaled(x_row + tok, temperature, inv_t, HAS_T, FMA)
    if HAS_OLD:
        old = tl.load(OLD + row)
    else:
        old = 0.0  # unused
    if REF_MODE == 1:
        r_row = R + (b * r_sb + li * r_sl)
        rxt = _load_scaled(r_row + tok, temperature, inv_t, HAS_T, FMA)
    elif REF_MODE == 2:
        ref = tl.load(REF_LP + row)
    m, log_s, s_tot, w_tot = _row_stats(
        x_row, V, temperature, inv_t, HAS_T, TILE, LOG2_TILE, FMA, ENTROPY, UNROLL, NUM_STAGES, INTERP, PAIRS,
        PACKED,
    )  # fmt: skip
    logp, ok = _logp_of(xt, m, log_s)
    _store_policy(row, logp, ok, m, log_s, s_tot, w_tot, old, LOGP, RATIO, ENT, LSE, HAS_OLD, ENTROPY, FMA)
    if REF_MODE != 0:
        if REF_MODE == 1:
            rm, rlog_s, _rs, _rw = _row_stats(
                r_row, V, temperature, inv_t, HAS_T, TILE, LOG2_TILE, FMA, False, UNROLL, NUM_STAGES, INTERP,
                PAIRS, PACKED,
            )  # fmt: skip
            ref, _rok = _logp_of(rxt, rm, rlog_s)
            tl.store(REF_LP + row, ref)  # saved for the backward
        tl.store(KL + row, _kl_of(logp, ref, KL_MODE, FMA))
    else:
        tl.store(KL + row, 0.0)


@triton.jit
def _policy_fwd_kernel(
    X, x_sb, x_sl,  # policy logits and the strides (elements) of their [B, L, V] view
    R, r_sb, r_sl,  # reference logits (REF_MODE == 1)
    IDS, OLD, REF_LP, MASK,  # per-token inputs [N]
    LOGP, RATIO, KL, ENT, LSE,  # per-token outputs [N] (fp32)
    N, L, V: tl.constexpr, temperature, inv_t,
    TEMPS, INV_TS,  # ROW_T: per-row fp32 T and RN(1 / T) [N] (else unused)
    HAS_T: tl.constexpr, HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr, REF_MODE: tl.constexpr,
    KL_MODE: tl.constexpr, ENTROPY: tl.constexpr, TILE: tl.constexpr, LOG2_TILE: tl.constexpr,
    FMA: tl.constexpr, UNROLL: tl.constexpr, NUM_STAGES: tl.constexpr,
    ROWS_LOOP: tl.constexpr,  # program p handles rows p, p + grid, ... (else: row p only)
    N_ITERS: tl.constexpr,  # ROWS_LOOP under the interpreter: ceil(N / grid) (else 0)
    INTERP: tl.constexpr,
    PAIRS: tl.constexpr = False,  # bf16 logits read as 32-bit words (see NEG_INF_PAIR)
    PACKED: tl.constexpr = False,  # with PAIRS and T == 1: packed tile max / min (_tile_update_packed)
    ROW_T: tl.constexpr = False,  # each row's own temperature (TEMPS, INV_TS): HAS_T where its T != 1
):  # fmt: skip
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # ROWS_LOOP: rows pid, pid + nprog, ... (the interpreter's scalars cannot bound a range() (numpy 2): a
    # counted loop there, rows >= N skipped); else the row pid. (The bound is not assigned to a name: the
    # interpreter turns every assigned value into a tensor.)
    for i in range(0, (N_ITERS if INTERP else tl.cdiv(N - pid, nprog)) if ROWS_LOOP else 1):
        row = pid + i * nprog
        valid = True
        if INTERP:
            valid = row < N
        if valid:
            r64 = row.to(tl.int64)
            t_row = temperature
            inv_row = inv_t
            if ROW_T:  # the contract per row: x / T, skipped where T == 1 (a uniform branch)
                t_row = tl.load(TEMPS + r64)
                inv_row = tl.load(INV_TS + r64)
            # HAS_T is a constexpr: a row whose T is 1 needs the variant without the division (it would
            # turn a -0.0 logit into +0.0). Without ROW_T the first operand ends the test at compile time.
            if ROW_T and t_row == 1.0:
                _policy_fwd_row(
                    r64, X, x_sb, x_sl, R, r_sb, r_sl, IDS, OLD, REF_LP, MASK, LOGP, RATIO, KL, ENT, LSE,
                    L, V, t_row, inv_row, False, HAS_OLD, HAS_MASK, REF_MODE, KL_MODE, ENTROPY,
                    TILE, LOG2_TILE, FMA, UNROLL, NUM_STAGES, INTERP, PAIRS, PACKED,
                )  # fmt: skip
            else:
                _policy_fwd_row(
                    r64, X, x_sb, x_sl, R, r_sb, r_sl, IDS, OLD, REF_LP, MASK, LOGP, RATIO, KL, ENT, LSE,
                    L, V, t_row, inv_row, HAS_T or ROW_T, HAS_OLD, HAS_MASK, REF_MODE, KL_MODE, ENTROPY,
                    TILE, LOG2_TILE, FMA, UNROLL, NUM_STAGES, INTERP, PAIRS, PACKED,
                )  # fmt: skip


@triton.jit
def _stream_step(raw, m, s, s2, w, w2, second, temperature, inv_t, HAS_T: tl.constexpr, FMA: tl.constexpr,
                 ENTROPY: tl.constexpr, INTERP: tl.constexpr, PAIRS: tl.constexpr, PACKED: tl.constexpr,
                 PASSES: tl.constexpr):  # fmt: skip
    """:func:`_tile_step` of the stream kernel: ``second`` (the reference pass) takes no entropy."""
    if ENTROPY and PASSES == 2:
        if second:
            m, s, s2, w, w2 = _tile_step(raw, m, s, s2, w, w2, temperature, inv_t, HAS_T, FMA, False, INTERP,
                                         PAIRS, PACKED)  # fmt: skip
        else:
            m, s, s2, w, w2 = _tile_step(raw, m, s, s2, w, w2, temperature, inv_t, HAS_T, FMA, True, INTERP,
                                         PAIRS, PACKED)  # fmt: skip
    else:
        m, s, s2, w, w2 = _tile_step(raw, m, s, s2, w, w2, temperature, inv_t, HAS_T, FMA, ENTROPY, INTERP,
                                     PAIRS, PACKED)  # fmt: skip
    return m, s, s2, w, w2


@triton.jit
def _stream_row_end(base, m, s, s2, w, w2, second, V: tl.constexpr, temperature, inv_t, HAS_T: tl.constexpr,
                    TILE: tl.constexpr, LOG2_TILE: tl.constexpr, FMA: tl.constexpr, ENTROPY: tl.constexpr,
                    INTERP: tl.constexpr, PAIRS: tl.constexpr, PASSES: tl.constexpr):  # fmt: skip
    """:func:`_row_end` of the stream kernel: ``second`` (the reference pass) takes no entropy."""
    if ENTROPY and PASSES == 2:
        if second:
            m, log_s, s_tot, w_tot = _row_end(base, m, s, s2, w, w2, V, temperature, inv_t, HAS_T, TILE,
                                              LOG2_TILE, FMA, False, INTERP, PAIRS)  # fmt: skip
        else:
            m, log_s, s_tot, w_tot = _row_end(base, m, s, s2, w, w2, V, temperature, inv_t, HAS_T, TILE,
                                              LOG2_TILE, FMA, True, INTERP, PAIRS)  # fmt: skip
    else:
        m, log_s, s_tot, w_tot = _row_end(base, m, s, s2, w, w2, V, temperature, inv_t, HAS_T, TILE,
                                          LOG2_TILE, FMA, ENTROPY, INTERP, PAIRS)  # fmt: skip
    return m, log_s, s_tot, w_tot


@triton.jit
def _row_offsets(row64, L, x_sb, x_sl, r_sb, r_sl, UNIFORM: tl.constexpr):
    """Element offsets of a row of the logits and of the reference logits."""
    if UNIFORM:
        return row64 * x_sl, row64 * r_sl
    else:
        b = row64 // L
        li = row64 - b * L
        return b * x_sb + li * x_sl, b * r_sb + li * r_sl


@triton.jit
def _row_id(row, N, IDS, MASK, HAS_MASK: tl.constexpr):
    """(live, action id) of a row for the stream kernel: live = row < N and unmasked; the id is read for
    live rows only (0 elsewhere)."""
    ok = row < N
    if HAS_MASK:
        ok = ok & (tl.load(MASK + row, mask=ok, other=0) != 0)
    return ok, tl.load(IDS + row, mask=ok, other=0)


@triton.jit
def _row_inputs(row, ok, tok, L, X, x_sb, x_sl, R, r_sb, r_sl, OLD, REF_LP, HAS_OLD: tl.constexpr,
                REF_MODE: tl.constexpr, UNIFORM: tl.constexpr):  # fmt: skip
    """A row's per-token inputs for the stream kernel's tail, given its :func:`_row_id`: (action logit,
    reference logit, old logprob, reference logprob), raw; zeros where unused or not ``ok``."""
    x_off, r_off = _row_offsets(row.to(tl.int64), L, x_sb, x_sl, r_sb, r_sl, UNIFORM)
    xt = tl.load(X + x_off + tok, mask=ok, other=0.0)
    if REF_MODE == 1:
        rxt = tl.load(R + r_off + tok, mask=ok, other=0.0)
    else:
        rxt = xt
    if HAS_OLD:
        old = tl.load(OLD + row, mask=ok, other=0.0)
    else:
        old = 0.0
    if REF_MODE == 2:
        ref = tl.load(REF_LP + row, mask=ok, other=0.0)
    else:
        ref = 0.0
    return xt, rxt, old, ref


@triton.jit
def _policy_fwd_stream_kernel(
    X, x_sb, x_sl, R, r_sb, r_sl, IDS, OLD, REF_LP, MASK, LOGP, RATIO, KL, ENT, LSE,
    N, L, V: tl.constexpr, temperature, inv_t,
    HAS_T: tl.constexpr, HAS_OLD: tl.constexpr, HAS_MASK: tl.constexpr, REF_MODE: tl.constexpr,
    KL_MODE: tl.constexpr, ENTROPY: tl.constexpr, TILE: tl.constexpr, LOG2_TILE: tl.constexpr,
    FMA: tl.constexpr, NUM_STAGES: tl.constexpr,
    PAIRS: tl.constexpr,  # bf16 logits read as 32-bit words (see NEG_INF_PAIR)
    PACKED: tl.constexpr,  # with PAIRS and T == 1: packed tile max / min (_tile_update_packed)
    UNIFORM: tl.constexpr,  # row r starts at r * x_sl (and r * r_sl): no division by L
    N_STEPS: tl.constexpr,  # under the interpreter: ceil(N / grid) * NTR loop steps (else 0)
    INTERP: tl.constexpr,
):  # fmt: skip
    """The forward as a stream of tiles (``FwdLaunch.stream``): a persistent grid, program p handles rows
    p, p + G, p + 2G, ... (G programs), and ONE loop runs over all of its (row, pass, tile) steps -- pass 1
    being the reference logits' row with REF_MODE == 1. Each row still runs the contract's steps in order
    (its tiles left to right, then the partial tile, lane tree and fp64 log at its last full tile), so the
    bits are those of :func:`_policy_fwd_kernel`. What changes is the schedule: the software pipeline
    (NUM_STAGES) issues the loads of the next row's first tiles while this row's last tiles and its
    per-row tail run, so no row waits for DRAM at its start; the tail loads the next row's per-token
    inputs (action logit, old / reference logprob), a whole row before they are used, from the action id
    it loaded one row earlier still (so that no load of the tail waits for another), and the steady-state
    step does nothing but its tile. Needs V >= TILE (a full tile per row); masked rows' tiles are neither
    read (predicated loads) nor reduced."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    NT: tl.constexpr = V // TILE  # full tiles per row (>= 1)
    PASSES: tl.constexpr = 2 if REF_MODE == 1 else 1
    NTR: tl.constexpr = NT * PASSES  # loop steps per row
    LW: tl.constexpr = TILE // 2 if PAIRS else TILE  # lanes per tensor (two tensors with PAIRS)
    lanes = tl.arange(0, LW)
    neg_inf = tl.full([], float("-inf"), tl.float32) + temperature * 0.0  # see _row_stats
    m = neg_inf
    s = tl.zeros([LW], tl.float32)
    s2 = tl.zeros([LW], tl.float32)
    w = tl.zeros([LW], tl.float32)
    w2 = tl.zeros([LW], tl.float32)
    lp0 = tl.zeros([], tl.float32)  # PASSES == 2: the policy logp, carried to the reference pass
    # the per-token inputs of the program's first row, and the id of its second
    ok_c, tok_c = _row_id(pid, N, IDS, MASK, HAS_MASK)
    xt_c, rxt_c, old_c, ref_c = _row_inputs(
        pid, ok_c, tok_c, L, X, x_sb, x_sl, R, r_sb, r_sl, OLD, REF_LP, HAS_OLD, REF_MODE, UNIFORM
    )
    ok_n, tok_n = _row_id(pid + nprog, N, IDS, MASK, HAS_MASK)
    # (the interpreter's scalars cannot bound a range() (numpy 2): a counted loop there, rows >= N skipped)
    for i in tl.range(0, N_STEPS if INTERP else tl.cdiv(N - pid, nprog) * NTR, num_stages=NUM_STAGES):
        j = i // NTR
        t = i - j * NTR
        row = pid + j * nprog
        x_off, r_off = _row_offsets(row.to(tl.int64), L, x_sb, x_sl, r_sb, r_sl, UNIFORM)
        if PASSES == 2:
            second = t >= NT
            tp = tl.where(second, t - NT, t)  # the tile within the pass
            base = tl.where(second, R + r_off, X + x_off)  # same dtype (checked by the launcher)
        else:
            second = False
            tp = t
            base = X + x_off
        if PAIRS:
            ptrs = base.to(tl.pointer_type(tl.int32)) + (tp * LW + lanes)
        else:
            ptrs = base + (tp * TILE + lanes)
        live = True
        if HAS_MASK:
            live = tl.load(MASK + row, mask=row < N, other=0) != 0
        elif INTERP:
            live = row < N
        if HAS_MASK or INTERP:
            raw = tl.load(ptrs, mask=live, cache_modifier=".cg")  # a masked row's tiles are not read
        else:
            raw = tl.load(ptrs, cache_modifier=".cg")
        if live:
            m, s, s2, w, w2 = _stream_step(raw, m, s, s2, w, w2, second, temperature, inv_t, HAS_T, FMA,
                                           ENTROPY, INTERP, PAIRS, PACKED, PASSES)  # fmt: skip
        if tp == NT - 1:  # the pass's last full tile: the pass's tail
            last = t == NTR - 1
            if last:  # the next row's inputs, issued first: their latency hides under this tail and row
                xt_n, rxt_n, old_n, ref_n = _row_inputs(
                    row + nprog, ok_n, tok_n, L, X, x_sb, x_sl, R, r_sb, r_sl, OLD, REF_LP, HAS_OLD, REF_MODE,
                    UNIFORM,
                )  # fmt: skip
                ok_n, tok_n = _row_id(row + 2 * nprog, N, IDS, MASK, HAS_MASK)  # the row after that's id
            else:
                xt_n, rxt_n, old_n, ref_n = xt_c, rxt_c, old_c, ref_c
            if live:
                m, log_s, s_tot, w_tot = _stream_row_end(
                    base, m, s, s2, w, w2, second, V, temperature, inv_t, HAS_T, TILE, LOG2_TILE, FMA,
                    ENTROPY, INTERP, PAIRS, PASSES,
                )  # fmt: skip
                if second:  # the reference pass (PASSES == 2; else a constant False): the reference logprob
                    rxt = _scale(rxt_c.to(tl.float32), temperature, inv_t, HAS_T, FMA)  # exact upcast, x / T
                    ref, _rok = _logp_of(rxt, m, log_s)
                    tl.store(REF_LP + row, ref)  # saved for the backward
                    tl.store(KL + row, _kl_of(lp0, ref, KL_MODE, FMA))
                else:
                    lp, ok = _logp_of(_scale(xt_c.to(tl.float32), temperature, inv_t, HAS_T, FMA), m, log_s)
                    _store_policy(
                        row, lp, ok, m, log_s, s_tot, w_tot, old_c, LOGP, RATIO, ENT, LSE, HAS_OLD,
                        ENTROPY, FMA,
                    )  # fmt: skip
                    if PASSES == 2:
                        lp0 = lp  # the KL waits for the reference pass
                    elif REF_MODE == 2:
                        tl.store(KL + row, _kl_of(lp, ref_c, KL_MODE, FMA))
                    else:
                        tl.store(KL + row, 0.0)
            elif row < N:  # a masked row: neutral outputs, once
                if t < NT:
                    _store_masked(row, LOGP, RATIO, KL, ENT, LSE)
            xt_c, rxt_c, old_c, ref_c = xt_n, rxt_n, old_n, ref_n
            # the next pass starts from the contract's initial state (reset here, in the tail's branch: a
            # reset at a pass's first tile would be if-converted into a select per lane at every tile)
            m = neg_inf
            s = tl.zeros([LW], tl.float32)
            if PAIRS:
                s2 = tl.zeros([LW], tl.float32)
            if ENTROPY:
                w = tl.zeros([LW], tl.float32)
                if PAIRS:
                    w2 = tl.zeros([LW], tl.float32)


@triton.jit
def _bwd_block(x, lse, inv_t, gs, ghs, ent, HAS_T: tl.constexpr, HAS_G_ENT: tl.constexpr):
    """d loss / d x_i without the action's one-hot term: -p_i (g + gH (log p_i + H)) / T."""
    if HAS_T:
        x = x * inv_t  # not the forward's IEEE division: gradients are not part of the contract
    lp = x - lse
    p = tl.exp2(lp * LOG2E)  # hardware ex2.approx; 0 for x = -inf
    if HAS_G_ENT:
        return p * -(gs + ghs * (lp + ent))
    else:
        return p * -gs


@triton.jit
def _policy_bwd_kernel(
    X, x_sb, x_sl,  # policy logits
    DX, dx_sb, dx_sl,  # dlogits (may alias X: in-place backward)
    IDS, MASK, LSE, LOGP, RATIO, REF_LP, ENT,  # saved by the forward [N]
    G_LOGP, G_RATIO, G_KL, G_ENT,  # upstream gradients [N]
    L, V: tl.constexpr, inv_t,
    HAS_T: tl.constexpr, HAS_MASK: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_RATIO: tl.constexpr,
    HAS_G_KL: tl.constexpr, KL_MODE: tl.constexpr, HAS_G_ENT: tl.constexpr,
    BLOCK: tl.constexpr, FMA: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    li = row - b * L
    dx_row = DX + (b * dx_sb + li * dx_sl)
    lanes = tl.arange(0, BLOCK)
    if HAS_MASK:
        if tl.load(MASK + row) == 0:  # masked rows: exactly zero gradient, logits not read
            for start in range(0, V, BLOCK):
                cols = start + lanes
                tl.store(dx_row + cols, tl.zeros([BLOCK], tl.float32).to(DX.dtype.element_ty), mask=cols < V)
            return
    x_row = X + (b * x_sb + li * x_sl)
    tok = tl.load(IDS + row)
    lse = tl.load(LSE + row)
    logp = tl.load(LOGP + row)
    # dLoss/dlogp from every per-token output that depends on it.
    g = 0.0
    if HAS_G_LOGP:
        g += tl.load(G_LOGP + row)
    if HAS_G_RATIO:
        g += tl.load(G_RATIO + row) * tl.load(RATIO + row)  # d ratio / d logp = ratio
    if HAS_G_KL:
        ref = tl.load(REF_LP + row)
        if KL_MODE == 1:
            dkl = 1.0
        elif KL_MODE == 2:
            dkl = logp - ref
        else:
            dkl = 1.0 - _exp_any(ref - logp, FMA)
        g += tl.load(G_KL + row) * dkl
    # d/dxs_i: logp -> g (onehot_i - p_i); entropy -> -gH p_i (log p_i + H); then dxs/dx = 1/T.
    gs = g * inv_t
    if HAS_G_ENT:
        ghs = tl.load(G_ENT + row) * inv_t
        ent = tl.load(ENT + row)
    else:
        ghs = 0.0
        ent = 0.0
    xt = tl.load(x_row + tok).to(tl.float32)  # read before the loop: DX may alias X
    n_full: tl.constexpr = V // BLOCK
    for it in range(0, n_full):  # full blocks: no bounds mask
        cols = it * BLOCK + lanes
        x = tl.load(x_row + cols).to(tl.float32)
        dx = _bwd_block(x, lse, inv_t, gs, ghs, ent, HAS_T, HAS_G_ENT)
        tl.store(dx_row + cols, dx.to(DX.dtype.element_ty))  # one rounding to the logits' dtype (rn)
    if n_full * BLOCK < V:
        cols = n_full * BLOCK + lanes
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        dx = _bwd_block(x, lse, inv_t, gs, ghs, ent, HAS_T, HAS_G_ENT)
        tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=cols < V)
    # The action's column also gets +g/T. Same formula as the loop, then one store after a barrier,
    # which orders it after the loop's store of that column by another thread of this program.
    dxt = _bwd_block(xt, lse, inv_t, gs, ghs, ent, HAS_T, HAS_G_ENT) + gs
    tl.debug_barrier()
    tl.store(dx_row + tok, dxt.to(DX.dtype.element_ty))


# ====================================================================================================
# Launchers
# ====================================================================================================
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or _interpreting()


def _fma_mode(fma: bool) -> int:
    if not fma:
        return _FMA_OFF
    return _FMA_EMULATED if _interpreting() else _FMA_NATIVE


@functools.lru_cache(maxsize=64)
def _fp32_scalar_of(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


@functools.lru_cache(maxsize=64)
def _fp32_inverse_of(t32: float) -> float:
    one = torch.ones((), dtype=torch.float32)
    return float(one / torch.tensor(t32, dtype=torch.float32))


def _fp32_scalar(value: float) -> float:
    """A Python float rounded to fp32 (how SGLang and token_logprobs hold temperatures). Memoised per
    value: every launch needs it, and it costs a few CPU tensor ops."""
    return _fp32_scalar_of(float(value))


def _fp32_inverse(t32: float) -> float:
    """RN32(1 / t32): IEEE fp32 division (a double 1/t rounded to fp32 could round twice). Memoised."""
    return _fp32_inverse_of(float(t32))


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(x with unit last stride, L, stride_b, stride_l) so that row r lives at (r // L, r % L)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x, max(x.shape[0], 1), 0, x.stride(0)
    if x.dim() == 3:
        return x, max(x.shape[1], 1), x.stride(0), x.stride(1)
    x = x.reshape(-1, x.shape[-1])
    return x, max(x.shape[0], 1), 0, x.stride(0)


def _flat(t: torch.Tensor | None, n: int, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected one per token ({n})")
    return t.reshape(n).to(dtype).contiguous()


def _raise_bad_id(lo: int, hi: int, vocab: int) -> None:
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"action id {bad} outside [0, {vocab}) on an unmasked token")


def _start_id_check(ids: torch.Tensor, mask: torch.Tensor | None, vocab: int):
    """Check the unmasked ids without stalling the launch: ``(ids for the kernels, finish)``.

    One min/max reduction over the unmasked ids, never a silent clamp: ``finish()`` raises
    ``ValueError`` if one lies outside ``[0, V)``. On a GPU the two results come back by an
    asynchronous copy, and ``finish()`` (called once the kernels are queued) waits only for that copy:
    the host sync no longer leaves the GPU idle while the forward kernel is being launched. Until then
    the kernels must never read out of bounds, so they get the ids clamped into ``[0, V)`` (the same ids
    wherever the check passes; masked rows' ids are never read)."""
    if ids.numel() == 0:
        return ids, lambda: None
    live = ids if mask is None else torch.where(mask, ids, 0)
    lohi = torch.stack(torch.aminmax(live))
    if not lohi.is_cuda:
        lo, hi = lohi.tolist()
        _raise_bad_id(lo, hi, vocab)
        return ids, lambda: None
    host = torch.empty(2, dtype=lohi.dtype, pin_memory=True)
    host.copy_(lohi, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    safe = ids.clamp(0, max(vocab - 1, 0))

    def finish() -> None:
        copied.synchronize()
        _raise_bad_id(*host.tolist(), vocab)

    return safe, finish


def _check_tile(tile: int) -> int:
    log2 = int(tile).bit_length() - 1
    if tile < 2 or (1 << log2) != tile:
        raise ValueError(f"tile must be a power of two >= 2, got {tile}")
    return log2


def _row_temperatures(temperature: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row temperatures (N fp32 values in any shape, as SGLang's ``[B, 1]``) as ``[N]``; ValueError
    otherwise. Only shape and dtype are read: the host never waits for the values."""
    if temperature.numel() != n or temperature.dtype != torch.float32:
        raise ValueError(
            f"per-row temperatures: {temperature.numel()} {temperature.dtype} values for {n} rows (fp32)"
        )
    return temperature.reshape(-1)


def _row_inverses(temps: torch.Tensor) -> torch.Tensor:
    """RN32(1 / T) per row: IEEE fp32 division on the device, as :func:`_fp32_inverse` on the host."""
    return torch.ones_like(temps) / temps


def _forward(
    logits, ids, old, mask, ref_logits, ref_lp, temperature, kl_mode, entropy, tile, fma, launch=None
):
    """Launch the forward kernel. Returns (logp, ratio, kl, ent, lse, ref_lp), each [N] fp32.

    ``temperature``: a float, or an fp32 tensor of one temperature per row (N values in any shape, as
    SGLang's ``[B, 1]``): each row then scales by its own T (skipped where T == 1), without the host
    seeing the values (the row kernel, whatever ``launch`` says about streaming).
    ``launch``: a :class:`FwdLaunch` (default: ``FWD_LAUNCH[v_class(V)]``); it never changes a bit."""
    x, L, x_sb, x_sl = _rows(logits)
    V = x.shape[-1]
    n = ids.numel()
    dev = x.device
    logp, ratio, kl, ent, lse = (_empty(n, dtype=torch.float32, device=dev) for _ in range(5))
    if ref_logits is not None:
        r, _rl, r_sb, r_sl = _rows(ref_logits)
        ref_mode = 1
        ref_lp = _empty(n, dtype=torch.float32, device=dev)
    else:
        r, r_sb, r_sl = x, 0, 0
        ref_mode = 2 if ref_lp is not None else 0
    if n == 0:
        return logp, ratio, kl, ent, lse, ref_lp
    dummy = logp
    row_t = isinstance(temperature, torch.Tensor)
    if row_t:
        temps = _row_temperatures(temperature, n).to(dev).contiguous()
        inv_ts = _row_inverses(temps)
        t32 = 1.0  # (unused: every row loads its own)
    else:
        t32 = _fp32_scalar(temperature)
        temps = inv_ts = dummy
    cfg = (launch if launch is not None else FWD_LAUNCH[v_class(V)]).validate()
    pairs = cfg.pairs and _pairs_ok(x, x_sb, x_sl, V) and (ref_mode != 1 or _pairs_ok(r, r_sb, r_sl, V))
    args = (
        x, x_sb, x_sl, r, r_sb, r_sl,
        ids, old if old is not None else dummy, ref_lp if ref_lp is not None else dummy,
        mask.view(torch.uint8) if mask is not None else dummy,
        logp, ratio, kl, ent, lse,
        n, L, V, t32, _fp32_inverse(t32),
    )  # fmt: skip
    flags = dict(
        HAS_T=t32 != 1.0, HAS_OLD=old is not None, HAS_MASK=mask is not None, REF_MODE=ref_mode,
        KL_MODE=kl_mode, ENTROPY=bool(entropy), TILE=tile, LOG2_TILE=_check_tile(tile), FMA=_fma_mode(fma),
        NUM_STAGES=cfg.num_stages, PAIRS=pairs, PACKED=pairs and cfg.packed, INTERP=_interpreting(),
        num_warps=cfg.num_warps,
        enable_fp_fusion=False,
    )  # fmt: skip
    if cfg.stream and not row_t and tile <= V and (ref_mode != 1 or r.dtype == x.dtype):
        grid = min(n, cfg.stream * _sm_count(dev))
        uniform = (n <= L or x_sb == L * x_sl) and (ref_mode != 1 or n <= L or r_sb == L * r_sl)
        steps = triton.cdiv(n, grid) * (V // tile) * (2 if ref_mode == 1 else 1)
        _policy_fwd_stream_kernel[(grid,)](
            *args, UNIFORM=uniform, N_STEPS=steps if _interpreting() else 0, **flags
        )
    else:  # (a stream launch where the stream kernel does not apply: its warps, stages and pairs)
        grid = triton.cdiv(n, cfg.rows)
        _policy_fwd_kernel[(grid,)](
            *args, temps, inv_ts, UNROLL=cfg.unroll, ROWS_LOOP=grid < n,
            N_ITERS=triton.cdiv(n, grid) if grid < n and _interpreting() else 0, ROW_T=row_t, **flags,
        )  # fmt: skip
    return logp, ratio, kl, ent, lse, ref_lp


def _pairs_ok(x: torch.Tensor, sb: int, sl: int, vocab: int) -> bool:
    """PAIRS applies: bf16 rows that are sequences of whole 4-byte words (aligned start, even V)."""
    even = vocab % 2 == 0 and sb % 2 == 0 and sl % 2 == 0
    return x.dtype == torch.bfloat16 and even and x.data_ptr() % 4 == 0


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the persistent grid is FwdLaunch.stream per SM); 1
    elsewhere (the interpreter), so that small test batches give programs several rows."""
    return sm_count(device) if device.type == "cuda" else 1


def _backward(logits, ids, mask, lse, logp, ratio, ref_lp, ent, g_logp, g_ratio, g_kl, g_ent, temperature,
              kl_mode, inplace, fma, launch=None):  # fmt: skip
    x, L, x_sb, x_sl = _rows(logits)
    V = x.shape[-1]
    n = ids.numel()
    if inplace and x.data_ptr() == logits.data_ptr() and x.stride() == logits.stride():
        dx, dx_sb, dx_sl = x, x_sb, x_sl
        # A new tensor over the logits' storage, not the saved logits themselves: autograd copies a
        # returned grad that other tensors still reference (the leaf, the saved input) into .grad,
        # a full extra [N, V] read and write; this one it takes as .grad as it is.
        out = logits.detach()
    else:
        out = _empty(logits.shape, dtype=logits.dtype, device=logits.device)
        dx, _dl, dx_sb, dx_sl = _rows(out)
    if n == 0:
        return out
    t32 = _fp32_scalar(temperature)

    def grad(g):
        return g.reshape(n).float().contiguous() if g is not None else lse

    cfg = launch if launch is not None else BWD_LAUNCH[v_class(V)]
    _policy_bwd_kernel[(n,)](
        x, x_sb, x_sl, dx, dx_sb, dx_sl,
        ids, mask.view(torch.uint8) if mask is not None else lse, lse, logp, ratio,
        ref_lp if ref_lp is not None else lse, ent,
        grad(g_logp), grad(g_ratio), grad(g_kl), grad(g_ent),
        L, V, _fp32_inverse(t32),
        HAS_T=t32 != 1.0, HAS_MASK=mask is not None, HAS_G_LOGP=g_logp is not None,
        HAS_G_RATIO=g_ratio is not None, HAS_G_KL=g_kl is not None and kl_mode != 0, KL_MODE=max(kl_mode, 1),
        HAS_G_ENT=g_ent is not None, BLOCK=min(cfg.block, triton.next_power_of_2(V)), FMA=_fma_mode(fma),
        num_warps=cfg.num_warps,
    )  # fmt: skip
    return out


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, ids, old, mask, ref_logits, ref_lp, temperature, kl_mode, entropy, inplace, tile, fma
    ):
        logp, ratio, kl, ent, lse, ref_lp = _forward(
            logits, ids, old, mask, ref_logits, ref_lp, temperature, kl_mode, entropy, tile, fma
        )
        ctx.save_for_backward(logits, ids, mask, lse, logp, ratio, ref_lp, ent)
        ctx.cfg = (temperature, kl_mode, inplace, fma)
        # Outputs the loss does not use get None, not a tensor of zeros: no fill kernels, and the
        # backward kernel's terms for them are compiled out (a zero entropy gradient would still
        # multiply log p, which is -inf for -inf logits: NaN gradients).
        ctx.set_materialize_grads(False)
        if kl_mode == 0:
            ctx.mark_non_differentiable(kl)
        if not entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ratio, kl, ent

    @staticmethod
    def backward(ctx, g_logp, g_ratio, g_kl, g_ent):
        logits, ids, mask, lse, logp, ratio, ref_lp, ent = ctx.saved_tensors
        temperature, kl_mode, inplace, fma = ctx.cfg
        dlogits = None
        if ctx.needs_input_grad[0]:
            dlogits = _backward(
                logits, ids, mask, lse, logp, ratio, ref_lp, ent, g_logp, g_ratio,
                g_kl if kl_mode else None, g_ent, temperature, kl_mode, inplace, fma,
            )  # fmt: skip
        return (dlogits,) + (None,) * 11


# ====================================================================================================
# Public API
# ====================================================================================================
def _check_args(logits, ids, old_logprobs, mask, temperature, ref_logits, ref_logprobs, kl_estimator):
    """The argument checks of :func:`fused_policy_loss` and :func:`policy_loss_reference` (the same
    errors from both). Returns ``(lead shape, V, N)``."""
    if ref_logits is not None and ref_logprobs is not None:
        raise ValueError("give ref_logits or ref_logprobs, not both")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {kl_estimator!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} != logits {tuple(logits.shape)}")
    lead = logits.shape[:-1]
    n = math.prod(lead)
    for name, t in (
        ("ids", ids),
        ("old_logprobs", old_logprobs),
        ("mask", mask),
        ("ref_logprobs", ref_logprobs),
    ):
        if t is not None and t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} elements, expected one per token ({n})")
    return lead, logits.shape[-1], n


def fused_policy_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    ref_logits: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    entropy: bool = False,
    inplace_backward: bool = False,
    validate_ids: bool = True,
) -> PolicyLossOutput:
    """Per-token logp, ratio, KL and entropy from logits, differentiable w.r.t. ``logits`` only.

    ``logits``: ``[N, V]`` or ``[B, L, V]`` (bf16/fp16/fp32, last dim contiguous; other strides free,
    e.g. ``logits[:, :-1]``); ``ids``: int action ids, one per row; ``old_logprobs``: the rollout's
    fp32 logprobs (``None``: ratio against the detached logp itself, i.e. 1); ``mask``: bool, False
    rows are neutral; ``ref_logits`` (same shape as ``logits``) or ``ref_logprobs`` select the KL
    reference (no gradient flows to either); ``kl_estimator``: ``"k1"``/``"k2"``/``"k3"``.
    ``inplace_backward`` writes dlogits over ``logits`` (saves ``N*V`` elements; the logits are
    destroyed). On CUDA (or under ``TRITON_INTERPRET=1``) this runs the Triton kernels, elsewhere the
    plain-PyTorch :func:`policy_loss_reference`; both give the contract's bits. ``validate_ids``: raise
    ``ValueError`` for an unmasked id outside ``[0, V)`` -- one host sync per call, which on a GPU waits
    for a small copy after the forward kernel is queued; ``False`` skips it (ids known to be valid).
    """
    lead, V, n = _check_args(
        logits, ids, old_logprobs, mask, temperature, ref_logits, ref_logprobs, kl_estimator
    )
    ids_f = _flat(ids, n, "ids", torch.int64)
    mask_f = _flat(mask, n, "mask", torch.bool)
    ids_k, finish_check = _start_id_check(ids_f, mask_f, V) if validate_ids else (ids_f, None)
    if not _use_triton(logits):
        if finish_check is not None:
            finish_check()
        out = policy_loss_reference(
            logits, ids, old_logprobs, mask, temperature, ref_logits=ref_logits, ref_logprobs=ref_logprobs,
            kl_estimator=kl_estimator, entropy=entropy,
        )  # fmt: skip
        return out
    kl_mode = KL_ESTIMATORS[kl_estimator] if (ref_logits is not None or ref_logprobs is not None) else 0
    logp, ratio, kl, ent = _FusedPolicyLoss.apply(
        logits, ids_k, _flat(old_logprobs, n, "old_logprobs", torch.float32), mask_f,
        ref_logits.detach() if ref_logits is not None else None,
        _flat(ref_logprobs, n, "ref_logprobs", torch.float32), float(temperature), kl_mode, bool(entropy),
        bool(inplace_backward), CONTRACT_TILE, CONTRACT_FMA,
    )  # fmt: skip
    if finish_check is not None:
        finish_check()  # after the launch: raises for an unmasked id outside [0, V)
    return PolicyLossOutput(
        logp.view(lead),
        ratio.view(lead),
        kl.view(lead) if kl_mode else None,
        ent.view(lead) if entropy else None,
    )


@torch.no_grad()
def fused_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    *,
    check_ids: bool = True,
) -> torch.Tensor:
    """The contract's fp32 logprob of ``ids`` under ``logits / temperature`` (no gradient).

    Triton on CUDA / under the interpreter, :func:`logprobs_reference` elsewhere: the same bits. With
    per-row temperatures and at most ``split_lane_logprobs.MAX_ROWS`` rows (a decode step's), each
    row is spread over many programs (``parity.ops.split_lane_logprobs``): the same bits again.
    ``temperature``: a float, or (Triton only) an fp32 tensor with one temperature per row, which the
    host never reads. ``check_ids``: an id outside ``[0, V)`` raises ``ValueError`` (the host waits for
    one min/max); with False (ids the caller drew itself, e.g. the server's sampler, which must not
    wait for the device) such a row's logprob is NaN instead, never a clamped value.
    """
    from parity.ops import split_lane_logprobs as split_lanes  # (it imports this module's kernels)

    lead = logits.shape[:-1]
    n = math.prod(lead)
    vocab = logits.shape[-1]
    ids_f = _flat(ids, n, "ids", torch.int64)
    triton_path = _use_triton(logits)
    per_row_t = isinstance(temperature, torch.Tensor)
    if per_row_t and not triton_path:
        raise TypeError("fused_logprobs: per-row temperatures need the Triton kernel (CUDA)")
    # a decode step's rows: each spread over many programs (the same bits)
    split = triton_path and per_row_t and 0 < n <= split_lanes.MAX_ROWS and vocab > 0
    bad = None
    if check_ids:
        ids_k, finish_check = _start_id_check(ids_f, None, vocab)  # raises at once off the GPU
    elif split:
        ids_k = ids_f  # the split kernels give NaN for an id outside [0, V) themselves
    else:
        bad = (ids_f < 0) | (ids_f >= vocab)
        ids_k = ids_f.clamp(0, max(vocab - 1, 0))
    if split:
        per_row = _row_temperatures(temperature, n)
        logp = split_lanes.split_lane_logprobs(logits.reshape(n, vocab), ids_k, per_row).view(lead)
    elif triton_path:
        logp = _forward(
            logits, ids_k, None, None, None, None, temperature, 0, False, CONTRACT_TILE, CONTRACT_FMA
        )[0].view(lead)
    else:
        logp = logprobs_reference(logits, ids_k, temperature).view(lead)
    if bad is not None:
        return torch.where(bad.view(lead), math.nan, logp)
    if check_ids:
        finish_check()
    return logp


# ====================================================================================================
# Plain PyTorch: the contract (bit-exact twin of the kernels) and a differentiable reference
# ====================================================================================================
# Only single IEEE operations of PyTorch are used (each op is its own kernel: no contraction), never
# a division by a Python scalar (CUDA turns that into a multiplication by the reciprocal).


def _fma32_t(a: torch.Tensor, b, c, fma: bool) -> torch.Tensor:
    """fp32 a * b + c (b, c: fp32 tensors or Python floats holding fp32 values), rounded once."""
    if not fma:
        return a * b + c
    if isinstance(c, torch.Tensor):
        c = c.double()
    p = a.double() * (b.double() if isinstance(b, torch.Tensor) else b)  # exact
    s = p + c
    bp = s - p
    e = (p - (s - bp)) + (c - bp)  # TwoSum: s + e == a*b + c exactly
    sb = s.view(torch.int64)
    fix = (e != 0) & ((sb & 1) == 0) & torch.isfinite(s)  # inf / NaN: kept
    up = (e > 0) == (s > 0)
    sb = torch.where(fix, torch.where(up, sb + 1, sb - 1), sb)  # round to odd
    return sb.view(torch.float64).float()  # then to nearest even fp32


def _exp2_parts_t(t: torch.Tensor, fma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    z = _fma32_t(t, _LOG2E_F, _MAGIC_F, fma)
    nk = _MAGIC_F - z
    f = _fma32_t(t, _LOG2E_F, nk, fma)
    p = torch.full_like(f, _P5)
    for c in (_P4, _P3, _P2, _P1, _P0):
        p = _fma32_t(p, f, c, fma)
    r = ((z.view(torch.int32) << 23) + p.view(torch.int32)).view(torch.float32)
    return nk, r


def exp_contract(t: torch.Tensor, fma: bool = CONTRACT_FMA) -> torch.Tensor:
    """The contract's fp32 ``exp`` (see the module docstring), any argument."""
    t = t.float()
    nk, r = _exp2_parts_t(t, fma)
    r = torch.where(nk > -_K_LO, 0.0, r)
    r = torch.where(nk < -_K_HI, math.inf, r)
    return torch.where(t != t, t, r)


def _exp_neg_t(t: torch.Tensor, fma: bool) -> torch.Tensor:
    return _exp2_parts_t(torch.clamp(t, min=_T_MIN), fma)[1]


def log_contract(s: torch.Tensor) -> torch.Tensor:
    """The contract's fp64 ``log`` of positive normal fp32 values."""
    bits = s.float().view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > _SQRT2_F
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e)
    md = m.double()
    u = (md - 1.0) / (md + 1.0)
    u2 = u * u
    q = torch.full_like(u2, _L[11])
    for c in reversed(_L[:11]):
        q = q * u2 + c
    return e.double() * _LN2_D + (u + u) * q


def _k3_t(d: torch.Tensor, fma: bool) -> torch.Tensor:
    s = torch.full_like(d, _K[6])
    for c in reversed(_K[:6]):
        s = s * d + c
    series = (d * d) * s
    direct = (exp_contract(d, fma) - d) - 1.0
    return torch.where((d < 0.5) & (d > -0.5), series, direct)


def _tree_sum_t(v: torch.Tensor) -> torch.Tensor:
    while v.shape[-1] > 1:
        v = v[..., 0::2] + v[..., 1::2]
    return v[..., 0]


def _scaled(logits: torch.Tensor, temperature: float, fma: bool = CONTRACT_FMA) -> torch.Tensor:
    """float32(logits) / T (T rounded to fp32): Markstein's sequence with fma, else IEEE division (by a
    tensor on the same device: CUDA turns a division by a Python scalar into a multiplication)."""
    xs = logits.float()
    t32 = _fp32_scalar(temperature)
    if t32 == 1.0:
        return xs
    if not fma:
        return xs / torch.tensor(t32, dtype=torch.float32, device=xs.device)
    inv = _fp32_inverse(t32)
    q = xs * inv
    rem = _fma32_t(q, -t32, xs, True)
    return torch.where(xs == -math.inf, xs, _fma32_t(rem, inv, q, True))


def _row_stats_t(xs: torch.Tensor, tile: int, fma: bool, entropy: bool):
    """(M fp32, log S fp64, S fp32, W fp32) per row of fp32 ``xs`` [n, V]: steps 2-5 of the contract."""
    n, V = xs.shape
    nt = max(1, -(-V // tile))
    xp = torch.nn.functional.pad(xs, (0, nt * tile - V), value=-math.inf).view(n, nt, tile)
    m = torch.full((n,), -math.inf, dtype=torch.float32, device=xs.device)
    s = torch.zeros(n, tile, dtype=torch.float32, device=xs.device)
    w = torch.zeros_like(s)
    for it in range(nt):
        x = xp[:, it]
        m_new = torch.maximum(m, x.amax(-1)) + 0.0
        grow = (m_new > m)[:, None]
        alpha = _exp_neg_t(m - m_new, fma)[:, None]
        if entropy:
            delta = torch.where(m == -math.inf, 0.0, m - m_new)[:, None]
            w = torch.where(grow, (w + s * delta) * alpha, w)
        s = torch.where(grow, s * alpha, s)
        m = m_new
        m_safe = torch.where(m == -math.inf, 0.0, m)[:, None]
        t = x - m_safe
        e = _exp_neg_t(t, fma)
        s = s + e
        if entropy:
            w = w + e * torch.clamp(t, min=_T_MIN)
    s_tot = _tree_sum_t(s)
    w_tot = _tree_sum_t(w)
    return m, log_contract(s_tot), s_tot, w_tot


def _contract_rows(xs: torch.Tensor, ids: torch.Tensor, tile: int, fma: bool, entropy: bool, chunk: int = 0):
    """(logp, entropy, lse) fp32 per row of ``xs`` [n, V] under the contract, in row chunks."""
    n, V = xs.shape
    chunk = chunk or max(1, (1 << 26) // max(V, 1))
    outs = []
    for a in range(0, n, chunk):
        x = xs[a : a + chunk]
        m, log_s, s_tot, w_tot = _row_stats_t(x, tile, fma, entropy)
        xt = x.gather(-1, ids[a : a + chunk, None])[:, 0]
        ok = (m > -math.inf) & (m < math.inf)
        logp = torch.where(ok, ((xt.double() - m.double()) - log_s).float(), math.nan)
        ent = torch.where(ok, (log_s - w_tot.double() / s_tot.double()).float(), math.nan)
        lse = torch.where(ok, (m.double() + log_s).float(), math.nan)
        outs.append((logp, ent, lse))
    if not outs:
        empty = xs.new_zeros(0)
        return empty, empty, empty
    return tuple(torch.cat(o) for o in zip(*outs, strict=True))


@torch.no_grad()
def logprobs_reference(
    logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    tile: int = CONTRACT_TILE,
    fma: bool = CONTRACT_FMA,
) -> torch.Tensor:
    """The contract's logprob in plain PyTorch (any device): bitwise the Triton kernel's.

    The single logprob formula of server and trainer (``parity.logprobs`` calls it; see the module
    docstring for the definition).
    """
    _check_tile(tile)
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    xs = _scaled(logits.reshape(-1, V), temperature, fma)
    idx = ids.reshape(-1).long()
    logp, _ent, _lse = _contract_rows(xs, idx, tile, fma, entropy=False)
    return logp.view(lead)


@torch.no_grad()
def logprobs_matrix_reference(
    logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    tile: int = CONTRACT_TILE,
    fma: bool = CONTRACT_FMA,
) -> torch.Tensor:
    """The contract's logprob of every vocabulary entry: ``[..., V]`` fp32.

    Entry ``j`` of a row is bitwise what :func:`logprobs_reference` returns for id ``j``: the same
    row statistics (M, log S), then ``float32((float64(xs_j) - float64(M)) - log S)`` per column.
    For the server's top-k / token-id logprobs, which come from the full distribution.
    """
    _check_tile(tile)
    V = logits.shape[-1]
    xs = _scaled(logits.reshape(-1, V), temperature, fma)
    out = torch.empty_like(xs)
    chunk = max(1, (1 << 24) // max(V, 1))  # bounds the fp64 temporaries
    for a in range(0, xs.shape[0], chunk):
        x = xs[a : a + chunk]
        m, log_s, _s, _w = _row_stats_t(x, tile, fma, entropy=False)
        ok = ((m > -math.inf) & (m < math.inf))[:, None]
        logp = ((x.double() - m.double()[:, None]) - log_s[:, None]).float()
        out[a : a + chunk] = torch.where(ok, logp, math.nan)
    return out.view(logits.shape)


def policy_loss_reference(
    logits: torch.Tensor,
    ids: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    ref_logits: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: str = "k3",
    entropy: bool = False,
    tile: int = CONTRACT_TILE,
    fma: bool = CONTRACT_FMA,
) -> PolicyLossOutput:
    """Plain-PyTorch twin of :func:`fused_policy_loss`: the contract's values, autograd gradients.

    Values are the contract's bits; gradients come from ``torch.log_softmax`` (a straight-through
    ``value + (g - g.detach())``), so they are exact math up to fp32 rounding. Materialises
    ``[N, V]`` fp32 tensors: for the CPU and for tests.
    """
    lead, V, n = _check_args(
        logits, ids, old_logprobs, mask, temperature, ref_logits, ref_logprobs, kl_estimator
    )
    idx = ids.reshape(n).long()
    active = (
        mask.reshape(n).bool() if mask is not None else torch.ones(n, dtype=torch.bool, device=idx.device)
    )
    idx = torch.where(active, idx, 0)
    with torch.no_grad():
        xs = _scaled(logits.detach().reshape(n, V), temperature, fma)
        logp_c, ent_c, _lse = _contract_rows(xs, idx, tile, fma, entropy)
        old = old_logprobs.reshape(n).float() if old_logprobs is not None else logp_c
        ratio_c = exp_contract(logp_c - old, fma)
    # the gradient path: plain autograd through x / T
    t32 = torch.tensor(_fp32_scalar(temperature), dtype=torch.float32, device=logits.device)
    lsm = torch.log_softmax(logits.reshape(n, V).float() / t32, -1)
    lp_g = lsm.gather(-1, idx[:, None])[:, 0]
    logp = logp_c + torch.where(torch.isfinite(lp_g), lp_g - lp_g.detach(), 0.0)
    old = torch.where(active, old, logp_c)  # masked rows: no NaN from their old logprobs, even in grads
    r_g = torch.exp(logp - old)
    ratio = ratio_c + (r_g - r_g.detach())
    kl = None
    if ref_logits is not None or ref_logprobs is not None:
        with torch.no_grad():
            if ref_logits is not None:
                rxs = _scaled(ref_logits.detach().reshape(n, V), temperature, fma)
                ref = _contract_rows(rxs, idx, tile, fma, entropy=False)[0]
            else:
                ref = ref_logprobs.reshape(n).float()
            d = ref - logp_c
            if kl_estimator == "k1":
                kl_c = logp_c - ref
            elif kl_estimator == "k2":
                kl_c = (d * d) * 0.5
            else:
                kl_c = _k3_t(d, fma)
        dg = ref - logp
        kl_g = {"k1": -dg, "k2": 0.5 * dg * dg, "k3": torch.exp(dg) - dg - 1.0}[kl_estimator]
        kl = kl_c + (kl_g - kl_g.detach())
        kl = torch.where(active, kl, 0.0).view(lead)
    ent = None
    if entropy:
        p = lsm.exp()
        h_g = -torch.where(p > 0, p * lsm, 0.0).sum(-1)
        ent = torch.where(active, ent_c + (h_g - h_g.detach()), 0.0).view(lead)
    return PolicyLossOutput(
        torch.where(active, logp, 0.0).view(lead), torch.where(active, ratio, 1.0).view(lead), kl, ent
    )
