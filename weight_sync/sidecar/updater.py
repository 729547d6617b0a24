"""The updater: the one object that moves a new weight version from the trainer into SGLang.

Update protocol (one transfer; the app and the client are thin layers over these calls)::

                       POST /connect (trainer's store, group id, rank)
    (no group) ───────────────────────────────────────────────────────▶ CONNECTED
                                                                           │
      POST /update_weights {version, group_id, manifest}                   │
      ├─ refused (4xx, nothing changed): bad token, too large, unknown     │
      │  name, missing name, shape / dtype mismatch, bad layout,           │
      │  another transfer in progress, not connected ◀─────────────────────┤
      ▼                                                                    │
    PREPARED ── cancel, or not committed within prepare_ttl ──▶ (dropped) ─┤
      │ POST /update_weights/{id}/commit                                   │
      ▼                                                                    │
    RECEIVING  buckets → staging buffer (pipeline.py: receive k+1 while    │
      │        checking / FP8-quantizing k; NaN/Inf → 422)                 │
      ├─ trainer died / timed out / NaN ─▶ FAILED: SGLang never touched;   │
      │     the group is dropped (the client reconnects on its next push)  │
      ▼                                                                    │
    APPLYING   pause(retract) → load staged tensors + version tag (one      │
      │        update_weights_from_tensor call) → flush prefix cache →     │
      │        continue (always, in a finally)                             │
      ├─ SGLang error ─▶ RESTORING: the previous version's tensors (kept   │
      │     in host RAM) or, for the checkpoint's own version, the disk    │
      │     checkpoint are loaded back with the previous tag ─▶ FAILED     │
      │     (restored=true) — or BROKEN (/ready 503) if that fails too     │
      ▼                                                                    │
    DONE: server serves the new version; its staging buffer becomes the ──┘
          restore point, the old restore point the next staging buffer

Atomicity choice: *stage everything, then apply*. Every byte of the new version is received and
checked into a staging buffer before SGLang is touched, so a trainer dying mid-transfer or a NaN
changes nothing, and generation is paused only for the local hand-off (not for the network
transfer). SGLang's load is one call carrying shared-memory handles (CPU) or CUDA IPC handles (GPU)
to the staged tensors; the weight-version tag is set by SGLang in that same call iff it succeeded.
Restore point: with ``keep_previous`` (default) the sidecar keeps the version the server serves in
host RAM. Memory cost on the sidecar: 2x the model's wire size (staging + restore point; on the CPU
both in shared memory: /dev/shm must be large enough), plus, for FP8, two ring slots of the largest
bucket. Without ``keep_previous``: 1x, and only the checkpoint's own version can be restored.

Requests are never aborted: ``pause_generation(mode="retract")`` puts running requests back in the
waiting queue with their KV cache freed, so after the update they are recomputed with the new
weights; requests arriving meanwhile wait in the tokenizer manager. The prefix cache is flushed
after the load, or the prefix KV of the old weights would be reused. SGLang 0.5.15 refuses to flush
while retracted requests wait; the server needs the plugin's ``flush_cache_while_paused`` patch
(``server_patches/serving.py``) or ``--disable-radix-cache``. If the flush fails on a server with a
radix cache, the previous version is put back and the push fails with 503
``prefix_cache_not_flushed`` (``--allow-stale-prefix-cache`` applies anyway and counts it in /metrics).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch

from weight_sync.sidecar import errors
from weight_sync.sidecar.group import Group, is_loopback, make_store, new_group
from weight_sync.sidecar.metrics import Metrics
from weight_sync.sidecar.pipeline import allocate, receive
from weight_sync.sidecar.plan import Limits, StagedTensor, TransferPlan, validate
from weight_sync.sidecar.served import CheckpointError, ServedModel, read_checkpoint
from weight_sync.sidecar.settings import Settings
from weight_sync.sidecar.sglang_api import ServerFacts, SGLangAPI, SGLangCallError, serialize_named_tensors
from weight_sync.sidecar.wire import (
    ConnectRequest,
    PreparedTransfer,
    Timings,
    TransferResult,
    UpdateWeightsRequest,
    VersionInfo,
)

log = logging.getLogger("truepolicy.sidecar")

PREPARED, RECEIVING, APPLYING, DONE, FAILED = "prepared", "receiving", "applying", "done", "failed"
KEEP_RESULTS = 32


class _StaleCache(Exception):
    pass


@dataclass
class Transfer:
    id: str
    version: str
    group_id: str
    plan: TransferPlan
    created: float
    state: str = PREPARED


@dataclass
class Staged:
    """A complete version in a flat buffer, as SGLang gets it."""

    buffer: torch.Tensor
    tensors: tuple[StagedTensor, ...]
    version: str

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(t.name, self.buffer[t.start : t.end].view(t.dtype).view(t.shape)) for t in self.tensors]


def handoff_payload(staged: Staged) -> str:
    """SGLang's ``update_weights_from_tensor`` payload for ``staged`` (shared-memory handles on CPU,
    CUDA IPC handles on GPU).

    On CUDA it is built over a DLPack alias of the staging buffer (the same memory and IPC handle, a
    storage object of its own). Sharing a CUDA tensor wraps its storage's data pointer in a new
    ref-counted one: sharing the long-lived staging buffer itself push after push would nest one more
    wrapper on it per push, never freed while the buffer lives. The alias and its wrappers are freed
    with the payload's views once SGLang (the consumer) has given its IPC references back."""
    buffer = staged.buffer
    if buffer.device.type == "cuda":
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()  # CUDA IPC handles name the device by UUID
        buffer = torch.from_dlpack(buffer)
    return serialize_named_tensors(Staged(buffer, staged.tensors, staged.version).named_tensors())


