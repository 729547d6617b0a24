"""Issue 11 on 2 GPUs: the fused all-reduce + residual add + RMSNorm kernel at TP=2, bitwise and timed.

Two processes (``torch.multiprocessing``), one GPU each, NCCL, NVLink multicast off
(``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``, set before
anything initialises).

Phases, in this order (rank 0 prints a line, flushed, as each starts, so a hang shows where):

0. the process group;
1. ``compile``: the Triton kernels for every (hidden size, variant), each rank alone (the local kernel by
   a launch over its own tensors, the one-shot kernel compiled without a launch: no peer, no barrier),
   timed;
2. ``symmetric memory``: one ``SymmetricAllReduceAddRMSNorm`` per (hidden size, variant) --
   ``symm_mem.empty`` + ``rendezvous``, in the same order on both ranks;
3. ``smoke``: the first calls of the fused op, on 1 token at the smallest hidden size, checked;
4. (a) bitwise, smallest shapes first; 5. (b) latency; then the report.

Every phase and case runs under a per-rank watchdog (``--case-timeout``, ``--compile-timeout``) and
ends with a device synchronisation: a phase that overruns prints its name and every thread's stack
(``faulthandler``) and exits with status 4. A rank that raises prints its traceback at once and exits
with status 3 (no graceful teardown: its peer may be parked in a collective). The symmetric-memory
barriers of ``--fused symmetric-torch`` get a timeout too (``--barrier-timeout-ms``): torch's barrier
kernel then traps, naming the rank and channel, instead of spinning forever. The one-shot kernel's own
barriers have no timeout: a hang there is the watchdog's.

``--fused`` picks what "fused" means, to tell the kernel from the transport when something breaks:

- ``symmetric`` (default on GPU): ``SymmetricAllReduceAddRMSNorm``, the one-shot Triton kernel (copy in,
  barrier, reading the peers' symmetric-memory buffers, barrier: one launch);
- ``symmetric-torch``: the same transport (copy, barrier, the peers' buffers read in place, barrier),
  the plain-PyTorch reference instead of the kernel;
- ``gather`` (default on the CPU): an all-gather of the partials (NCCL / gloo) and the same Triton
  kernel over a pointer table of the gathered copies: the kernel without symmetric memory;
- ``gather-torch``: all-gather + the plain-PyTorch reference: neither.

(a) Bitwise. For every hidden size x token count, on random inputs (bf16 partials with exponents
spread over 2^-3..2^3, as the module's tests make them; made on the device and broadcast from rank 0)
and one case of special values (+-0, subnormals, sums that overflow to inf):

- ``fused`` (one kernel): the op with ``fused_norm=True`` (the default): the one-shot kernel with the
  GPU contract's pairwise-tree RMSNorm inside;
- ``unfused``: the patched server's path, ``torch.distributed.all_reduce`` (NCCL) of the bf16
  partial -> bf16 -> the GPU contract's norm kernel (``parity.ops.rms_norm_pairwise``: residual add in
  bf16, then RMSNorm; what ``rmsnorm_cuda`` runs);
- ``contract``: the module's reference, ``reference_allreduce_add_rms_norm``: the ranks' partials
  summed in fp32 in rank order (``parity.tp.rank_order_sum``), rounded once, then the same;
- ``tn`` (information): the op with ``fused_norm=False`` (the kernel's sum, then
  ``contract.rms_norm``, PyTorch's mean) against its own reference.

It also checks whether NCCL's bf16 all-reduce of the 2 partials equals the contract's rank-order fp32
sum rounded once (for k = 2 there is one addition, so it should). If NCCL differs, the unfused path
the issue means is the contract's, and the kernel is judged against that (a FINDING line says so).
The negative control, ``residual_before_rounding`` (the AITER PR 2586 bug), must differ from the
kernel's ``summed``.

(b) Latency, fused vs unfused, medians over ``--iters`` iterations timed with CUDA events. Before each
timed iteration both ranks line up on a tiny NCCL all-reduce, then each GPU spins ~1 ms
(``torch.cuda._sleep``) while the host enqueues the op, so the events time the GPU work, not Python's
launch overhead (as in the server's CUDA-graph decode). A ~100 us spin was too short: the host's
enqueue of a Triton launch plus an NCCL call outlasted it, and the GPU idled inside the timed region
(2x H200: unfused 75 us at 4096 x 1 with NCCL alone at 13.5 us). Columns (us, the slower rank's
median): ``allreduce`` (NCCL alone, in place),
``unfused`` (NCCL all-reduce + the norm kernel with the residual add: the patched server's two
kernels), ``fused 1k`` (one launch: the one-shot kernel, its copy-in and both barriers inside) and
``fused+tn`` (the kernel + ``contract.rms_norm``). Measured on 2x H200 before the norm kernel
existed, with an earlier four-launch fused op (copy, torch barrier, kernel, torch barrier), against an
unfused path with PyTorch's ~9 eager norm kernels: fused 0.34-0.93 of it; NCCL alone took 9.5-137 us.

Exit status: 0 all checks pass; 1 a bitwise check failed; 2 the symmetric-memory op could not be
built (the run fell back to ``gather``); 3 a rank died or raised; 4 a watchdog fired (a phase hung).

On the CPU (``--device cpu --backend gloo``; tiny sizes) the same code runs with the Triton
interpreter (``TRITON_INTERPRET=1``) in the ``gather`` modes; timings there are meaningless.

    python benchmarks/bench_fused_allreduce_rmsnorm.py [--json PATH] [--iters 50] [--fused symmetric]
    python benchmarks/bench_fused_allreduce_rmsnorm.py --size smoke --fused symmetric-torch
    python benchmarks/bench_fused_allreduce_rmsnorm.py --device cpu --backend gloo --size tiny
"""

