"""Issue 12 on 2 GPUs: weight-sync throughput trainer (GPU 0) -> sidecar (GPU 1), bf16 and FP8, vs a plain
``torch.distributed.broadcast`` of the same bytes.

Two processes (``torch.multiprocessing``), one GPU each, NVLink multicast off (``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``, set before anything initialises).

- Rank 0, the trainer: the real client code. A ``WeightSyncClient`` per bucket size and quantization
  (a trainer has one client, whose laid-out manifest is reused push after push), whose group is made by
  the real ``weight_sync.sidecar.group.make_store`` / ``new_group`` (what ``connect()`` does, without
  the HTTP ``/connect`` call); each push is what ``WeightSyncClient.push`` does between ``prepare``
  and ``commit``: ``client.manifest(named_tensors(state_dict))`` then ``client._stream(...)`` (pack
  bucket k+1 into one of two reused send slots while bucket k is broadcast).
- Rank 1, the sidecar: the real receive path. The manifest arrives as JSON (through the rendezvous
  store instead of ``POST /update_weights``), ``plan.validate`` checks it against the served model's
  tensor list (the synthetic checkpoint's names and shapes; block-FP8 names for ``fp8_block``) and
  ``pipeline.receive`` receives every bucket into the staging buffer (bf16: straight into place,
  NaN/Inf-checked) or into two ring slots and FP8-quantizes them into the staging buffer, buffers
  allocated with ``pipeline.allocate`` once and reused as the updater reuses them. After each push
  (not inside its time) the hand-off payload SGLang would get is built from the staged tensors
  (``updater.Staged`` -> ``serialize_named_tensors``: CUDA IPC handles); then, untimed, the
  benchmark does the consumer's part and gives the handles' reference counts back, as SGLang does when
  it drops them (else the producer exits with shared CUDA memory outstanding and crashes in teardown).
  NO SGLang server runs: no pause / load / flush, and no HTTP.
- The ceiling: ``torch.distributed.broadcast`` (the default NCCL group) of the same bucket sizes,
  back to back, from one preallocated buffer into the receiver's staging buffer.

Every round runs plain, bf16 and FP8 once (interleaved; the first round is a warm-up), both ranks
lined up on a barrier before each transfer. Seconds per push: from that barrier until both ranks
are done (rank 0's send slots drained and the sidecar's last bucket staged, the receive's own host
synchronization included), read on rank 0 after a small all-gather. GB/s = wire bytes (bf16, as the
trainer sends them for both modes) / seconds.

With ``--ablate`` (the default) every round also runs the bf16 push with one part taken out, to show
what each part costs (rows, "of plain" as for bf16):

- ``nopack``: the sender broadcasts straight from its send slots (``WeightSyncClient._pack`` does
  nothing; they still hold the bf16 push's buckets, run just before with the same layout, so the
  sidecar checks finite bf16 values as usual; should it flag one, the row says so and goes on);
- ``nocheck``: the sidecar stages without the NaN/Inf checks (``pipeline.stage_bucket`` does nothing);
- ``bare``: both: what is left is the pipeline itself (slots, events, posting, host launches);
- ``oldlay``: the manifest as laid out before issue 12's changes (``plan.layout_buckets``, rebuilt at
  every push; no ramp at the ends), with the current stream and receive code;
- ``hiprio`` (NCCL only): the bf16 push over a second group whose NCCL stream has high priority
  (``ProcessGroupNCCL.Options(is_high_priority_stream=True)``): whether the packs / checks delay the
  broadcast's kernels on the SMs.

And for every push row, from CUDA events (host clocks on the CPU): ``fill ms``, from the barrier until
the first broadcast may start (rank 0: manifest, then bucket 0 packed), and ``drain ms``, from the
last bucket landing on the sidecar (its wait, marked on the current stream) until the receive
returned (the last checks, the final host synchronization).

The model: a synthetic Llama-3-8B (32 layers, hidden 4096, intermediate 14336, 32 heads / 8 kv heads,
vocab 128256, untied lm_head: 8.03 B parameters, 16.06 GB of bf16) made with ``randn`` on GPU 0.

    python benchmarks/bench_weight_sync_nccl.py [--json PATH] [--pushes 5] [--buckets-mib 256,1024,4096]
        [--no-ablate]
    python benchmarks/bench_weight_sync_nccl.py --backend gloo --device cpu --size tiny   # dry run
"""

from __future__ import annotations

import os

# NVLink multicast can take a shared host's GPUs out of service: off before torch initialises anything.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)

