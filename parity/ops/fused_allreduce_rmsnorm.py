"""Fused tensor-parallel all-reduce + residual add + RMSNorm (Triton), and its exact unfused reference.

The problem
-----------
After a row-parallel layer (``o_proj``, ``down_proj``) each of the k TP ranks holds a bf16 partial of
the layer's output. The decoder then needs ``residual = residual + all_reduce(partials)`` and
``normed = rms_norm(residual)``. Fused kernels (flashinfer's, AITER's) do all three in one pass, and
AITER's added the residual to the fp32 sum *before* rounding to bf16 (AITER PR 2586): ~25% of the
elements move by 1-4 bf16 ULPs against the unfused path, which rounds the all-reduced sum to bf16
first (the all-reduce's output is a bf16 tensor), then adds the residual in bf16.

The contract (what this kernel computes, bit for bit)
-----------------------------------------------------
1. ``reduced = bf16(((fp32(p_0) + fp32(p_1)) + fp32(p_2)) + ...)``: the ranks' partials summed in
   fp32 in rank order 0..k-1, rounded once (:func:`parity.tp.rank_order_sum`; for k = 2 this is
   gloo's bf16 all-reduce exactly, see parity/tp.py).
2. ``summed = bf16(fp32(residual) + fp32(reduced))``: the residual added in bf16, as torch does.
3. ``normed``: RMSNorm in HF's order on ``summed`` -- normalise in fp32, cast to bf16, multiply by the
   weight in bf16. Two variants, chosen by ``fused_norm``:

   - ``fused_norm=True`` (default; one kernel): the GPU contract's norm,
     ``parity.ops.rms_norm_pairwise`` (the variance by a fixed pairwise tree, IEEE division and sqrt,
     no fused multiply-add), computed inside the kernel by the same ``@triton.jit`` row function as
     the standalone norm kernel that the server's ``rmsnorm_cuda`` patch and the trainer's RMSNorm
     modules run on the GPU. So the fused op is bitwise the unfused path of the patched server.
   - ``fused_norm=False``: the kernel writes ``summed`` and the norm is ``parity.contract.rms_norm``
     (the CPU contract's, PyTorch's ``mean``); the bench's comparison of what a second kernel costs.

The kernel (GPU)
----------------
One-shot over peer buffers through torch symmetric memory, in ONE launch per call (NVLink stores and
system-scope release/acquire flags; no multicast, no NCCL). Program p of the kernel owns token rows
p, p + P, ... (P <= the SM count). It pushes its rows of this rank's partial into every peer's inbox
(remote stores), publishes them (a release write of the call's number into the peer's flags: its
fence waits for the pushed rows), waits until every peer's program p has done the same, and computes
its rows from its own input and its local inbox -- every rank ends with the same ``summed`` and
``normed``. Inboxes are double-buffered by call parity, so no "done reading" signal is needed (see
the kernel's docstring). The hidden size fits one block.

The trade-off. The unfused path is two launches (NCCL's all-reduce, then the norm kernel) and NCCL's
fixed cost. Measured on 2x H200 (unfused 12.5-13.5 us at 1-8 tokens): a four-launch version of this op
(copy, torch barrier, kernel, torch barrier) lost to it at small sizes; so did one launch that pulled
from the peers' buffers behind two consuming barriers (15.2-16.3 us), and one with call-numbered
flags and a "done reading" signal (14.0-15.1 us). Pushing moves the NVLink latency off the read path
(the reads are local) and parity buffers remove the second signal and its fence: one fence and one
NVLink write on the critical path. Flags hold call numbers and are never consumed, so a wait is a
read and the grid may change between calls. The price: waits spin inside the kernel, so all P
programs of every rank must be resident together (P is capped at the SM count) and a rank that never
calls leaves its peers spinning (no timeout: the bench's watchdog turns a hang into an error); every
rank must make the same calls in the same order; each inbox holds 2 x world x max_tokens x H bf16.
Each rank receives all k partials (for TP=2 the same traffic as NCCL's).

Under ``TRITON_INTERPRET=1`` (CPU) the compute runs with a table of host pointers to k CPU tensors
(``allreduce_add_rms_norm_local``), and the one-shot kernel itself with world 1 (no peer: the
interpreter runs programs one after another, so peers cannot wait for each other there). Triton's
fp32 -> bf16 conversion truncates there, so the kernels round to nearest-even with integer operations
instead (``EXACT_RNE``; NaN is not preserved there, the interpreter is for tests only).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from parity import contract
from parity.ops.device import sm_count
from parity.ops.rms_norm_pairwise import add_rms_norm_pairwise, launch_options, pairwise_rms_norm_row, to_bf16
from parity.tp import rank_order_sum

# --------------------------------------------------------------------------------------------------
# Plain-PyTorch references (CPU and GPU)
# --------------------------------------------------------------------------------------------------


def reference_allreduce_add_rms_norm(
    partials: Sequence[torch.Tensor],
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    fused_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused path: all-reduce (rank order, fp32, rounded to bf16) -> residual add in bf16 ->
    RMSNorm. Returns ``(normed, summed)`` like ``contract.add_rms_norm``. ``fused_norm`` (default):
    the GPU contract's pairwise-tree RMSNorm; False: ``contract.rms_norm``."""
    reduced = rank_order_sum(partials)
    if not fused_norm:
        return contract.add_rms_norm(reduced, residual, weight, eps)
    return add_rms_norm_pairwise(reduced, residual, weight, eps)