from __future__ import annotations

import os

# NVLink multicast can take a shared host's GPUs out of service: off before torch initialises anything.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

import argparse  # noqa: E402
import datetime  # noqa: E402
import faulthandler  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BF16 = torch.bfloat16
EPS = 1e-6
WORLD = 2
SLEEP_CYCLES = 2_000_000  # ~1 ms at H100/H200 clocks: the host enqueues the timed op meanwhile

EXIT_ERROR = 3  # a rank raised: its traceback is printed first
EXIT_WATCHDOG = 4  # a phase overran its deadline: its name and every thread's stack are printed first
EXIT_FAULTHANDLER = 1  # faulthandler.dump_traceback_later(exit=True): the watchdog's backstop

SIZES = {
    # check hidden sizes, check token counts, latency hidden sizes, latency token counts
    "full": ((2048, 4096, 8192), (1, 7, 64, 513, 2048), (4096, 8192), (1, 8, 64, 512, 2048)),
    "smoke": ((2048, 8192), (1, 64), (4096,), (1, 64)),  # a quick triage run
    "tiny": ((128, 320), (1, 7, 33), (128,), (1, 8)),  # the CPU (Triton interpreter)
}

FUSED_MODES = {
    "symmetric": "SymmetricAllReduceAddRMSNorm: the Triton kernel over the peers' symmetric-memory buffers",
    "symmetric-torch": "SymmetricAllReduceAddRMSNorm(impl='torch'): symmetric-memory transport, the "
    "plain-PyTorch reference over the peers' buffers (no Triton)",
    "gather": "all_gather of the partials + the same Triton kernel over a local pointer table (no "
    "symmetric memory)",
    "gather-torch": "all_gather of the partials + the plain-PyTorch reference (no symmetric memory, no "
    "Triton)",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(rows: int, hidden: int, seed: int, device: torch.device | str = "cpu"):
    """Every rank's partial, the residual and the weight (the same on every rank for one device type)."""
    g = torch.Generator(device=device).manual_seed(seed)
    scale = torch.exp2(torch.randint(-3, 4, (WORLD, rows, hidden), generator=g, device=device).float())
    partials = (torch.randn(WORLD, rows, hidden, generator=g, device=device) * scale).to(BF16)
    residual = (torch.randn(rows, hidden, generator=g, device=device) * 4).to(BF16)
    weight = (1 + 0.3 * torch.randn(hidden, generator=g, device=device)).to(BF16)
    return partials, residual, weight


def make_specials(hidden: int, seed: int, device: torch.device | str = "cpu"):
    """4 rows: +-0 (and -0 + -0 = -0), bf16 subnormals, sums overflowing to inf, random."""
    partials, residual, weight = make_inputs(4, hidden, seed, device)
    p0, p1 = partials[0], partials[1]
    p0[0].zero_()
    p1[0].zero_()
    p0[0, :8] = -0.0
    p1[0, :4] = -0.0
    residual[0, :2] = -0.0  # -0 + (-0 + -0) stays -0
    g = torch.Generator(device=device).manual_seed(seed + 1)
    p0[1] = (torch.randn(hidden, generator=g, device=device) * 2.0**-130).to(BF16)  # subnormal in bf16
    p1[1] = (torch.randn(hidden, generator=g, device=device) * 2.0**-131).to(BF16)
    residual[1].zero_()
    p0[2, :4] = 3.0e38
    p1[2, :4] = 3.0e38  # fp32 sum 6e38 rounds to inf in bf16
    return partials, residual, weight


def compare(got: torch.Tensor, want: torch.Tensor) -> tuple[int, float]:
    """(elements whose bits differ, max |difference| among them); NaN vs NaN counts as equal."""
    differ = got.contiguous().view(torch.int16) != want.contiguous().view(torch.int16)
    differ &= ~(torch.isnan(got) & torch.isnan(want))
    n = int(differ.sum())
    if n == 0:
        return 0, 0.0
    d = (got.double() - want.double()).abs()[differ]
    d = d[~torch.isnan(d)]
    return n, float(d.max()) if d.numel() else float("nan")


# --------------------------------------------------------------------------------------------------
# Watchdog
# --------------------------------------------------------------------------------------------------


class Watchdog:
    """A deadline per phase, watched by a daemon thread: past it, the phase's name and every thread's
    stack go to stderr and the process exits with ``EXIT_WATCHDOG``. ``faulthandler``'s own timer (in
    C, it needs no GIL) backs it up 20 s later, in case the main thread sits in native code holding the
    GIL."""

    def __init__(self, rank: int, t0: float):
        self.rank = rank
        self.t0 = t0
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._label = ""
        self._seconds = 0.0
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    @contextmanager
    def phase(self, label: str, seconds: float):
        with self._lock:
            self._label, self._seconds = label, seconds
            self._deadline = time.monotonic() + seconds
        faulthandler.dump_traceback_later(seconds + 20, exit=True)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
            with self._lock:
                self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                label, seconds = self._label, self._seconds
            if expired:
                sys.stdout.flush()
                sys.stderr.write(
                    f"\n[rank {self.rank}] WATCHDOG: '{label}' not done after {seconds:.0f} s "
                    f"({time.monotonic() - self.t0:.1f} s into the run); every thread's stack:\n"
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_WATCHDOG)


# --------------------------------------------------------------------------------------------------
# Per rank
# --------------------------------------------------------------------------------------------------


class Rank:
    def __init__(self, rank: int, opts: dict):
        import torch.distributed as dist

        from parity.ops import fused_allreduce_rmsnorm as far
        from parity.ops import rms_norm_pairwise as rms
        from parity.tp import rank_order_sum

        self.dist, self.rms, self.far, self.rank_order_sum = dist, rms, far, rank_order_sum
        self.rank = rank
        self.opts = opts
        self.cuda = opts["device"] == "cuda"
        self.device = torch.device("cuda", rank) if self.cuda else torch.device("cpu")
        self.ops: dict[tuple[int, bool], object] = {}
        self.mode = opts["fused"]
        self.symm_error: str | None = None
        self.flag = torch.zeros(1, dtype=torch.int32, device=self.device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---- the fused op --------------------------------------------------------------------------
    def build_symmetric(self, hiddens, max_tokens: int) -> None:
        """One ``SymmetricAllReduceAddRMSNorm`` per (hidden, fused_norm), in the same order on every
        rank (``rendezvous`` is a collective); every rank agrees on success, else both fall back to
        ``gather``."""
        err = None
        impl = "torch" if self.mode == "symmetric-torch" else "triton"
        try:
            for h in hiddens:
                for fused_norm in (False, True):
                    self.ops[(h, fused_norm)] = self.far.SymmetricAllReduceAddRMSNorm(
                        self.dist.group.WORLD,
                        max_tokens,
                        h,
                        self.device,
                        fused_norm=fused_norm,
                        impl=impl,
                        precompile=False,  # compiled in phase 1, before any barrier
                        barrier_timeout_ms=self.opts["barrier_timeout_ms"],
                    )
        except Exception:
            err = traceback.format_exc()
            print(f"[rank {self.rank}] SymmetricAllReduceAddRMSNorm FAILED:\n{err}", flush=True)
        failed = torch.tensor([0 if err is None else 1], dtype=torch.int32, device=self.device)
        self.dist.all_reduce(failed)
        if int(failed.item()) != 0:
            self.ops.clear()
            self.symm_error = err or "a peer failed"
            self.mode = "gather"
            if self.rank == 0:
                print(
                    "symmetric-memory op failed: falling back to --fused gather (exit status 2)", flush=True
                )

    def fused(self, partial, residual, weight, fused_norm: bool):
        if self.mode.startswith("symmetric"):
            return self.ops[(partial.shape[-1], fused_norm)](partial, residual, weight, EPS)
        bufs = [torch.empty_like(partial) for _ in range(WORLD)]
        self.dist.all_gather(bufs, partial)  # the peers' partials, copied here
        if self.mode == "gather-torch":
            return self.far.reference_allreduce_add_rms_norm(
                bufs, residual, weight, EPS, fused_norm=fused_norm
            )
        return self.far.allreduce_add_rms_norm_local(bufs, residual, weight, EPS, fused_norm=fused_norm)

    def norm(self, reduced, residual, weight):
        """The patched server's norm after its all-reduce: the GPU contract's residual add + RMSNorm
        (``rmsnorm_cuda``: one Triton kernel on CUDA; its plain-PyTorch reference on the CPU)."""
        if self.cuda:
            return self.rms.rms_norm_pairwise_kernel(reduced, weight, EPS, residual)
        return self.rms.add_rms_norm_pairwise(reduced, residual, weight, EPS)

    def unfused(self, scratch, residual, weight):
        self.dist.all_reduce(scratch)
        return self.norm(scratch, residual, weight)

    # ---- inputs --------------------------------------------------------------------------------
    def inputs(self, rows: int, hidden: int, seed: int, special: bool = False):
        """Made on this rank's device, then rank 0's broadcast: both ranks hold the same bits."""
        if special:
            partials, residual, weight = make_specials(hidden, seed, self.device)
        else:
            partials, residual, weight = make_inputs(rows, hidden, seed, self.device)
        for t in (partials, residual, weight):
            self.dist.broadcast(t, src=0)
        return list(partials), residual, weight

    # ---- (a) bitwise ---------------------------------------------------------------------------
    def check(self, partials, residual, weight, hidden: int, tokens: int, special: bool) -> dict:
        mine = partials[self.rank]
        far = self.far
        reduced = mine.clone()
        self.dist.all_reduce(reduced)
        u_normed, u_summed = self.norm(reduced, residual, weight)
        r_normed, r_summed = far.reference_allreduce_add_rms_norm(partials, residual, weight, EPS)
        t_normed, _ = far.reference_allreduce_add_rms_norm(partials, residual, weight, EPS, fused_norm=False)
        f_normed, f_summed = self.fused(mine, residual, weight, True)
        k_normed, k_summed = self.fused(mine, residual, weight, False)
        _, bug_summed = far.residual_before_rounding(partials, residual, weight, EPS)
        row = {
            "hidden": hidden,
            "tokens": tokens,
            "special": special,
            "nccl_vs_contract": compare(reduced, self.rank_order_sum(partials)),
            "fused_vs_unfused_summed": compare(f_summed, u_summed),
            "fused_vs_unfused_normed": compare(f_normed, u_normed),
            "fused_vs_contract_summed": compare(f_summed, r_summed),
            "fused_vs_contract_normed": compare(f_normed, r_normed),
            "torchnorm_vs_ref_summed": compare(k_summed, r_summed),
            "torchnorm_vs_ref_normed": compare(k_normed, t_normed),
            "torchnorm_vs_contract_normed": compare(k_normed, r_normed),  # information only
            "negative_summed": compare(bug_summed, f_summed),
            "elements": mine.numel(),
        }
        kernel_ok = all(
            row[k][0] == 0
            for k in (
                "fused_vs_contract_summed",
                "fused_vs_contract_normed",
                "torchnorm_vs_ref_summed",
                "torchnorm_vs_ref_normed",
            )
        )
        nccl_ok = row["nccl_vs_contract"][0] == 0
        unfused_ok = row["fused_vs_unfused_summed"][0] == 0 and row["fused_vs_unfused_normed"][0] == 0
        negative_ok = special or row["negative_summed"][0] > 0
        # fused vs the NCCL path fails the run only where NCCL itself is the contract's sum.
        row["ok"] = kernel_ok and negative_ok and (unfused_ok or not nccl_ok)
        # Triton 3.6's interpreter converts bf16 subnormals to fp32 wrongly (1.01e-39 -> 4.41e-39):
        # on the CPU the special values are information only.
        row["counted"] = self.cuda or not special
        return row

    # ---- (b) latency ---------------------------------------------------------------------------
    def median_us(self, fn) -> float:
        iters, warmup = self.opts["iters"], self.opts["warmup"]
        for _ in range(warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(iters):
                self.dist.barrier()
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
        ]
        for start, end in events:
            self.dist.all_reduce(self.flag)  # both GPUs leave this together
            torch.cuda._sleep(SLEEP_CYCLES)  # meanwhile the host enqueues the op
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)

    def latency(self, hidden: int, tokens: int) -> dict:
        g = torch.Generator(device=self.device).manual_seed(1000 + tokens)
        partial = (torch.randn(tokens, hidden, generator=g, device=self.device)).to(BF16)
        residual = (torch.randn(tokens, hidden, generator=g, device=self.device) * 4).to(BF16)
        weight = (1 + 0.3 * torch.randn(hidden, generator=g, device=self.device)).to(BF16)
        scratch = partial.clone()  # all-reduced in place, as the server does (values grow: no matter)
        return {
            "hidden": hidden,
            "tokens": tokens,
            "allreduce_us": self.median_us(lambda: self.dist.all_reduce(scratch)),
            "unfused_us": self.median_us(lambda: self.unfused(scratch, residual, weight)),
            "fused_onek_us": self.median_us(lambda: self.fused(partial, residual, weight, True)),
            "fused_torchnorm_us": self.median_us(lambda: self.fused(partial, residual, weight, False)),
        }


def worker(rank: int, port: int, opts: dict, result_path: str) -> None:
    faulthandler.enable(all_threads=True)  # SIGSEGV / SIGABRT: the stacks
    # Terminated by the parent (the other rank failed): where this one was.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    t0 = time.monotonic()
    wd = Watchdog(rank, t0)
    try:
        import torch.distributed as dist

        cuda = opts["device"] == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
        else:
            import warnings

            warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy inf/NaN in the interpreter
            torch.set_num_threads(1)  # two ranks on a small CPU: no oversubscription
        kw = {"device_id": torch.device("cuda", rank)} if cuda else {}
        _say(rank, t0, f"process group ({opts['backend']})")
        with wd.phase("init_process_group", opts["case_timeout"] + 30):
            dist.init_process_group(
                opts["backend"],
                init_method=f"tcp://127.0.0.1:{port}",
                rank=rank,
                world_size=WORLD,
                timeout=datetime.timedelta(seconds=opts["timeout"]),
                **kw,
            )
            dist.barrier()
        _run(rank, opts, result_path, wd, t0)
        with wd.phase("teardown: barrier + destroy_process_group", 60):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        sys.stdout.flush()
        print(
            f"[rank {rank}] FAILED after {time.monotonic() - t0:.1f} s:\n{traceback.format_exc()}", flush=True
        )
        sys.stderr.flush()
        os._exit(EXIT_ERROR)  # no graceful teardown: the peer may be parked in a collective or a barrier


def _say(rank: int, t0: float, msg: str) -> None:
    if rank == 0:
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)