import argparse  # noqa: E402
import base64  # noqa: E402
import datetime  # noqa: E402
import faulthandler  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
WORLD = 2
MODES = ("bf16", "fp8")
METHOD = {"bf16": "none", "fp8": "fp8_block", "bf16-old": "none"}
# The rows: what -> (manifest, sender packs, sidecar checks, high-priority group). "bf16-old": the
# layout before issue 12 (plan.layout_buckets, rebuilt every push).
VARIANTS = {
    "bf16": ("bf16", True, True, False),
    "fp8": ("fp8", True, True, False),
    "nopack": ("bf16", False, True, False),
    "nocheck": ("bf16", True, False, False),
    "bare": ("bf16", False, False, False),
    "oldlay": ("bf16-old", True, True, False),
    "hiprio": ("bf16", True, True, True),
}
ABLATIONS = ("nopack", "nocheck", "bare", "oldlay", "hiprio")

# hidden, intermediate, layers, heads, kv heads, vocab; default bucket sizes (MiB)
SIZES = {
    "8b": ((4096, 14336, 32, 32, 8, 128256), (256, 1024, 4096)),  # Llama-3-8B
    "small": ((4096, 14336, 4, 32, 8, 128256), (256, 1024)),  # 4 layers: 3.9 GB, a quick GPU check
    "tiny": ((256, 512, 2, 4, 2, 1024), (1 / 16, 1 / 4, 1)),  # 64 KiB .. 1 MiB buckets
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_specs(hidden, inter, layers, heads, kv_heads, vocab) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama checkpoint names and shapes, in HF's state-dict order."""
    hd = hidden // heads
    specs = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (heads * hd, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * hd, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * hd, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def served_model(specs, method: str):
    """What the sidecar reads from the served checkpoint's headers: bf16, or its block-FP8 version."""
    from weight_sync.sidecar.served import ServedModel, TensorSpec

    if method == "none":
        return ServedModel("synthetic-llama", {n: TensorSpec(s, "bfloat16") for n, s in specs})
    from weight_sync.fp8 import DEFAULT_POLICY

    out = {}
    for n, s in specs:
        for t in DEFAULT_POLICY.specs(n, s, torch.bfloat16):
            out[t.name] = TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
    return ServedModel("synthetic-llama-fp8", out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def manifest_key(bucket_mib: float, mode: str) -> str:
    return f"bench/manifest/{bucket_mib:g}/{mode}"


class Clock:
    """Marks on the device's timeline: CUDA events recorded on the current stream (elapsed once the
    device is synchronized), or host times on the CPU (gloo's waits block the host)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, a, b) -> float:
        if a is None or b is None:
            return float("nan")
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class FirstBroadcast:
    """Rank 0's group for one push: marks when the first broadcast is posted (its stream then waits
    for what the current stream holds: bucket 0 packed), i.e. when bytes may start to move."""

    def __init__(self, group, clock: Clock):
        self.group, self.clock, self.first = group, clock, None

    def broadcast(self, tensor):
        if self.first is None:
            self.first = self.clock.mark()
        return self.group.broadcast(tensor)

    def __getattr__(self, name):
        return getattr(self.group, name)


class Landed:
    """A receive's work: ``wait()`` then a mark on the current stream (fires once the bucket has
    landed, and the checks queued before it ran: they overlap the next receive, so it is ~the landing)."""

    def __init__(self, work, clock: Clock, marks: list):
        self.work, self.clock, self.marks = work, clock, marks

    def wait(self):
        out = self.work.wait()
        self.marks.append(self.clock.mark())
        return out


def release_cuda_ipc(payload_b64: str) -> int:
    """Do what the consumer (SGLang) does when it drops the tensors of a hand-off payload: give back
    the CUDA IPC reference counter of every CUDA tensor in it. Returns how many.

    ``ForkingPickler`` shares a CUDA tensor's storage with its counter at 1, and only a consumer's
    release brings it to 0. This benchmark has no consumer: left at 1, a freed storage waits in torch's
    CUDA IPC "limbo" until the interpreter exits, whose static destructors then free it after CUDA
    and the caching allocator are gone ("Producer process has been terminated before all shared CUDA
    tensors released", then SIGSEGV). Nothing is opened here: ``rebuild_cuda_tensor`` is replaced by
    the release alone."""
    released = 0

    def release(*args):
        nonlocal released
        ref_counter_handle, ref_counter_offset = args[11], args[12]  # rebuild_cuda_tensor's arguments
        if ref_counter_handle is not None:
            torch.UntypedStorage._release_ipc_counter_cuda(ref_counter_handle, ref_counter_offset)
            released += 1

    class Releaser(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
                return release
            return super().find_class(module, name)

    Releaser(io.BytesIO(base64.b64decode(payload_b64))).load()
    return released


def handoff_payload(staging: torch.Tensor, plan, version: str) -> tuple[str, float]:
    """The hand-off payload SGLang would get for the staged version (``updater.Staged`` ->
    ``serialize_named_tensors``), and the seconds building it took.

    On CUDA it is built over a DLPack alias of the staging buffer (the same memory and IPC handle, a
    storage object of its own): sharing a tensor wraps its storage's data pointer in a new ref-counted
    one, so sharing ``staging`` itself push after push would nest thousands of wrappers on the one
    buffer. Once the caller has given the payload's references back (:func:`release_cuda_ipc`), the
    alias and its wrappers are freed with the last view, here, while CUDA is up."""
    from weight_sync.sidecar.sglang_api import serialize_named_tensors
    from weight_sync.sidecar.updater import Staged

    buf = torch.from_dlpack(staging) if staging.device.type == "cuda" else staging
    t0 = time.perf_counter()
    payload = serialize_named_tensors(Staged(buf, plan.staged, version).named_tensors())
    return payload, time.perf_counter() - t0


class Bench:
    """What both ranks share: the groups, the round structure, the end-of-transfer exchange."""

    def __init__(self, rank: int, opts: dict, store, group, hi_group=None):
        import torch.distributed as dist

        self.dist = dist
        self.rank = rank
        self.opts = opts
        self.store = store
        self.group = group
        self.hi_group = hi_group  # the same ranks, NCCL stream of high priority (hiprio rows)
        self.device = torch.device("cuda", rank) if opts["device"] == "cuda" else torch.device("cpu")
        self.clock = Clock(self.device)
        self.specs = llama_specs(*SIZES[opts["size"]][0])
        self.buckets = opts["buckets_mib"]

    def start(self) -> float:
        self.dist.barrier()
        sync(self.device)
        return time.perf_counter()

    def finish(self, mine: list[float]) -> list[list[float]]:
        """All-gather 6 numbers per rank; returns once both ranks are done (a host sync)."""
        t = torch.tensor(mine, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(t) for _ in range(WORLD)]
        self.dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def rounds(self):
        for r in range(self.opts["pushes"] + 1):
            for bucket in self.buckets:
                for what in self.opts["variants"]:
                    yield r, bucket, what

    def manifest_kinds(self) -> list[str]:
        return sorted({VARIANTS[w][0] for w in self.opts["variants"] if w != "plain"})


def trainer(b: Bench) -> dict:
    """Rank 0: the real client's manifest + stream; the plain broadcast's sender."""
    from weight_sync.client import WeightSyncClient, named_tensors
    from weight_sync.sidecar.plan import layout_buckets
    from weight_sync.sidecar.wire import Quantization, dtype_name

    def old_manifest(bucket: float):
        """The layout before issue 12: plan.layout_buckets, built at every push."""
        specs = [(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in named_tensors(state)]
        return layout_buckets(specs, int(bucket * MiB), Quantization())

    dev = b.device
    t0 = time.perf_counter()
    g = torch.Generator(device=dev).manual_seed(0)
    state = {}
    for name, shape in b.specs:
        if len(shape) == 1:
            state[name] = torch.ones(shape, dtype=torch.bfloat16, device=dev)
        else:
            state[name] = torch.randn(shape, generator=g, dtype=torch.bfloat16, device=dev).mul_(0.02)
    sync(dev)
    gen_s = time.perf_counter() - t0
    tensors = named_tensors(state)
    by_name = dict(tensors)
    params = sum(t.numel() for t in state.values())
    # One client per bucket size and manifest kind, as a trainer has one client with one quantization:
    # its manifest is laid out at the first push and reused after (WeightSyncClient.manifest), and its
    # send slots hold its own layout. One client switching quantization every push would lay out again
    # each time (~2 ms of host time before anything moves, counted in the push).
    clients = {}
    manifests = {}
    for bucket in b.buckets:
        for mode in b.manifest_kinds():
            client = WeightSyncClient(
                ["http://127.0.0.1:9"],  # never called: no HTTP in this benchmark
                backend=b.opts["backend"],
                device=dev,
                bucket_bytes=int(bucket * MiB),
                quantization=METHOD[mode],
            )
            client._store, client._group = b.store, b.group  # what connect() leaves behind
            clients[(bucket, mode)] = client
            m = old_manifest(bucket) if mode == "bf16-old" else client.manifest(tensors)
            manifests[(bucket, mode)] = m
            b.store.set(manifest_key(bucket, mode), m.model_dump_json())
    print(
        f"trainer: {len(state)} tensors, {params / 1e9:.3f} B parameters, "
        f"{manifests[(b.buckets[0], 'bf16')].total_bytes / 1e9:.3f} GB of bf16, made in {gen_s:.1f} s",
        flush=True,
    )
    for bucket in b.buckets:
        m = manifests[(bucket, "bf16")]
        sizes = ", ".join(f"{x / MiB:.4g}" for x in m.buckets[:4])
        print(
            f"  bucket {bucket:g} MiB: {len(m.buckets)} buckets, largest {max(m.buckets) / MiB:.1f} MiB; "
            f"first {sizes}, last {m.buckets[-1] / MiB:.4g} MiB"
            + (
                f" (previous layout: {len(manifests[(bucket, 'bf16-old')].buckets)} buckets)"
                if (bucket, "bf16-old") in manifests
                else ""
            ),
            flush=True,
        )
    send = torch.zeros(max(max(m.buckets) for m in manifests.values()), dtype=torch.uint8, device=dev)
    results: dict[tuple, list] = {}
    for r, bucket, what in b.rounds():
        if what == "plain":
            sizes = manifests[(bucket, "bf16")].buckets
            t0 = b.start()
            works = [b.dist.broadcast(send[:n], src=0, async_op=True) for n in sizes]
            for w in works:
                w.wait()
            sync(dev)
            mine = [time.perf_counter() - t0, 0.0, 0.0, 0.0, 0.0, 0.0]
        else:
            kind, pack, _, hi = VARIANTS[what]
            client = clients[(bucket, kind)]
            timed = FirstBroadcast(b.hi_group if hi else b.group, b.clock)
            client._group = timed
            if not pack:
                client._pack = lambda slot, entries, by_name: None  # broadcast the slots as they are
            try:
                t0 = b.start()
                start = b.clock.mark()
                if kind == "bf16-old":
                    manifest = old_manifest(bucket)
                else:
                    manifest = client.manifest(named_tensors(state))  # as push() lays it out every time
                stream_s, gather_s, error = client._stream(manifest, by_name, None)
                if error is not None:
                    raise error
                sync(dev)
            finally:
                client._group = b.group
                client.__dict__.pop("_pack", None)
            fill = b.clock.seconds(start, timed.first)
            mine = [time.perf_counter() - t0, stream_s, gather_s, fill, 0.0, 0.0]
        theirs = b.finish(mine)
        seconds = time.perf_counter() - t0
        if r > 0:
            results.setdefault((bucket, what), []).append(
                {"seconds": seconds, "trainer": mine, "sidecar": theirs[1]}
            )
    for client in clients.values():
        client._group = None  # the group is the benchmark's, closed below
        client.close()
    info = {
        "params": params,
        "tensors": len(state),
        "wire_bytes": manifests[(b.buckets[0], "bf16")].total_bytes,
        "buckets": {f"{k:g}": len(manifests[(k, "bf16")].buckets) for k in b.buckets},
        "largest_bucket": {f"{k:g}": max(manifests[(k, "bf16")].buckets) for k in b.buckets},
        "bucket_wire_bytes": {f"{k:g}": manifests[(k, "bf16")].total_bytes for k in b.buckets},
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
    }
    return {"results": results, "info": info}


def sidecar(b: Bench) -> dict:
    """Rank 1: plan.validate -> pipeline.receive (FP8 when the manifest says so) -> hand-off payload."""
    import torch.multiprocessing  # noqa: F401  (registers the CUDA/shared-memory tensor reductions)

    from weight_sync.sidecar import pipeline
    from weight_sync.sidecar.errors import NonFinite
    from weight_sync.sidecar.pipeline import ReceiveStats, allocate, receive
    from weight_sync.sidecar.plan import Limits, validate
    from weight_sync.sidecar.wire import Manifest

    dev = b.device
    if dev.type == "cpu":
        torch.multiprocessing.set_sharing_strategy("file_system")  # as the updater does on the CPU
    served = {mode: served_model(b.specs, METHOD[mode]) for mode in MODES}
    manifests = {
        (k, mode): Manifest.model_validate_json(b.store.get(manifest_key(k, mode)))
        for k in b.buckets
        for mode in b.manifest_kinds()
    }
    largest = max(max(m.buckets) for m in manifests.values())
    default_limit = Limits().max_bucket_bytes
    limits = Limits(max_bucket_bytes=max(default_limit, largest))
    plans, validate_s = {}, {}
    for key, m in manifests.items():
        t0 = time.perf_counter()
        plans[key] = validate(m, served["fp8" if key[1] == "fp8" else "bf16"], limits)
        validate_s[key] = time.perf_counter() - t0
    # Allocated once, as the updater keeps its staging buffer (spare) and ring between pushes.
    staging = allocate(max(p.staging_nbytes for p in plans.values()), dev, shared=True)
    ring_bytes = max(p.ring_bytes for p in plans.values())
    ring = [allocate(ring_bytes, dev, shared=False) for _ in range(2)]
    results: dict[tuple, list] = {}
    flagged: set[str] = set()  # nopack rows whose slot bytes were flagged non-finite
    for r, bucket, what in b.rounds():
        if what == "plain":
            plan = plans[(bucket, "bf16")]
            t0 = b.start()
            works = [
                b.dist.broadcast(staging[p.staging_base : p.staging_base + p.nbytes], src=0, async_op=True)
                for p in plan.buckets
            ]
            for w in works:
                w.wait()
            sync(dev)
            mine = [time.perf_counter() - t0, 0.0, 0.0, 0.0, 0.0, 0.0]
            b.finish(mine)
            continue
        kind, _, check, hi = VARIANTS[what]
        plan = plans[(bucket, kind)]
        group = b.hi_group if hi else b.group
        marks: list = []

        def post(dst, group=group, marks=marks):
            return Landed(group.broadcast(dst), b.clock, marks)

        real_stage = pipeline.stage_bucket
        if not check:
            # no NaN/Inf check (ablation; bf16 only: on the FP8 path staging is the quantization)
            pipeline.stage_bucket = lambda bucket, src, staging: pipeline.BucketChecks([], None)
        try:
            t0 = b.start()
            start = b.clock.mark()
            try:
                stats = receive(plan, staging, None if plan.direct else ring, post)
            except NonFinite as exc:  # nopack: the slots' bytes were not this push's (see the docstring)
                if what != "nopack":
                    raise
                flagged.add(f"{bucket:g}: {exc}")
                stats = ReceiveStats()
            end = b.clock.mark()
        finally:
            pipeline.stage_bucket = real_stage
        sync(dev)
        drain = b.clock.seconds(marks[-1], end)
        landed = b.clock.seconds(start, marks[-1])
        mine = [time.perf_counter() - t0, stats.total_s, stats.wait_s, stats.stage_s, drain, landed]
        b.finish(mine)
        if what not in MODES:
            if r > 0:
                results.setdefault((bucket, what), []).append({})
            continue
        released, handoff = 0, float("nan")
        try:
            text, handoff = handoff_payload(staging, plan, f"v{r}")
            payload = len(text)
            if dev.type == "cuda":  # the consumer's part, after the timing: drop the handles
                released = release_cuda_ipc(text)
            del text
        except Exception as exc:  # reported, the throughput numbers still count
            payload = f"hand-off payload failed: {type(exc).__name__}: {exc}"
        if r > 0:
            results.setdefault((bucket, what), []).append(
                {"handoff_s": handoff, "payload_bytes": payload, "ipc_released": released}
            )
    try:
        restore = restore_point_copy(staging, plans[(b.buckets[0], "bf16")].staging_nbytes, b.opts)
    except Exception as exc:
        restore = {"error": f"{type(exc).__name__}: {exc}"}
    info = {
        "validate_s": {f"{k:g}/{m}": v for (k, m), v in validate_s.items()},
        "buckets": {f"{k:g}/{m}": len(p.buckets) for (k, m), p in plans.items()},
        "staging_bytes": {f"{k:g}/{m}": p.staging_nbytes for (k, m), p in plans.items()},
        "staging_alloc_bytes": staging.numel(),
        "ring_bytes": ring_bytes,
        "nopack_flagged": sorted(flagged),
        "default_max_bucket_bytes": default_limit,
        "largest_bucket": largest,
        "restore": restore,
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
    }
    # Free the buffers now, in order, while CUDA is up: nothing shared is left for the exit.
    sync(dev)
    del staging, ring
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.ipc_collect()
    return {"results": results, "info": info}


def restore_point_copy(staging: torch.Tensor, nbytes: int, opts: dict) -> dict | None:
    """The updater's keep_previous step after a GPU push (``_commit_success``): the staged version is
    copied to host RAM, in shared memory when /dev/shm can hold it (else pageable; a full /dev/shm
    would kill the process with SIGBUS). Timed twice: first touch, then the reused buffer."""
    from weight_sync.sidecar.pipeline import allocate

    if staging.device.type != "cuda" or not opts["restore_copy"]:
        return None
    try:
        st = os.statvfs("/dev/shm")
        shm_free = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = 0
    shared = shm_free > nbytes + (1 << 30)
    t0 = time.perf_counter()
    host = allocate(nbytes, "cpu", shared=shared)
    alloc_s = time.perf_counter() - t0
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        host[:nbytes].copy_(staging[:nbytes])
        times.append(time.perf_counter() - t0)
    del host
    return {"bytes": nbytes, "shared": shared, "shm_free": shm_free, "alloc_s": alloc_s, "copy_s": times}


def high_priority_group(store, rank: int, device: torch.device, timeout_s: float):
    """What ``group.new_group`` builds for NCCL, with the NCCL stream at high priority (hiprio rows)."""
    import torch.distributed as dist

    from weight_sync.sidecar.group import Group

    opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    pg = dist.ProcessGroupNCCL(dist.PrefixStore("bench/hiprio/", store), rank, WORLD, opts)
    group = Group(pg, "bench-hiprio", rank, WORLD, "nccl", device)
    probe = torch.zeros(1, dtype=torch.int64, device=device)
    group.broadcast(probe).wait()  # connects now, not inside a timed push
    sync(device)
    return group


def worker(rank: int, port: int, opts: dict, result_path: str) -> None:
    import torch.distributed as dist

    from weight_sync.sidecar.group import make_store, new_group

    faulthandler.enable(all_threads=True)  # a crash (SIGSEGV, SIGABRT) prints where
    cuda = opts["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # two ranks on a small CPU: no oversubscription
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    timeout = opts["timeout"]
    store = make_store("127.0.0.1", port, is_master=rank == 0, timeout_s=timeout)
    kw = {"device_id": device} if cuda else {}
    dist.init_process_group(
        opts["backend"],
        store=dist.PrefixStore("bench/world/", store),
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=timeout),
        **kw,
    )
    group = new_group(
        store,
        group_id="bench",
        rank=rank,
        world_size=WORLD,
        backend=opts["backend"],
        timeout_s=timeout,
        device=device,
        local_host="127.0.0.1",
    )
    hi_group = None
    if "hiprio" in opts["variants"]:
        hi_group = high_priority_group(store, rank, device, timeout)
    try:
        b = Bench(rank, opts, store, group, hi_group)
        mine = trainer(b) if rank == 0 else sidecar(b)
        both = [None] * WORLD
        dist.all_gather_object(both, mine)
        if rank == 0:
            report(both[0], both[1], opts, result_path)
        # Teardown in order: every rank's GPU work done and its tensors freed (shared ones given back),
        # then both ranks line up before any process group goes away.
        del b, mine, both
        sync(device)
        gc.collect()
        if cuda:
            torch.cuda.ipc_collect()
        dist.barrier()
        if rank == 0:
            Path(result_path + ".done").write_text("both ranks finished")
    finally:
        if hi_group is not None:
            hi_group.close()
        group.close()
        dist.destroy_process_group()


def report(tr: dict, sc: dict, opts: dict, result_path: str) -> None:
    wire = tr["info"]["wire_bytes"]
    rows = []
    for bucket in opts["buckets_mib"]:
        plain = statistics.median(x["seconds"] for x in tr["results"][(bucket, "plain")])
        bucket_wire = tr["info"]["bucket_wire_bytes"][f"{bucket:g}"]  # bucket padding included
        for what in opts["variants"]:
            runs = tr["results"][(bucket, what)]
            sec = statistics.median(x["seconds"] for x in runs)
            kind = VARIANTS[what][0] if what != "plain" else "bf16"
            row = {
                "bucket_mib": bucket,
                "mode": what,
                "buckets": sc["info"]["buckets"][f"{bucket:g}/{kind}"],
                "seconds": sec,
                "all_seconds": [x["seconds"] for x in runs],
                "gbps": bucket_wire / sec / 1e9,
                "of_plain": plain / sec,
            }
            if what != "plain":
                row.update(
                    stream_s=statistics.median(x["trainer"][1] for x in runs),
                    receive_s=statistics.median(x["sidecar"][1] for x in runs),
                    wait_s=statistics.median(x["sidecar"][2] for x in runs),
                    stage_s=statistics.median(x["sidecar"][3] for x in runs),
                    fill_s=statistics.median(x["trainer"][3] for x in runs),
                    drain_s=statistics.median(x["sidecar"][4] for x in runs),
                    landed_s=statistics.median(x["sidecar"][5] for x in runs),
                    validate_s=sc["info"]["validate_s"][f"{bucket:g}/{kind}"],
                )
            if what in MODES:
                side = sc["results"][(bucket, what)]
                row.update(
                    handoff_s=statistics.median(x["handoff_s"] for x in side),
                    payload_bytes=side[0]["payload_bytes"],
                    ipc_released=side[0].get("ipc_released", 0),
                )
            rows.append(row)
    gpu = opts["devices"]
    print()
    print(
        f"weight sync trainer (rank 0, {gpu[0]}) -> sidecar (rank 1, {gpu[-1]}), backend {opts['backend']}; "
        f"{wire / 1e9:.3f} GB on the wire per push (bf16), median of {opts['pushes']} pushes after 1 warm-up"
    )
    print(
        "NO SGLang server: the sidecar's receive path only (validate -> receive -> staging / FP8 -> hand-off"
    )
    print("payload); no HTTP, no pause / load / flush. GB/s = wire bytes / s; 'of plain' = plain s / push s.")
    print(
        f"{'bucket':>8} {'mode':>7} {'buckets':>7} {'s/push':>8} {'GB/s':>7} {'of plain':>8} "
        f"{'stream s':>8} {'recv s':>8} {'stage s':>8} {'hand-off s':>10} {'validate s':>10} "
        f"{'fill ms':>7} {'drain ms':>8}"
    )
    for x in rows:
        extra = ""
        if x["mode"] != "plain":
            handoff = f"{x['handoff_s']:>10.4f}" if "handoff_s" in x else f"{'-':>10}"
            extra = (
                f" {x['stream_s']:>8.4f} {x['receive_s']:>8.4f} {x['stage_s']:>8.4f} {handoff} "
                f"{x['validate_s']:>10.4f} {x['fill_s'] * 1e3:>7.2f} {x['drain_s'] * 1e3:>8.2f}"
            )
        print(
            f"{x['bucket_mib']:>6g}Mi {x['mode']:>7} {x['buckets']:>7} {x['seconds']:>8.4f} "
            f"{x['gbps']:>7.1f} {x['of_plain']:>8.3f}" + extra
        )
    print()
    for bucket in opts["buckets_mib"]:
        by = {x["mode"]: x for x in rows if x["bucket_mib"] == bucket}
        added = by["fp8"]["seconds"] / by["bf16"]["seconds"] - 1
        print(
            f"bucket {bucket:g} MiB: bf16 {by['bf16']['of_plain']:.3f} of plain (goal >= 0.9: "
            f"{'met' if by['bf16']['of_plain'] >= 0.9 else 'NOT met'}); FP8 {by['fp8']['of_plain']:.3f} of "
            f"plain, adds {added * 100:+.1f}% to bf16's push time (goal <= 5%: "
            f"{'met' if added <= 0.05 else 'NOT met'})"
        )
        if "bare" in by:
            plain = by["plain"]["seconds"]
            bf = by["bf16"]

            def cost(what, by=by, bf=bf, plain=plain):
                d = bf["seconds"] - by[what]["seconds"]
                return f"{d * 1e3:+.2f} ms ({d / plain * 100:+.1f}% of plain)"

            extra = [f"the pack copies {cost('nopack')}", f"the NaN/Inf checks {cost('nocheck')}"]
            extra.append(f"pipeline without both (bare) {by['bare']['of_plain']:.3f} of plain")
            extra.append(
                f"fill {bf['fill_s'] * 1e3:.2f} ms + drain {bf['drain_s'] * 1e3:.2f} ms = "
                f"{(bf['fill_s'] + bf['drain_s']) / plain * 100:.1f}% of plain"
            )
            for what, label in (("oldlay", "previous layout"), ("hiprio", "high-priority NCCL stream")):
                if what in by:
                    extra.append(
                        f"{label} {by[what]['of_plain']:.3f} of plain ({by[what]['buckets']} buckets)"
                    )
            print("  bf16 push time spent on: " + "; ".join(extra))
    print(
        "stream s: rank 0's WeightSyncClient._stream host time (it does not wait for the GPU); recv s: "
        "pipeline.receive on rank 1 (its final host sync included); stage s: host time spent staging "
        "(launching checks / FP8); hand-off s: building the CUDA IPC payload (after the push, not in "
        "s/push); fill ms: barrier -> first broadcast may start (rank 0: manifest + bucket 0 packed); "
        "drain ms: last bucket landed on rank 1 -> its receive returned (last checks + host sync); both "
        "from CUDA events. "
        "Ablation rows (bf16 push minus one part): nopack (no pack copies), nocheck (no NaN/Inf checks), "
        "bare (neither), oldlay (layout before issue 12), hiprio (NCCL stream of high priority)"
    )
    si = sc["info"]
    print(
        f"sidecar: staging buffer {si['staging_alloc_bytes'] / 1e9:.2f} GB (bf16 version; FP8 "
        f"{min(v for k, v in si['staging_bytes'].items() if k.endswith('fp8')) / 1e9:.2f} GB), FP8 ring "
        f"2 x {si['ring_bytes'] / MiB:.0f} MiB; peak GPU memory: trainer "
        f"{tr['info']['peak_mem_gb'] or 0:.1f} GB, sidecar {si['peak_mem_gb'] or 0:.1f} GB"
    )
    if si["largest_bucket"] > si["default_max_bucket_bytes"]:
        print(
            f"NOTE: the largest bucket ({si['largest_bucket'] / MiB:.0f} MiB) is over the sidecar's default "
            f"limit ({si['default_max_bucket_bytes'] / MiB:.0f} MiB, --max-bucket-mib): a default sidecar "
            "refuses it (bad_layout); this run raised plan.Limits.max_bucket_bytes to it"
        )
    shared = {x["mode"]: x["ipc_released"] for x in rows if x["mode"] in MODES}
    if any(shared.values()):
        print(
            "hand-off: the payload's CUDA IPC references were given back after each push (the consumer's "
            "part, no SGLang here): " + ", ".join(f"{m} {n}" for m, n in shared.items()) + " per payload"
        )
    bad = [x for x in rows if isinstance(x.get("payload_bytes"), str)]
    if bad:
        print(f"NOTE: {bad[0]['payload_bytes']}")
    if si.get("nopack_flagged"):
        print(f"NOTE: nopack rows: the sidecar flagged the unpacked slots: {si['nopack_flagged'][0]}")
    rs = si.get("restore")
    if rs and "error" in rs:
        print(f"restore point copy failed: {rs['error']}")
    elif rs:
        where = "shared memory (/dev/shm)" if rs["shared"] else "pageable memory (/dev/shm too small)"
        print(
            f"restore point (updater keep_previous, after apply; not in s/push): {rs['bytes'] / 1e9:.2f} GB "
            f"GPU -> host {where}: first {rs['copy_s'][0]:.2f} s ({rs['bytes'] / rs['copy_s'][0] / 1e9:.1f} "
            f"GB/s), reused buffer {rs['copy_s'][1]:.2f} s ({rs['bytes'] / rs['copy_s'][1] / 1e9:.1f} GB/s)"
        )
    Path(result_path).write_text(
        json.dumps(
            {"rows": rows, "trainer": tr["info"], "sidecar": si, "opts": {k: v for k, v in opts.items()}},
            indent=1,
            default=str,
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--backend", choices=["nccl", "gloo"], default=None, help="default: nccl on cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 8b on cuda, tiny on cpu")
    ap.add_argument("--buckets-mib", default=None, help="comma-separated bucket sizes (default per size)")
    ap.add_argument("--pushes", type=int, default=5, help="timed pushes per configuration (+1 warm-up)")
    ap.add_argument("--no-restore-copy", dest="restore_copy", action="store_false")
    ap.add_argument(
        "--ablate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the bf16 push without packing / checks / both, with the previous layout and "
        "(NCCL) a high-priority stream: where the time goes (default: on)",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, s")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.pushes < 1:
        ap.error("--pushes must be at least 1")
    cuda = args.device == "cuda"
    size = args.size or ("8b" if cuda else "tiny")
    buckets = tuple(float(x) for x in args.buckets_mib.split(",")) if args.buckets_mib else SIZES[size][1]
    if cuda and torch.cuda.device_count() < WORLD:
        print(f"needs {WORLD} GPUs, found {torch.cuda.device_count()}", flush=True)
        return 2
    devices = [torch.cuda.get_device_name(i) for i in range(WORLD)] if cuda else ["cpu"]
    backend = args.backend or ("nccl" if cuda else "gloo")
    variants = ["plain", *MODES]
    if args.ablate:
        variants += [w for w in ABLATIONS if w != "hiprio" or backend == "nccl"]
    opts = {
        "device": args.device,
        "backend": backend,
        "variants": variants,
        "size": size,
        "buckets_mib": buckets,
        "pushes": args.pushes,
        "restore_copy": args.restore_copy,
        "timeout": args.timeout,
        "devices": devices,
    }
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else "-"
    print(
        f"weight-sync throughput: {', '.join(devices)}; torch {torch.__version__}, NCCL {nccl}, "
        f"size {size}, buckets {', '.join(f'{x:g}' for x in buckets)} MiB; "
        + " ".join(f"{k}={os.environ[k]}" for k in NO_MULTICAST),
        flush=True,
    )
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        t0 = time.perf_counter()
        try:
            mp.spawn(worker, args=(free_port(), opts, result_path), nprocs=WORLD, join=True)
        except Exception as exc:
            if not (os.path.exists(result_path) and os.path.exists(result_path + ".done")):
                print(f"FAILED: a rank died: {exc}", flush=True)
                return 3
            # Both ranks had passed the final barrier with the results written: the numbers stand.
            print(f"WARNING: a rank died in teardown, after both ranks finished: {exc}", flush=True)
        if not os.path.exists(result_path):
            print("FAILED: rank 0 wrote no result", flush=True)
            return 3
        if args.json:
            args.json.write_text(Path(result_path).read_text())
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
