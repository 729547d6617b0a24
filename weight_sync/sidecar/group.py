"""The trainer-to-sidecars process group, kept apart from the trainer's own ``torch.distributed`` world.

The trainer (rank 0) hosts a ``TCPStore``; each sidecar (ranks 1..N) joins it. The group is a
standalone ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (GPU) built on a ``PrefixStore`` named
by a fresh group id, so it never touches the default process group (FSDP's) and can be rebuilt
after a failure without restarting anyone. Every collective has the group's timeout: a dead or
stalled peer makes ``wait()`` raise instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_store(host: str, port: int, *, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store; ``port=0`` on the master picks a free port (``store.port``)."""
    return dist.TCPStore(
        host,
        port,
        None,
        is_master,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


@dataclass
class Group:
    pg: object
    group_id: str
    rank: int
    world_size: int
    backend: str
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, root: int = 0):
        """Asynchronous broadcast from ``root``; returns the work (``wait()`` raises on failure)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        return self.pg.broadcast([tensor], opts)

    def close(self, broken: bool = False) -> None:
        """Drop the group; ``broken``: abort it (a collective failed, pending work is abandoned).

        An NCCL group is always aborted: ``shutdown()`` flushes through ``ncclCommFinalize``, which
        waits for the peers to finalize too, and a peer (a sidecar that keeps serving, or the trainer)
        drops its side only later (on 2x H200 the GPU demo stalled after its last push, where the
        trainer closes its group). Every collective has been waited for when a group is closed
        unbroken, so nothing is lost."""
        pg, self.pg = self.pg, None
        if pg is None:
            return
        with contextlib.suppress(Exception):
            if broken or self.backend == "nccl":
                pg.abort()
            else:
                pg.shutdown()


def new_group(
    store: dist.Store,
    *,
    group_id: str,
    rank: int,
    world_size: int,
    backend: str,
    timeout_s: float,
    device: str | torch.device = "cpu",
    local_host: str | None = None,
) -> Group:
    """Join group ``group_id``: blocks until all ``world_size`` ranks have joined (or times out)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = dist.PrefixStore(f"truepolicy/weight_sync/{group_id}/", store)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda": this process's current GPU
        device = torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        # Bind to the address given (loopback when the store is on loopback), else the host's name.
        if local_host:
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        else:
            opts._devices = [dist.ProcessGroupGloo.create_default_device()]
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
    elif backend == "nccl":
        if device.type != "cuda":
            raise ValueError("the nccl backend needs a cuda device")
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    else:
        raise ValueError(f"unknown backend {backend!r}")
    group = Group(pg, group_id, rank, world_size, backend, device)
    # A first collective proves every rank is there (NCCL connects lazily otherwise).
    probe = torch.zeros(1, dtype=torch.int64, device=device)
    if rank == 0:
        probe.fill_(world_size)
    group.broadcast(probe).wait()
    if int(probe.item()) != world_size:
        raise RuntimeError(f"group {group_id}: handshake read {int(probe.item())}, expected {world_size}")
    return group