def residual_before_rounding(
    partials: Sequence[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused-kernel bug (AITER PR 2586): the residual is added to the fp32 sum before rounding.
    A negative control only: this is NOT what the server's unfused path computes."""
    acc = partials[0].to(torch.float32)
    for p in partials[1:]:
        acc = acc + p.to(torch.float32)
    summed = (acc + residual.to(torch.float32)).to(residual.dtype)
    return contract.rms_norm(summed, weight, eps), summed


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _add_norm_row(
    acc,  # fp32 [BLOCK_H]: the ranks' partials of this row summed in rank order
    offs,
    cols,
    mask,
    residual_ptr,
    weight_ptr,
    summed_ptr,
    normed_ptr,
    H,
    eps,
    BLOCK_H: tl.constexpr,
    LOG2_BLOCK_H: tl.constexpr,
    NORM: tl.constexpr,
    EXACT_RNE: tl.constexpr,
):
    """One token row of the contract after step 1's sum (module docstring): the single rounding, then
    steps 2-3."""
    reduced = to_bf16(acc, EXACT_RNE)
    # 2. residual add in bf16
    res = tl.load(residual_ptr + offs, mask=mask, other=0.0)
    summed = to_bf16(res.to(tl.float32) + reduced.to(tl.float32), EXACT_RNE)
    tl.store(summed_ptr + offs, summed, mask=mask)
    if NORM:
        # 3. RMSNorm, HF's order, pairwise-tree variance (masked lanes are exact zeros)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        normed = pairwise_rms_norm_row(summed.to(tl.float32), w, H, eps, BLOCK_H, LOG2_BLOCK_H, EXACT_RNE)
        tl.store(normed_ptr + offs, normed, mask=mask)


@triton.jit
def _allreduce_add_rmsnorm_kernel(
    ptr_table,  # int64 [WORLD]: address of each rank's bf16 partial [n_rows, H] (row-major)
    residual_ptr,
    weight_ptr,
    summed_ptr,
    normed_ptr,
    H,
    eps,
    WORLD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    LOG2_BLOCK_H: tl.constexpr,
    NORM: tl.constexpr,
    EXACT_RNE: tl.constexpr,
):
    """The k partials already readable here (local tensors): one program per token row."""
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    offs = tl.program_id(0).to(tl.int64) * H + cols
    # 1. the ranks' partials in rank order, fp32 (rounded once, in _add_norm_row)
    base = tl.load(ptr_table).to(tl.pointer_type(tl.bfloat16))
    acc = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    for r in tl.static_range(1, WORLD):
        base = tl.load(ptr_table + r).to(tl.pointer_type(tl.bfloat16))
        acc = acc + tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    _add_norm_row(
        acc, offs, cols, mask, residual_ptr, weight_ptr, summed_ptr, normed_ptr, H, eps,
        BLOCK_H, LOG2_BLOCK_H, NORM, EXACT_RNE,
    )  # fmt: skip


# Each rank's inbox (a symmetric bf16 tensor) holds [2][WORLD][max_tokens][H]: the partials its peers
# pushed in calls of each parity, by sender. Its int32 flags (a symmetric tensor of
# ``flag_count(world, max_programs)``, zeroed once) hold call numbers (1, 2, ...; int32, compared for
# equality, so they may wrap):
# - FLAG_CALL: the number of this op's completed calls on this rank (read and written locally);
# - FLAG_ARRIVED: programs of the current call that are done (local; the last resets it);
# - FLAG_PUBLISHED + program * world + p: the last call in which rank p pushed its rows of ``program``
#   here (p writes it).
FLAG_CALL = tl.constexpr(0)
FLAG_ARRIVED = tl.constexpr(1)
FLAG_PUBLISHED = tl.constexpr(2)


def flag_count(world: int, max_programs: int) -> int:
    return FLAG_PUBLISHED.value + max_programs * world


@triton.jit
def _wait_for(ptr, value):
    """Spin until the int32 at ``ptr`` equals ``value``: an atomic add of 0 reads it with acquire
    semantics at system scope (Triton lowers it to one thread's ``ld.acquire.sys`` and broadcasts the
    result), and the ``debug_barrier`` (``bar.sync``) orders every thread's later accesses after it."""
    while tl.atomic_add(ptr, 0, sem="acquire", scope="sys") != value:
        pass
    tl.debug_barrier()


@triton.jit(do_not_specialize=["n_rows", "n_programs", "rank", "region"])
def _one_shot_kernel(
    partial_ptr,  # this rank's bf16 partial [n_rows, H]
    inbox_table,  # int64 [WORLD]: each rank's inbox ([2][WORLD][max_tokens][H] bf16)
    flag_table,  # int64 [WORLD]: each rank's int32 flags (FLAG_* above)
    residual_ptr,
    weight_ptr,
    summed_ptr,
    normed_ptr,
    n_rows,
    n_programs,
    rank,
    region,  # max_tokens * H: one sender's part of an inbox
    H,
    eps,
    WORLD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    LOG2_BLOCK_H: tl.constexpr,
    NORM: tl.constexpr,
    EXACT_RNE: tl.constexpr,
):
    """The whole TP op in one launch; program p owns rows p, p + n_programs, ...

    Call c (this rank's c-th; every rank makes the same calls in the same order), parity c % 2:
    1. push: store my rows of the partial into every peer's inbox (its part [c % 2][me]);
    2. publish: after a ``bar.sync``, write c to my slot of program p in every peer's flags with
       release semantics at system scope (the fence waits for the pushed rows);
    3. wait until every peer's slot of program p here reads c (acquire): their rows are in my inbox;
    4. compute the rows: my partial from my own input, the peers' from my (local) inbox;
    5. the last program to finish (a counter at GPU scope) stores c as the number of completed calls.
    No "done reading" signal: the inbox part of parity c % 2 is next written in call c + 2, which a
    peer starts only after its call c + 1, which waited for my publish of c + 1, issued after my call
    c had ended (stream order). A rank never signals itself. Waiting programs spin, so all programs of
    every rank must be resident together: the launcher keeps n_programs <= the SM count. No flag is
    consumed, so waits are reads and the grid may change from call to call."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    flags = tl.load(flag_table + rank).to(tl.pointer_type(tl.int32))
    call = tl.load(flags + FLAG_CALL) + 1  # written by call c - 1's last program (stream order)
    parity = (call & 1).to(tl.int64)
    published = FLAG_PUBLISHED + pid * WORLD
    for peer in tl.static_range(WORLD):  # 1. and 2.
        if peer != rank:
            inbox = tl.load(inbox_table + peer).to(tl.pointer_type(tl.bfloat16))
            inbox += (parity * WORLD + rank) * region
            row = pid.to(tl.int64)
            while row < n_rows:  # (a while loop: the interpreter's scalars cannot bound a range())
                offs = row * H + cols
                tl.store(inbox + offs, tl.load(partial_ptr + offs, mask=mask), mask=mask)
                row += n_programs
            tl.debug_barrier()
            peer_flags = tl.load(flag_table + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(peer_flags + published + rank, call, sem="release", scope="sys")
    for peer in tl.static_range(WORLD):  # 3.
        if peer != rank:
            _wait_for(flags + published + peer, call)
    inbox = tl.load(inbox_table + rank).to(tl.pointer_type(tl.bfloat16)) + parity * WORLD * region
    row = pid.to(tl.int64)
    while row < n_rows:  # 4. the ranks' partials in rank order, fp32 (rounded once, in _add_norm_row)
        offs = row * H + cols
        for r in tl.static_range(WORLD):
            if r == rank:
                part = tl.load(partial_ptr + offs, mask=mask, other=0.0)
            else:
                part = tl.load(inbox + r * region + offs, mask=mask, other=0.0)
            if r == 0:
                acc = part.to(tl.float32)
            else:
                acc = acc + part.to(tl.float32)
        _add_norm_row(
            acc, offs, cols, mask, residual_ptr, weight_ptr, summed_ptr, normed_ptr, H, eps,
            BLOCK_H, LOG2_BLOCK_H, NORM, EXACT_RNE,
        )  # fmt: skip
        row += n_programs
    tl.debug_barrier()  # 5.
    if tl.atomic_add(flags + FLAG_ARRIVED, 1, sem="acq_rel", scope="gpu") == n_programs - 1:
        tl.store(flags + FLAG_ARRIVED, 0)
        tl.store(flags + FLAG_CALL, call)


def _outputs(residual: torch.Tensor, fused_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed, normed)`` for the kernels to write; without the fused norm the kernel writes only
    ``summed`` (its ``normed_ptr`` is never stored through)."""
    summed = torch.empty_like(residual)
    return summed, (torch.empty_like(residual) if fused_norm else summed)


def _norm_after(summed, normed, weight, eps, fused_norm):
    """``(normed, summed)``: the kernel's, or with ``fused_norm=False`` the CPU contract's norm of
    the kernel's ``summed`` (the bench's "what a second kernel costs" variant)."""
    return (normed if fused_norm else contract.rms_norm(summed, weight, eps)), summed


def _launch(
    ptr_table: torch.Tensor,
    world: int,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    fused_norm: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = residual.shape[-1]
    rows = residual.numel() // hidden
    summed, normed = _outputs(residual, fused_norm)
    if rows:
        _allreduce_add_rmsnorm_kernel[(rows,)](
            ptr_table, residual, weight, summed, normed, hidden, eps,
            WORLD=world, NORM=fused_norm, **launch_options(hidden),
        )  # fmt: skip
    return _norm_after(summed, normed, weight, eps, fused_norm)


def one_shot_allreduce_add_rms_norm(
    partial: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    inbox_table: torch.Tensor,
    flag_table: torch.Tensor,
    region: int,
    rank: int,
    world: int,
    max_programs: int,
    fused_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of the one-shot kernel on this rank (every rank of the group calls it with its own
    ``partial`` and ``rank``, the same tables, shapes and ``max_programs``).

    ``inbox_table`` / ``flag_table``: int64 addresses of every rank's symmetric inbox (``2 * world *
    region`` bf16, ``region`` >= rows * H) and int32 flags (``flag_count(world, max_programs)`` of
    them, zeroed before the first call); :class:`SymmetricAllReduceAddRMSNorm` maps them.
    ``min(rows, max_programs)`` programs: all of them must be resident at once on every GPU, so
    ``max_programs`` is at most the SM count. Under the interpreter the kernel runs its programs one
    after another, so only ``world == 1`` can run there (no push, no wait: the row loop, the compute
    and the call count); the 2-GPU test covers the rest."""
    _check(partial, residual, weight)
    partial = partial.contiguous()
    hidden = residual.shape[-1]
    rows = residual.numel() // hidden
    summed, normed = _outputs(residual, fused_norm)
    if rows:
        programs = min(rows, max_programs)
        _one_shot_kernel[(programs,)](
            partial, inbox_table, flag_table, residual, weight, summed, normed, rows, programs, rank, region,
            hidden, eps, WORLD=world, NORM=fused_norm, **launch_options(hidden),
        )  # fmt: skip
    return _norm_after(summed, normed, weight, eps, fused_norm)


def _check(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    if partial.dtype != torch.bfloat16 or residual.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise TypeError("bf16 partials, residual and weight only")
    if partial.shape != residual.shape or weight.shape != residual.shape[-1:]:
        raise ValueError(f"shapes {tuple(partial.shape)}, {tuple(residual.shape)}, {tuple(weight.shape)}")
    if not (residual.is_contiguous() and weight.is_contiguous()):
        raise ValueError("contiguous residual and weight only")


def allreduce_add_rms_norm_local(
    partials: Sequence[torch.Tensor],
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    fused_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel over k partials held by this process (a pointer table of local tensors): what each
    rank computes once the peers' buffers are mapped. For tests (GPU, or CPU under the interpreter)."""
    for p in partials:
        _check(p, residual, weight)
    partials = [p.contiguous() for p in partials]
    table = torch.tensor([p.data_ptr() for p in partials], dtype=torch.int64, device=residual.device)
    return _launch(table, len(partials), residual, weight, eps, fused_norm)


def warm_up_kernel(world: int, hidden: int, device: torch.device | str, *, fused_norm: bool) -> float:
    """Compile (or load from Triton's cache) both kernels for ``world`` ranks and ``hidden``, with no
    peer involved: the local kernel by a launch over a pointer table of one zero row repeated
    ``world`` times, the one-shot kernel by ``warmup`` (compiled, not launched: its waits need the
    peers). Returns the seconds it took.

    The symmetric op calls this in its constructor: a first call that compiled inside ``__call__``
    would leave the peers spinning in their waits for the whole compile."""
    t0 = time.perf_counter()
    device = torch.device(device)
    row = torch.zeros(1, hidden, dtype=torch.bfloat16, device=device)
    weight = torch.ones(hidden, dtype=torch.bfloat16, device=device)
    allreduce_add_rms_norm_local([row] * world, row, weight, 1e-6, fused_norm=fused_norm)
    table = torch.zeros(world, dtype=torch.int64, device=device)
    # n_rows, n_programs, rank and region are not specialised on (do_not_specialize): one compile
    # serves all.
    _one_shot_kernel.warmup(
        row, table, table, row, weight, row, row, 1, 1, 0, hidden, hidden, 1e-6,
        WORLD=world, NORM=fused_norm, grid=(1,), **launch_options(hidden),
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a kernel fault shows here, not behind a cross-rank barrier
    return time.perf_counter() - t0


def _symmetric(numel: int, dtype: torch.dtype, group, device) -> tuple[torch.Tensor, object, torch.Tensor]:
    """A zero-copy peer-mapped tensor of ``group``: ``(tensor, handle, table)``, ``table`` the int64
    address of every rank's copy (a collective: every rank calls it in the same order)."""
    import torch.distributed._symmetric_memory as symm_mem

    tensor = symm_mem.empty(numel, dtype=dtype, device=device)
    handle = symm_mem.rendezvous(tensor, group)
    # ``buffer_ptrs`` are the bases of the peers' allocations. ``symm_mem.empty`` allocates from a
    # memory pool, where a tensor may start inside its allocation: add this tensor's offset (the same
    # on every rank, the allocations being symmetric; 0 when the tensor owns its allocation).
    ptrs = list(handle.buffer_ptrs)
    offset = tensor.data_ptr() - ptrs[handle.rank]
    if offset < 0 or offset % tensor.element_size():
        raise RuntimeError(f"symmetric tensor at offset {offset} of its allocation's base")
    return tensor, handle, torch.tensor([p + offset for p in ptrs], dtype=torch.int64, device=device)


class SymmetricAllReduceAddRMSNorm:
    """The one-shot fused op of one TP group on GPU, over torch symmetric memory.

    ``op(partial, residual, weight, eps)`` on every rank of ``group`` returns ``(normed, summed)``,
    identical on all ranks and bitwise equal to :func:`reference_allreduce_add_rms_norm` over the
    ranks' partials (``fused_norm`` as there; the default, True, is the GPU contract). The symmetric
    buffer is allocated once for ``max_tokens`` rows.

    Every rank of ``group`` must construct its ops in the same order (``rendezvous`` is a collective)
    and call them in the same order (the kernel's flags count calls).

    - ``impl="triton"`` (default): one launch of the one-shot kernel per call (copy in, publish, wait
      for the peers, reduce + add + norm from the peers' buffers, signal "done reading":
      :func:`one_shot_allreduce_add_rms_norm`), with at most one program per SM. It is compiled in the
      constructor (``precompile``, see :func:`warm_up_kernel`), never while peers wait.
    - ``impl="torch"``: the same transport done by torch (copy into the buffer, symmetric-memory
      barrier, the plain-PyTorch reference reading the peers' buffers in place, barrier): isolates the
      kernel and its barriers from the transport.
    - ``barrier_timeout_ms`` (``impl="torch"`` only): passed to torch's symmetric-memory barrier; 0
      (default) waits forever, as torch does. Non-zero: a barrier that waits longer traps the GPU
      (torch prints which rank and channel), a CUDA error instead of a silent hang.
    """

    def __init__(
        self,
        group,
        max_tokens: int,
        hidden: int,
        device: torch.device | str,
        *,
        fused_norm: bool = True,
        impl: str = "triton",
        precompile: bool = True,
        barrier_timeout_ms: int = 0,
    ):
        import torch.distributed as dist

        if impl not in ("triton", "torch"):
            raise ValueError(f"impl {impl!r}: 'triton' or 'torch'")
        self.world = dist.get_world_size(group)
        self.hidden = hidden
        self.max_tokens = max_tokens
        self.fused_norm = fused_norm
        self.impl = impl
        self.barrier_timeout_ms = int(barrier_timeout_ms)
        self.compile_s = 0.0
        if precompile and impl == "triton":
            self.compile_s = warm_up_kernel(self.world, hidden, device, fused_norm=fused_norm)
        # The kernel's programs wait for their peers, so all must be resident at once: one per SM at most.
        self.max_programs = min(max_tokens, sm_count(torch.device(device)))
        self.region = max_tokens * hidden
        self.buffer, self.handle, self.table = _symmetric(
            2 * self.world * self.region, torch.bfloat16, group, device
        )
        self.rank = self.handle.rank
        self.flags, _, self.flag_table = _symmetric(
            flag_count(self.world, self.max_programs), torch.int32, group, device
        )
        self.flags.zero_()
        torch.cuda.synchronize(device)
        dist.barrier(group)  # every rank's flags are zero before any peer's first call writes to them

    def peer_buffer(self, rank: int, shape) -> torch.Tensor:
        """Rank ``rank``'s partial of the current call, read in place (NVLink) through its buffer."""
        offset = self.buffer.data_ptr() - self.handle.buffer_ptrs[self.rank]
        return self.handle.get_buffer(rank, tuple(shape), torch.bfloat16, offset // 2)

    def __call__(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        _check(partial, residual, weight)
        rows = partial.numel() // self.hidden
        if partial.shape[-1] != self.hidden or rows > self.max_tokens:
            raise ValueError(f"{tuple(partial.shape)} does not fit [{self.max_tokens}, {self.hidden}]")
        if self.impl == "triton":
            return one_shot_allreduce_add_rms_norm(
                partial, residual, weight, eps, inbox_table=self.table, flag_table=self.flag_table,
                region=self.region,
                rank=self.rank, world=self.world, max_programs=self.max_programs, fused_norm=self.fused_norm,
            )  # fmt: skip
        self.buffer[: partial.numel()].copy_(partial.reshape(-1))
        self.handle.barrier(channel=0, timeout_ms=self.barrier_timeout_ms)  # every partial is published
        peers = [self.peer_buffer(r, partial.shape) for r in range(self.world)]
        out = reference_allreduce_add_rms_norm(peers, residual, weight, eps, fused_norm=self.fused_norm)
        # No rank overwrites its buffer (next call) while a peer may still read it.
        self.handle.barrier(channel=0, timeout_ms=self.barrier_timeout_ms)
        return out