def _run(rank: int, opts: dict, result_path: str, wd: Watchdog, t0: float) -> None:
    import torch.distributed as dist

    def say(msg: str) -> None:
        _say(rank, t0, msg)

    check_h, check_t, lat_h, lat_t = SIZES[opts["size"]]
    hiddens = sorted(set(check_h) | set(lat_h))
    case_s = opts["case_timeout"]
    r = Rank(rank, opts)
    phases: dict[str, float] = {}
    compile_s: dict[str, float] = {}

    # 1. compile: each rank alone, before any cross-rank barrier can wait on it
    tp = time.monotonic()
    if r.mode in ("symmetric", "gather"):
        for h in hiddens:
            for fused_norm in (False, True):
                label = (
                    f"compile: Triton kernel, hidden {h}, {'one kernel' if fused_norm else 'contract norm'}"
                )
                say(label + " (no peer, no barrier)")
                with wd.phase(label, opts["compile_timeout"]):
                    compile_s[f"{h}/{int(fused_norm)}"] = r.far.warm_up_kernel(
                        WORLD, h, r.device, fused_norm=fused_norm
                    )
        say("  compiled: " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()) + " (rank 0)")
    with wd.phase("line up after compile", case_s):
        dist.barrier()
    phases["compile"] = time.monotonic() - tp

    # 2. symmetric memory
    tp = time.monotonic()
    backend_note = ""
    if r.mode.startswith("symmetric"):
        say(f"symmetric memory: symm_mem.empty + rendezvous, {2 * len(hiddens)} buffers")
        with wd.phase("symmetric memory: empty + rendezvous", case_s):
            r.build_symmetric(hiddens, max(max(check_t), max(lat_t)))
            r.sync()
        try:
            import torch.distributed._symmetric_memory as symm_mem

            backend_note = f", symmetric-memory backend {symm_mem.get_backend(r.device)}"
        except Exception as exc:  # informational only
            backend_note = f", symmetric-memory backend ? ({type(exc).__name__})"
    phases["symmetric_memory"] = time.monotonic() - tp
    say(f"fused op ({r.mode}): {FUSED_MODES[r.mode]}{backend_note}")

    # 3. smoke: the first fused calls, on the smallest shape
    tp = time.monotonic()
    h0 = min(check_h)
    label = f"smoke: first fused calls (both variants), 1 token x hidden {h0}"
    say(label)
    with wd.phase(label, case_s):
        dist.barrier()
        smoke = r.check(*r.inputs(1, h0, seed=4242), h0, 1, special=False)
        r.sync()
    phases["smoke"] = time.monotonic() - tp
    say(f"  smoke: {'ok' if smoke['ok'] else 'MISMATCH'} on rank 0 ({phases['smoke'] * 1e3:.0f} ms)")

    # 4. (a) bitwise, smallest shapes first
    tp = time.monotonic()
    rows = []
    cases = [(h, t, False) for h in sorted(check_h) for t in sorted(check_t)]
    cases += [(h, 4, True) for h in sorted({min(check_h), max(check_h)})]
    for i, (h, t, special) in enumerate(cases):
        label = f"(a) bitwise {i + 1}/{len(cases)}: hidden {h}, " + (
            "special values" if special else f"{t} tokens"
        )
        say(label)
        with wd.phase(label, case_s):
            dist.barrier()
            rows.append(r.check(*r.inputs(t, h, seed=i + 1, special=special), h, t, special=special))
            r.sync()
    all_rows = [None] * WORLD
    with wd.phase("(a) gather the results", case_s):
        dist.all_gather_object(all_rows, rows)
    phases["bitwise"] = time.monotonic() - tp

    # 5. (b) latency
    tp = time.monotonic()
    lat = []
    for i, (h, t) in enumerate((h, t) for h in lat_h for t in lat_t):
        label = f"(b) latency {i + 1}/{len(lat_h) * len(lat_t)}: hidden {h}, {t} tokens"
        say(label)
        with wd.phase(label, case_s):
            dist.barrier()
            lat.append(r.latency(h, t))
            r.sync()
    all_lat = [None] * WORLD
    with wd.phase("(b) gather the results", case_s):
        dist.all_gather_object(all_lat, lat)
    phases["latency"] = time.monotonic() - tp
    if rank == 0:
        report(all_rows, all_lat, r, opts, result_path, phases, compile_s)


