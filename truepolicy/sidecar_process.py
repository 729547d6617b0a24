"""Run ``truepolicy sidecar`` (the weight-sync sidecar) beside a server, as a real subprocess.

Like :mod:`truepolicy.sglang_process`: its own process group (new session), readiness is ``GET
/ready`` answering 200 (polled until a deadline, failing fast if the process exits), logs go to a
file that failure messages quote, and teardown signals the whole group. The bearer token travels in
``$TRUEPOLICY_SIDECAR_TOKEN`` (never on the command line, where ``ps`` shows it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from truepolicy.sglang_process import POLL_INTERVAL_S, free_port, log_tail, stop_process_group
from weight_sync.sidecar.settings import TOKEN_ENV

READY_TIMEOUT_S = 180.0


class SidecarStartError(RuntimeError):
    pass


@dataclass
class SidecarProcess:
    """A running ``truepolicy sidecar`` subprocess."""

    url: str  # its HTTP API (control, rollout, scoring)
    grpc_target: str  # its gRPC API (``host:port``)
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        stop_process_group(self.process)


def _wait_ready(sidecar: SidecarProcess, ports: tuple[int, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sidecar.process.poll() is not None:
            tail = log_tail(sidecar.log_path)
            taken = any(s in tail.lower() for s in ("address already in use", "failed to bind"))
            why = f" (one of its ports {ports} is taken)" if taken else ""
            raise SidecarStartError(
                f"the sidecar exited with status {sidecar.process.returncode} before it was ready{why}; "
                f"log {sidecar.log_path}:\n{tail}"
            )
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{sidecar.url}/ready", timeout=5).status_code == 200:
                return
        time.sleep(POLL_INTERVAL_S)  # polling a readiness condition under a deadline
    raise SidecarStartError(
        f"the sidecar not ready after {timeout:.0f} s; log {sidecar.log_path}:\n{log_tail(sidecar.log_path)}"
    )


def start_sidecar(
    sglang_url: str,
    log_path: Path,
    token: str,
    *,
    port: int = 0,
    grpc_port: int = 0,
    device: str = "cpu",
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
) -> SidecarProcess:
    """Start ``truepolicy sidecar`` for ``sglang_url`` with its HTTP API on ``port`` and its gRPC API on
    ``grpc_port`` (0: a free one, chosen by the kernel) and wait until it is ready. ``env``: added to
    this process's environment for the sidecar."""
    port = port or free_port()
    grpc_port = grpc_port or free_port()
    argv = [
        sys.executable, "-m", "truepolicy.cli", "sidecar",
        "--sglang-url", sglang_url, "--http-port", str(port), "--grpc-port", str(grpc_port),
        "--device", device, "--log-level", "warning", *extra_args,
    ]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), TOKEN_ENV: token},
            start_new_session=True,
        )
    sidecar = SidecarProcess(
        url=f"http://127.0.0.1:{port}",
        grpc_target=f"127.0.0.1:{grpc_port}",
        process=process,
        log_path=log_path,
    )
    try:
        _wait_ready(sidecar, (port, grpc_port), ready_timeout)
    except BaseException:
        sidecar.stop()
        raise
    return sidecar


@contextlib.contextmanager
def running_sidecar(sglang_url: str, log_path: Path, token: str, **kwargs) -> Iterator[SidecarProcess]:
    sidecar = start_sidecar(sglang_url, log_path, token, **kwargs)
    try:
        yield sidecar
    finally:
        sidecar.stop()