class Updater:
    def __init__(self, settings: Settings, api: SGLangAPI | None = None):
        self.settings = settings
        self.api = api or SGLangAPI(settings.sglang_url, settings.sglang_api_key, settings.sglang_timeout_s)
        self.metrics = Metrics()
        self.limits = Limits(settings.max_tensors, settings.max_bucket_bytes, settings.max_total_bytes)
        self.device = torch.device(settings.device)
        self._lock = threading.Lock()
        self._group: Group | None = None
        self._store = None
        self._transfer: Transfer | None = None
        self._results: OrderedDict[str, TransferResult] = OrderedDict()
        self._facts: ServerFacts | None = None
        self._served: ServedModel | None = None
        self._attach_error: str | None = "not attached to SGLang yet"
        self._version: str | None = None
        self._previous: str | None = None
        self._source = "server"
        self._pushes = 0
        self._restore_point: Staged | None = None
        self._spare: torch.Tensor | None = None
        self._ring: list[torch.Tensor] = []
        self._broken: str | None = None
        if self.device.type == "cpu":
            # SGLang's scheduler is another process with another authkey: CPU tensors must travel as
            # shared-memory file names, not as file descriptors passed over a multiprocessing socket.
            torch.multiprocessing.set_sharing_strategy("file_system")

    # ---- server state ------------------------------------------------------------------------
    def attach(self) -> None:
        """Learn the served model and its version from SGLang; un-pause it if a previous sidecar
        died mid-update (``continue_generation`` is harmless on a running server)."""
        try:
            facts = self.api.facts()
            served_dtype = facts.dtype if facts.dtype not in ("auto", "None", "") else None
            served = read_checkpoint(self.settings.model_path or facts.model_path, served_dtype)
            self.api.resume()
        except (SGLangCallError, CheckpointError, OSError, KeyError, ValueError) as exc:
            self._attach_error = str(exc)
            raise errors.NotReady(f"SGLang not usable yet: {exc}") from exc
        with self._lock:
            self._facts, self._served = facts, served
            if self._version is None:
                self._version = facts.weight_version
            self._attach_error = None
        self.metrics.set_version(self._version)
        if facts.radix_cache and "flush_cache_while_paused" not in facts.plugin_patches:
            log.warning(
                "SGLang runs its radix (prefix) cache and the plugin does not report the "
                "flush_cache_while_paused patch: updates made while requests wait will be refused "
                "(run it with `truepolicy server`, or --disable-radix-cache)"
            )
        log.info(
            "attached to %s: %d tensors, version %s",
            self.settings.sglang_url,
            len(served.tensors),
            facts.weight_version,
        )

    def attached(self) -> bool:
        return self._served is not None

    def ready(self) -> tuple[bool, str]:
        if self._broken:
            return False, self._broken
        if not self.attached():
            return False, self._attach_error or "not attached"
        if not self.api.healthy():
            return False, "SGLang /health does not answer 200"
        if self._version is None:
            return False, "no version loaded"
        return True, "ready"

    def version_info(self) -> VersionInfo:
        return VersionInfo(
            version=self._version, previous=self._previous, source=self._source, pushes=self._pushes
        )

    def served_model(self) -> ServedModel:
        if self._served is None:
            self.attach()
        return self._served

    # ---- process group ----------------------------------------------------------------------
    def connect(self, req: ConnectRequest) -> dict:
        with self._lock:
            if self._transfer is not None and self._transfer.state in (RECEIVING, APPLYING):
                raise errors.Conflict(f"transfer {self._transfer.id} is {self._transfer.state}")
            self._transfer = None
            self._drop_group(broken=False)
            if req.backend == "nccl" and self.device.type != "cuda":
                raise errors.BadRequest("nccl needs a sidecar started with --device cuda")
            timeout = min(req.timeout_s, self.settings.transfer_timeout_s)
            try:
                store = make_store(req.store_host, req.store_port, is_master=False, timeout_s=timeout)
                group = new_group(
                    store,
                    group_id=req.group_id,
                    rank=req.rank,
                    world_size=req.world_size,
                    backend=req.backend,
                    timeout_s=timeout,
                    device=self.device,
                    local_host="127.0.0.1" if is_loopback(req.store_host) else None,
                )
            except Exception as exc:
                raise errors.TransferFailed(
                    f"joining group {req.group_id} failed: {exc}", stage="connect"
                ) from exc
            self._store, self._group = store, group
        log.info("joined group %s as rank %d of %d (%s)", req.group_id, req.rank, req.world_size, req.backend)
        return {"group_id": req.group_id, "rank": req.rank}

    def _drop_group(self, broken: bool) -> None:
        group, self._group = self._group, None
        self._store = None
        if group is not None:
            if broken:
                # Aborting a group with failed work can block until its timeout: not on the caller.
                threading.Thread(target=group.close, args=(True,), daemon=True).start()
            else:
                group.close()

    # ---- the transfer -------------------------------------------------------------------------
    def prepare(self, req: UpdateWeightsRequest) -> PreparedTransfer:
        try:
            return self._prepare(req)
        except errors.SidecarError as exc:
            self.metrics.failures.labels(error=exc.code).inc()
            raise

    def _prepare(self, req: UpdateWeightsRequest) -> PreparedTransfer:
        served = self.served_model()
        with self._lock:
            if self._broken:
                raise errors.NotReady(self._broken)
            t = self._transfer
            if t is not None:
                expired = t.state == PREPARED and time.monotonic() - t.created > self.settings.prepare_ttl_s
                if not expired:
                    raise errors.Conflict(f"transfer {t.id} (version {t.version}) is {t.state}")
                self._transfer = None
            if self._group is None:
                raise errors.NotConnected("no process group with the trainer: POST /connect first")
            if req.group_id != self._group.group_id:
                raise errors.NotConnected(
                    f"manifest is for group {req.group_id}, this sidecar is in {self._group.group_id}"
                )
            plan = validate(req.manifest, served, self.limits)
            t = Transfer(uuid.uuid4().hex[:16], req.version, req.group_id, plan, time.monotonic())
            self._transfer = t
        return PreparedTransfer(
            transfer_id=t.id,
            version=t.version,
            state=t.state,
            buckets=len(plan.buckets),
            total_bytes=plan.total_bytes,
        )

    def cancel(self, transfer_id: str) -> dict:
        with self._lock:
            t = self._transfer
            if t is None or t.id != transfer_id:
                raise errors.NotFound(f"no prepared transfer {transfer_id}")
            if t.state != PREPARED:
                raise errors.Conflict(f"transfer {transfer_id} is {t.state}")
            self._transfer = None
        return {"transfer_id": transfer_id, "state": "cancelled"}

    def result(self, transfer_id: str) -> TransferResult | PreparedTransfer:
        t = self._transfer
        if t is not None and t.id == transfer_id:
            return PreparedTransfer(
                transfer_id=t.id,
                version=t.version,
                state=t.state,
                buckets=len(t.plan.buckets),
                total_bytes=t.plan.total_bytes,
            )
        if transfer_id in self._results:
            return self._results[transfer_id]
        raise errors.NotFound(f"unknown transfer {transfer_id}")

    def last_result(self) -> TransferResult:
        if not self._results:
            raise errors.NotFound("no transfer finished yet")
        return next(reversed(self._results.values()))

    def commit(self, transfer_id: str) -> TransferResult:
        t0 = time.perf_counter()
        with self._lock:
            t = self._transfer
            if t is None or t.id != transfer_id:
                if transfer_id in self._results:
                    return self._results[transfer_id]
                raise errors.NotFound(f"no prepared transfer {transfer_id}")
            if t.state != PREPARED:
                raise errors.Conflict(f"transfer {transfer_id} is {t.state}")
            if self._group is None or self._group.group_id != t.group_id:
                self._transfer = None
                raise errors.NotConnected(f"group {t.group_id} is gone")
            t.state = RECEIVING
            group = self._group
        timings = Timings()
        try:
            staged, stats = self._receive(t, group)
            timings.receive_s = stats.total_s
            t.state = APPLYING
            try:
                flushed = self._apply(staged, timings)
            except BaseException:
                self._spare = staged.buffer  # not served: reusable for the next transfer
                raise
        except errors.SidecarError as exc:
            t.state = FAILED
            self.metrics.failures.labels(error=exc.code).inc()
            exc.current_version = self._version
            self._finish(t, TransferResult(
                transfer_id=t.id, version=t.version, state=FAILED, current_version=self._version,
                timings=timings, error=exc.body(),
            ))  # fmt: skip
            raise
        except BaseException as exc:
            t.state = FAILED
            self.metrics.failures.labels(error="internal_error").inc()
            self._finish(t, None)
            raise errors.SidecarError(f"{type(exc).__name__}: {exc}", current_version=self._version) from exc
        timings.total_s = time.perf_counter() - t0
        self._commit_success(staged)
        result = TransferResult(
            transfer_id=t.id,
            version=t.version,
            state=DONE,
            current_version=self._version,
            bytes=stats.bytes,
            bandwidth_gbps=stats.bytes / stats.total_s / 1e9 if stats.total_s > 0 else 0.0,
            cache_flushed=flushed,
            timings=timings,
        )
        t.state = DONE
        self._finish(t, result)
        m = self.metrics
        m.syncs.inc()
        m.sync_duration.observe(timings.total_s)
        m.paused_seconds.observe(timings.paused_s)
        m.bytes.inc(stats.bytes)
        m.bandwidth.set(stats.bytes / stats.total_s if stats.total_s > 0 else 0.0)
        for stage in ("receive_s", "pause_s", "load_s", "flush_s", "paused_s", "total_s"):
            m.stage_seconds.labels(stage=stage.removesuffix("_s")).set(getattr(timings, stage))
        if not flushed:
            m.cache_not_flushed.inc()
        log.info("version %s applied in %.3f s (paused %.3f s)", t.version, timings.total_s, timings.paused_s)
        return result

    def _finish(self, t: Transfer, result: TransferResult | None) -> None:
        with self._lock:
            if self._transfer is t:
                self._transfer = None
            if result is not None:
                self._results[t.id] = result
                while len(self._results) > KEEP_RESULTS:
                    self._results.popitem(last=False)

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        spare, self._spare = self._spare, None
        if spare is not None and spare.numel() >= nbytes:
            return spare
        del spare
        return allocate(nbytes, self.device, shared=True)

    def _receive(self, t: Transfer, group: Group):
        plan = t.plan
        staging = self._staging_buffer(plan.staging_nbytes)
        if not plan.direct and (len(self._ring) < 2 or self._ring[0].numel() < plan.ring_bytes):
            self._ring = [allocate(plan.ring_bytes, self.device, shared=False) for _ in range(2)]
        try:
            stats = receive(plan, staging, self._ring, group.broadcast)
        except errors.SidecarError as exc:
            self._spare = staging
            if isinstance(exc, errors.TransferFailed):
                with self._lock:
                    if self._group is group:
                        self._drop_group(broken=True)
            raise
        return Staged(staging, plan.staged, t.version), stats

    def _apply(self, staged: Staged, timings: Timings) -> bool:
        """Pause → load (+ version tag) → flush → continue; restore the previous version on failure."""
        facts = self._facts
        previous = self._version
        t0 = time.perf_counter()
        paused = False
        flushed = False
        try:
            try:
                self.api.pause("retract")
                paused = True
                t1 = time.perf_counter()
                timings.pause_s = t1 - t0
                self.api.load_tensors(handoff_payload(staged), facts.tp_size, staged.version)
                t2 = time.perf_counter()
                timings.load_s = t2 - t1
                flushed = self.api.flush_cache()
                timings.flush_s = time.perf_counter() - t2
                if not flushed and facts.radix_cache and not self.settings.allow_stale_prefix_cache:
                    raise _StaleCache()
            except (SGLangCallError, _StaleCache) as exc:
                restored = self._restore(previous) if paused else True
                if paused and restored:
                    self.metrics.restores.inc()
                if not paused:
                    outcome = "nothing was changed"
                elif restored:
                    outcome = f"previous version {previous} restored"
                else:
                    outcome = f"restore failed: {self._broken}"
                if isinstance(exc, _StaleCache):
                    raise errors.CacheNotFlushed(
                        f"SGLang could not flush its prefix cache after loading version {staged.version} "
                        "(requests were waiting), so it would serve KV computed with the old weights; "
                        f"{outcome}. Fix: run the server with `truepolicy server` (patch "
                        "flush_cache_while_paused) or start SGLang with --disable-radix-cache",
                        stage="flush",
                        restored=restored,
                    ) from None
                raise errors.ServerError(
                    f"applying version {staged.version} failed at {exc.path}: {exc}; {outcome}",
                    stage="apply",
                    restored=restored,
                ) from exc
        finally:
            if paused:
                try:
                    self.api.resume()
                except SGLangCallError as exc:
                    self._broken = f"generation stays paused: continue_generation failed: {exc}"
                    raise errors.ServerError(self._broken, stage="resume") from exc
            timings.paused_s = time.perf_counter() - t0
        return flushed

    def _restore(self, previous: str | None) -> bool:
        """Put the previous complete version back (called with generation paused)."""
        point = self._restore_point
        try:
            if point is not None and point.version == previous:
                self.api.load_tensors(handoff_payload(point), self._facts.tp_size, previous)
            elif previous == self.settings.checkpoint_version:
                # The server still serves the checkpoint it started with (SGLang's --weight-version).
                self.api.load_from_disk(self._served.model_path, previous)
            else:
                self._broken = f"no restore point for version {previous}: server weights unknown"
                return False
            with contextlib.suppress(SGLangCallError):
                self.api.flush_cache()
            return True
        except SGLangCallError as exc:
            self._broken = f"restoring version {previous} failed: {exc}"
            log.error(self._broken)
            return False

    def _commit_success(self, staged: Staged) -> None:
        old = self._restore_point
        with self._lock:
            self._previous, self._version = self._version, staged.version
            self._source = "sidecar"
            self._pushes += 1
        self.metrics.set_version(staged.version)
        if not self.settings.keep_previous:
            self._restore_point = None
            self._spare = staged.buffer
            return
        if staged.buffer.device.type == "cpu":
            self._restore_point = staged
            self._spare = old.buffer if old is not None else None
            return
        # GPU staging: the restore point lives in host RAM; the device buffer is reused.
        host = old.buffer if old is not None and old.buffer.numel() >= staged.buffer.numel() else None
        host = host if host is not None else allocate(staged.buffer.numel(), "cpu", shared=True)
        host[: staged.buffer.numel()].copy_(staged.buffer)
        self._restore_point = Staged(host, staged.tensors, staged.version)
        self._spare = staged.buffer