def _fmt(c: tuple[int, float]) -> str:
    n, d = c
    return "0" if n == 0 else f"{n}({d:.2g})"


def report(all_rows, all_lat, r: Rank, opts: dict, result_path: str, phases: dict, compile_s: dict) -> None:
    rows = all_rows[0]
    ok_both = [all(rs[i]["ok"] or not rs[i]["counted"] for rs in all_rows) for i in range(len(rows))]
    nccl_diff = [max(rs[i]["nccl_vs_contract"][0] for rs in all_rows) for i in range(len(rows))]
    print()
    print(
        f"(a) bitwise, fused = {r.mode}; rank 0's counts: differing elements (max |diff|); 'ok' needs both "
        "ranks"
    )
    print(
        "    nccl: all_reduce vs rank-order fp32 sum rounded once; unf: the one-kernel fused op vs the "
        "unfused path (NCCL, then the\n    norm kernel; summed/normed); ctr: the same vs the contract "
        "reference; tn: the kernel + contract.rms_norm (torch's mean)\n    vs its reference; tn~ctr: its "
        "normed vs the GPU contract's (information); neg: residual_before_rounding vs the kernel's "
        "summed (must differ)"
    )
    print(
        f"{'hidden':>6} {'tokens':>6} {'nccl':>8} {'unf sum':>8} {'unf norm':>8} {'ctr sum':>8} "
        f"{'ctr norm':>8} {'tn sum':>7} {'tn norm':>7} {'tn~ctr':>9} {'neg (frac)':>17} {'ok':>4}"
    )
    for row, ok in zip(rows, ok_both, strict=True):
        neg_n = row["negative_summed"][0]
        label = "spec" if row["special"] else str(row["tokens"])
        print(
            f"{row['hidden']:>6} {label:>6} {_fmt(row['nccl_vs_contract']):>8} "
            f"{_fmt(row['fused_vs_unfused_summed']):>8} {_fmt(row['fused_vs_unfused_normed']):>8} "
            f"{_fmt(row['fused_vs_contract_summed']):>8} {_fmt(row['fused_vs_contract_normed']):>8} "
            f"{_fmt(row['torchnorm_vs_ref_summed']):>7} {_fmt(row['torchnorm_vs_ref_normed']):>7} "
            f"{_fmt(row['torchnorm_vs_contract_normed']):>9} "
            f"{neg_n:>8} ({neg_n / row['elements']:.3f}) {'yes' if row['ok'] and ok else 'NO':>4}"
            + ("" if row["counted"] else " (not counted: the interpreter mishandles bf16 subnormals)")
        )
    net = "NCCL" if r.cuda else "gloo"
    if any(nccl_diff):
        print(
            f"FINDING: {net}'s bf16 all_reduce of the 2 partials differs from the contract's rank-order fp32 "
            f"sum rounded once in {sum(1 for n in nccl_diff if n)} case(s): the unfused path the issue means "
            "is the contract's (parity.tp.rank_order_sum); the kernel is judged against that."
        )
    else:
        print(
            f"FINDING: {net}'s bf16 all_reduce of the 2 partials equals the contract's rank-order fp32 sum "
            "rounded once (parity.tp.rank_order_sum) in every case, specials included."
        )
    lat = [
        {k: (max(ls[i][k] for ls in all_lat) if k.endswith("_us") else v) for k, v in all_lat[0][i].items()}
        for i in range(len(all_lat[0]))
    ]
    unit = "CUDA events" if r.cuda else "perf_counter on the CPU: meaningless"
    print()
    print(
        f"(b) latency, us, median of {opts['iters']} after {opts['warmup']} warm-up ({unit}); the slower "
        f"rank's median; ratio = fused / unfused; fused = {r.mode} ({phases['latency']:.1f} s)"
    )
    print(
        f"{'hidden':>6} {'tokens':>6} {'allreduce':>9} {'unfused':>9} {'fused 1k':>9} {'ratio':>6} "
        f"{'fused+tn':>10} {'ratio':>6}"
    )
    for x in lat:
        print(
            f"{x['hidden']:>6} {x['tokens']:>6} {x['allreduce_us']:>9.1f} {x['unfused_us']:>9.1f} "
            f"{x['fused_onek_us']:>9.1f} {x['fused_onek_us'] / x['unfused_us']:>6.2f} "
            f"{x['fused_torchnorm_us']:>10.1f} {x['fused_torchnorm_us'] / x['unfused_us']:>6.2f}"
        )
    slower = [x for x in lat if x["fused_onek_us"] > x["unfused_us"]]
    print(
        "goal (fused no slower than unfused at every size): "
        + ("met" if not slower else "NOT met at " + ", ".join(f"{x['hidden']}x{x['tokens']}" for x in slower))
    )
    failed = [i for i, ok in enumerate(ok_both) if not ok]
    status = 0 if not failed else 1
    if r.symm_error:
        status = status or 2
    print()
    print("phases (rank 0, s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(
        f"bitwise: {len(ok_both) - len(failed)}/{len(ok_both)} cases ok on both ranks; fused op: {r.mode}"
        + (f"; symmetric-memory op failed: {r.symm_error.strip().splitlines()[-1]}" if r.symm_error else "")
    )
    Path(result_path).write_text(
        json.dumps(
            {
                "status": status,
                "mode": r.mode,
                "symm_error": r.symm_error,
                "phases_s": phases,
                "compile_s": compile_s,
                "checks": all_rows,
                "latency": lat,
            },
            indent=1,
        )
    )


