"""The trainer's clients: ``WeightSyncClient(urls).push(model, version)`` for the weight sync, and
(re-exported from ``weight_sync.rollout_client``) ``RolloutGrpcClient`` / ``RolloutHttpClient`` for
the rollout/scoring API the sidecar serves.

One client feeds N sidecars (N rollout replicas) with one broadcast: the trainer is rank 0 of a
process group (gloo on CPU, NCCL on GPU) whose ranks 1..N are the sidecars; it hosts the group's
``TCPStore`` (``store_host:store_port``, which the sidecars must reach). A push:

1. lays out a manifest (names, shapes, dtypes, buckets, quantization) from the state dict without
   gathering anything (a DTensor knows its global shape); buckets ramp up from 64 MiB at the start
   and back down at the end (``plan.layout_buckets``'s ``ramp_bytes``), so that little waits before the first
   broadcast and after the last one;
2. ``POST /update_weights`` on every sidecar; any refusal (4xx) cancels the others and raises
   :class:`PushRejected`: nothing moved, every server keeps its version;
3. ``POST /update_weights/{id}/commit`` on every sidecar (each waits for its transfer to end);
4. gathers and packs bucket k+1 (``DTensor.full_tensor()`` for sharded models) while bucket k is
   being broadcast, from two reused send buffers; a bucket that is one whole contiguous tensor
   already in its wire dtype (an embedding larger than a bucket) is broadcast from the tensor itself;
5. collects every sidecar's result; returns a :class:`PushResult` with timings, or raises
   :class:`PushFailed` naming which replicas applied the version and which kept the previous one.

A failed transfer drops the group; the next push re-creates it (also after a sidecar restart:
a sidecar that answers ``not_connected`` makes the client reconnect everyone once and retry).

With a trainer running under ``torch.distributed`` (FSDP), call ``push`` on **every** rank: all
ranks take part in the gathers, only rank 0 talks to the sidecars, and it tells the others whether
the sidecars accepted the manifest before anyone gathers.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch
import torch.distributed as dist

from weight_sync.rollout_client import RolloutApiError, RolloutGrpcClient, RolloutHttpClient
from weight_sync.sidecar.group import Group, is_loopback, make_store, new_group
from weight_sync.sidecar.plan import layout_buckets
from weight_sync.sidecar.settings import TOKEN_ENV
from weight_sync.sidecar.wire import WIRE_DTYPES, Manifest, Quantization, dtype_name

__all__ = [
    "PushFailed", "PushRejected", "PushResult", "RolloutApiError", "RolloutGrpcClient", "RolloutHttpClient",
    "WeightSyncClient", "WeightSyncError",
]  # fmt: skip

MiB = 1 << 20
# The first and last buckets of a push ramp from/to this size (see plan.layout_buckets).
RAMP_BYTES = 64 * MiB
# Sidecar errors after which the process group is out of step: the next push re-creates it.
GROUP_ERRORS = {"transfer_failed", "transfer_timeout", "not_connected", "unreachable", "bad_response", None}


class WeightSyncError(RuntimeError):
    def __init__(self, message: str, responses: Sequence[dict] = ()):
        super().__init__(message)
        self.responses = list(responses)


class PushRejected(WeightSyncError):
    """A sidecar refused the manifest (4xx): nothing moved, every server kept its version."""


class PushFailed(WeightSyncError):
    """The transfer or an apply failed; ``responses`` says, per sidecar, what it serves now."""


@dataclass
class PushResult:
    version: str
    bytes: int
    buckets: int
    timings: dict[str, float]
    sidecars: list[dict] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        send = self.timings.get("stream_s", 0.0)
        return self.bytes / send / 1e9 if send > 0 else 0.0


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def _storage_key(t: torch.Tensor):
    local = t._local_tensor if _is_dtensor(t) else t
    try:
        ptr = local.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (ptr, local.storage_offset(), tuple(local.shape), tuple(local.stride()), local.dtype)


def named_tensors(
    model_or_state_dict, skip: Callable[[str], bool] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """The tensors to push, in state-dict order; tied tensors (one storage, two names) once."""
    sd = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, torch.nn.Module)
        else model_or_state_dict
    )
    seen = set()
    out = []
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor) or (skip is not None and skip(name)):
            continue
        key = _storage_key(t)
        if key is not None and key in seen:
            continue
        seen.add(key)
        out.append((name, t))
    return out


def _token(token: str | None, token_file: str | Path | None) -> str | None:
    if token:
        return token
    if token_file:
        return Path(token_file).read_text().strip()
    return os.environ.get(TOKEN_ENV) or None


class WeightSyncClient:
    def __init__(
        self,
        sidecar_urls: Sequence[str],
        token: str | None = None,
        *,
        token_file: str | Path | None = None,
        backend: str | None = None,
        device: str | torch.device | None = None,
        store_host: str = "127.0.0.1",
        store_port: int = 0,
        bucket_bytes: int = 256 * MiB,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 120.0,
        quantization: Quantization | str = "none",
        progress: bool = False,
    ):
        if not sidecar_urls:
            raise ValueError("no sidecar URL")
        self.urls = [u.rstrip("/") for u in sidecar_urls]
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        default_device = f"cuda:{torch.cuda.current_device()}" if self.backend == "nccl" else "cpu"
        self.device = torch.device(device or default_device)
        self.store_host = store_host
        self.store_port = store_port
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.quantization = (
            Quantization(method=quantization) if isinstance(quantization, str) else quantization
        )
        self.progress = progress
        self.is_sender = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        self._store = None
        self._group: Group | None = None
        self._slots: list[torch.Tensor] = []
        self._manifest: tuple[tuple, Manifest] | None = None  # the last layout, reused while it fits
        self._pool = ThreadPoolExecutor(
            max_workers=max(4, 2 * len(self.urls)), thread_name_prefix="weight-sync"
        )
        self._http = requests.Session()
        self._http.trust_env = False
        tok = _token(token, token_file)
        if tok:
            self._http.headers["Authorization"] = f"Bearer {tok}"

    # ---- HTTP -----------------------------------------------------------------------------------
    def _post(self, url: str, path: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
        try:
            resp = self._http.post(f"{url}{path}", json=body, timeout=timeout)
        except requests.RequestException as exc:
            return 0, {"error": "unreachable", "message": f"{url}{path}: {exc}"}
        try:
            payload = resp.json()
        except ValueError:
            payload = {"error": "bad_response", "message": resp.text[:500]}
        return resp.status_code, payload

    def _fan_out(self, fn: Callable[[int, str], tuple[int, dict]]) -> list[tuple[int, dict]]:
        return list(self._pool.map(lambda iu: fn(*iu), enumerate(self.urls)))

    # ---- process group ------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._group is not None

    def connect(self) -> None:
        """(Re)create the process group with every sidecar (blocks until all joined)."""
        self._close_group(broken=False)
        if self._store is None:
            self._store = make_store(
                self.store_host, self.store_port, is_master=True, timeout_s=self.connect_timeout_s
            )
        group_id = uuid.uuid4().hex
        world = len(self.urls) + 1
        body = {
            "store_host": self.store_host,
            "store_port": self._store.port,
            "group_id": group_id,
            "world_size": world,
            "backend": self.backend,
            "timeout_s": self.timeout_s,
        }
        joins = [
            self._pool.submit(
                self._post, url, "/connect", {**body, "rank": i + 1}, self.connect_timeout_s + 30
            )
            for i, url in enumerate(self.urls)
        ]
        try:
            group = new_group(
                self._store,
                group_id=group_id,
                rank=0,
                world_size=world,
                backend=self.backend,
                timeout_s=self.timeout_s,
                device=self.device,
                local_host="127.0.0.1" if is_loopback(self.store_host) else None,
            )
        except Exception as exc:
            answers = [j.result() for j in joins]
            raise WeightSyncError(
                f"sidecars did not join group {group_id}: {exc}", [a for _, a in answers]
            ) from exc
        answers = [j.result() for j in joins]
        bad = [(url, s, a) for url, (s, a) in zip(self.urls, answers, strict=True) if s != 200]
        if bad:
            group.close(broken=True)
            raise WeightSyncError(f"sidecars refused to join: {bad}", [a for _, _, a in bad])
        self._group = group

    def _close_group(self, broken: bool) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.close(broken=broken)

    def close(self) -> None:
        self._close_group(broken=False)
        self._store = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- push ---------------------------------------------------------------------------------
    def manifest(
        self, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None
    ) -> Manifest:
        specs = []
        for name, t in tensors:
            wire = dtype if dtype is not None and t.is_floating_point() else t.dtype
            if dtype_name(wire) not in WIRE_DTYPES:
                raise ValueError(
                    f"{name}: dtype {wire} cannot travel (cast it, e.g. push(..., dtype=torch.bfloat16))"
                )
            specs.append((name, tuple(t.shape), dtype_name(wire)))
        # The same model pushes the same layout every time: building ~300 pydantic entries is ~2 ms
        # of host time, paid before anything moves. Reused when names, shapes, dtypes, bucket size
        # and quantization are all equal (a Manifest is frozen).
        key = (tuple(specs), self.bucket_bytes, self.quantization.model_dump_json())
        if self._manifest is not None and self._manifest[0] == key:
            return self._manifest[1]
        manifest = layout_buckets(specs, self.bucket_bytes, self.quantization, ramp_bytes=RAMP_BYTES)
        self._manifest = (key, manifest)
        return manifest

    def _prepare(self, version: str, manifest: Manifest) -> list[str]:
        body = {"version": version, "group_id": self._group.group_id, "manifest": manifest.model_dump()}
        answers = self._fan_out(lambda i, url: self._post(url, "/update_weights", body))
        if all(s == 200 for s, _ in answers):
            return [a["transfer_id"] for _, a in answers]
        for url, (s, a) in zip(self.urls, answers, strict=True):
            if s == 200:
                self._post(url, f"/update_weights/{a['transfer_id']}/cancel")
        refusals = [
            {"sidecar": url, "status": s, **a}
            for url, (s, a) in zip(self.urls, answers, strict=True)
            if s != 200
        ]
        if any(r.get("error") == "not_connected" for r in refusals):
            raise _Reconnect(refusals)
        first = refusals[0]
        raise PushRejected(
            f"{first['sidecar']} refused version {version}: {first.get('message', first)}", refusals
        )

    def _agree(self, ok: bool) -> bool:
        """Rank 0 tells the other trainer ranks whether the transfer goes ahead."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return ok
        dev = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=dev)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def push(
        self,
        model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
        version: str,
        *,
        dtype: torch.dtype | None = None,
        skip: Callable[[str], bool] | None = None,
        on_bucket: Callable[[int], None] | None = None,
    ) -> PushResult | None:
        """Push a complete version; returns its result on rank 0 (None on the other trainer ranks).

        ``dtype``: cast floating tensors on the fly (e.g. fp32 master weights → the served bf16).
        ``on_bucket(k)``: called after bucket k was sent (progress, tests).
        """
        t0 = time.perf_counter()
        tensors = named_tensors(model_or_state_dict, skip)
        manifest = self.manifest(tensors, dtype)
        by_name = dict(tensors)
        ids: list[str] = []
        error: BaseException | None = None
        if self.is_sender:
            try:
                if self._group is None:
                    self.connect()
                try:
                    ids = self._prepare(version, manifest)
                except _Reconnect:
                    self.connect()
                    ids = self._prepare(version, manifest)
            except BaseException as exc:
                error = exc
        if not self._agree(error is None):
            if error is not None:
                raise (
                    error if not isinstance(error, _Reconnect) else PushRejected(str(error), error.responses)
                )
            raise WeightSyncError("rank 0 could not start the push")
        t_prepared = time.perf_counter()
        commits = []
        if self.is_sender:
            commits = [
                self._pool.submit(self._post, url, f"/update_weights/{tid}/commit", None, 24 * 3600.0)
                for url, tid in zip(self.urls, ids, strict=True)
            ]
        stream_s, gather_s, stream_error = self._stream(manifest, by_name, on_bucket)
        t_streamed = time.perf_counter()
        if not self.is_sender:
            if stream_error is not None:
                raise stream_error
            return None
        answers = [c.result() for c in commits]
        t_done = time.perf_counter()
        responses = [
            {"sidecar": url, "status": s, **a} for url, (s, a) in zip(self.urls, answers, strict=True)
        ]
        failed = [r for r in responses if r["status"] != 200]
        if stream_error is not None or any(r.get("error") in GROUP_ERRORS for r in failed):
            self._close_group(broken=True)  # the next push builds a new group
        if stream_error is not None or failed:
            what = f"streaming failed: {stream_error}" if stream_error is not None else ""
            detail = "; ".join(f"{r['sidecar']}: {r.get('message', r.get('error'))}" for r in failed)
            applied = [r["sidecar"] for r in responses if r["status"] == 200]
            raise PushFailed(
                f"push of version {version} failed ({what or detail}); applied on {applied or 'no replica'}",
                responses,
            ) from stream_error
        timings = {
            "prepare_s": t_prepared - t0,
            "gather_s": gather_s,
            "stream_s": stream_s,
            "apply_wait_s": t_done - t_streamed,
            "total_s": t_done - t0,
        }
        return PushResult(version, manifest.total_bytes, len(manifest.buckets), timings, responses)

    def _whole(self, entries, size: int, by_name: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The bytes of a bucket that is one whole tensor, as they lie in that tensor, if they can be
        broadcast from it directly: a plain (not sharded) contiguous tensor on the send device,
        already in its wire dtype. Else None (the bucket is packed into a send slot).

        Why: such a bucket (an embedding or lm_head larger than the bucket size: 1 GB each for
        Llama-3-8B) would otherwise be copied byte for byte into a slot first; as bucket 0 that copy
        is all of the pipeline's fill (nothing is on the wire until it is done), and it is memory
        traffic competing with the broadcast in flight. NCCL's root only reads its buffer, and the
        tensor is held (and ordered before later work on the current stream by the final waits) until
        its broadcast is done, exactly as a slot is."""
        if len(entries) != 1:
            return None
        (e,) = entries
        t = by_name[e.name]
        if (
            e.offset != 0
            or e.nbytes != size
            or _is_dtensor(t)
            or t.dtype != WIRE_DTYPES[e.dtype]
            or t.device != self.device
            or not t.is_contiguous()
        ):
            return None
        return t.detach().reshape(-1).view(torch.uint8)

    def _pack(self, slot: torch.Tensor | None, entries, by_name: Mapping[str, torch.Tensor]) -> None:
        """Gather (sharded tensors, on every rank) and copy one bucket's tensors into ``slot``."""
        for e in entries:
            t = by_name[e.name]
            full = t.full_tensor() if _is_dtensor(t) else t
            if slot is not None:
                dst = slot[e.offset : e.offset + e.nbytes].view(WIRE_DTYPES[e.dtype]).view(e.shape)
                dst.copy_(full.detach())
            del full

    def _stream(
        self, manifest: Manifest, by_name: Mapping[str, torch.Tensor], on_bucket
    ) -> tuple[float, float, BaseException | None]:
        """Gather, pack and broadcast every bucket (two send slots: pack k+1 while k flies).

        Ordering (NCCL): ``work.wait()`` only makes the current stream wait, so the host queues every
        bucket at once. Pack k waits (on the current stream) for broadcast k-2, which last read slot
        k % 2; broadcast k waits for what the current stream holds when it is posted (ProcessGroupNCCL
        syncs its stream to it), i.e. pack k. So pack k+1 runs during broadcast k and nothing else
        is serialized: a side stream for the packs would add events, not overlap."""
        per_bucket: dict[int, list] = {}
        for e in manifest.tensors:
            per_bucket.setdefault(e.bucket, []).append(e)
        whole = [
            self._whole(per_bucket[k], size, by_name) if self.is_sender else None
            for k, size in enumerate(manifest.buckets)
        ]
        # Slots for the packed buckets only (a 256 MiB layout does not hold 2 x 1 GB for the embedding).
        packed = max((size for size, w in zip(manifest.buckets, whole, strict=True) if w is None), default=0)
        if self.is_sender and packed and (len(self._slots) < 2 or self._slots[0].numel() < packed):
            self._slots = []  # free the old slots before allocating larger ones
            self._slots = [torch.empty(packed, dtype=torch.uint8, device=self.device) for _ in range(2)]
        works: dict[int, object] = {}
        gather_s = 0.0
        t0 = time.perf_counter()
        bar = None
        if self.progress and self.is_sender:
            from tqdm import tqdm

            bar = tqdm(total=manifest.total_bytes, unit="B", unit_scale=True, desc="push")
        try:
            for k, size in enumerate(manifest.buckets):
                if k - 2 in works:
                    works.pop(k - 2).wait()  # slot k % 2 is free again
                    if on_bucket is not None:
                        on_bucket(k - 2)
                tg = time.perf_counter()
                if whole[k] is None:
                    self._pack(self._slots[k % 2] if self.is_sender else None, per_bucket[k], by_name)
                gather_s += time.perf_counter() - tg
                if self.is_sender:
                    src = whole[k] if whole[k] is not None else self._slots[k % 2][:size]
                    works[k] = self._group.broadcast(src)
                    if bar is not None:
                        bar.update(size)
            for k in sorted(works):
                works.pop(k).wait()
                if on_bucket is not None:
                    on_bucket(k)
        except Exception as exc:  # a sidecar died or timed out: the group is unusable
            return time.perf_counter() - t0, gather_s, exc
        finally:
            if bar is not None:
                bar.close()
        return time.perf_counter() - t0, gather_s, None


class _Reconnect(WeightSyncError):
    pass