def launch(opts: dict, result_path: str) -> tuple[int, str]:
    """Both ranks; returns (status, why) where status is 0 or a rank's failure (3 died / raised, 4 hung).
    A failing rank gets its peer 15 s to fail on its own (its watchdog prints where it is) before the
    peer is terminated (its SIGTERM handler prints its stacks)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(free_port(), opts, result_path), nprocs=WORLD, join=False)
    try:
        while not ctx.join(grace_period=15):
            pass
    except mp.ProcessExitedException as exc:
        if exc.exit_code in (EXIT_WATCHDOG, EXIT_FAULTHANDLER):
            return EXIT_WATCHDOG, f"rank {exc.error_index} hung (watchdog, exit {exc.exit_code}): {exc}"
        return EXIT_ERROR, f"rank {exc.error_index} died: {exc}"
    except Exception as exc:
        return EXIT_ERROR, f"a rank died: {type(exc).__name__}: {exc}"
    return 0, ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: nccl on cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: full on cuda, tiny on cpu")
    ap.add_argument(
        "--fused", choices=sorted(FUSED_MODES), default=None, help="default: symmetric on cuda, gather on cpu"
    )
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 50; 2 on cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="default 5; 1 on cpu")
    ap.add_argument("--timeout", type=float, default=120.0, help="process-group (and rendezvous) timeout, s")
    ap.add_argument(
        "--case-timeout",
        type=float,
        default=None,
        help="watchdog per phase / case, s (default 60; 600 on cpu)",
    )
    ap.add_argument(
        "--compile-timeout",
        type=float,
        default=None,
        help="watchdog per kernel compile, s (default 120; 600 on cpu)",
    )
    ap.add_argument(
        "--barrier-timeout-ms",
        type=int,
        default=20_000,
        help="symmetric-memory barrier timeout (the barrier kernel traps past it); 0: wait forever",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    fused = args.fused or ("symmetric" if cuda else "gather")
    if fused.startswith("symmetric") and not cuda:
        ap.error(f"--fused {fused} needs CUDA (torch symmetric memory)")
    opts = {
        "device": args.device,
        "backend": args.backend or ("nccl" if cuda else "gloo"),
        "size": args.size or ("full" if cuda else "tiny"),
        "fused": fused,
        "iters": args.iters or (50 if cuda else 2),
        "warmup": args.warmup if args.warmup is not None else (5 if cuda else 1),
        "timeout": args.timeout,
        "case_timeout": args.case_timeout or (60.0 if cuda else 600.0),
        "compile_timeout": args.compile_timeout or (120.0 if cuda else 600.0),
        "barrier_timeout_ms": args.barrier_timeout_ms,
    }
    if cuda and torch.cuda.device_count() < WORLD:
        print(f"needs {WORLD} GPUs, found {torch.cuda.device_count()}", flush=True)
        return 2
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before the children import the kernel
    import triton

    names = [torch.cuda.get_device_name(i) for i in range(WORLD)] if cuda else ["cpu"]
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else "-"
    print(
        f"fused all-reduce + RMSNorm, TP={WORLD}: {', '.join(names)}; torch {torch.__version__}, "
        f"triton {triton.__version__}, NCCL {nccl}, backend {opts['backend']}, size {opts['size']}, "
        f"fused {opts['fused']}; watchdog {opts['case_timeout']:g} s per case, "
        f"{opts['compile_timeout']:g} s per compile; symmetric barrier timeout "
        f"{opts['barrier_timeout_ms']} ms; " + " ".join(f"{k}={os.environ[k]}" for k in NO_MULTICAST),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        t0 = time.perf_counter()
        status, why = launch(opts, result_path)
        if status:
            print(f"FAILED ({time.perf_counter() - t0:.1f} s): {why}", flush=True)
            return status
        if not os.path.exists(result_path):
            print("FAILED: rank 0 wrote no result", flush=True)
            return EXIT_ERROR
        result = json.loads(Path(result_path).read_text())
        if args.json:
            args.json.write_text(json.dumps({"devices": names, "opts": opts, **result}, indent=1))
    print(f"done in {time.perf_counter() - t0:.1f} s, exit status {result['status']}", flush=True)
    return int(result["status"])


if __name__ == "__main__":
    sys.exit(main())
