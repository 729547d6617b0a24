"""Run the real SGLang server (through ``truepolicy server``) or an offline Engine in a subprocess.

SGLang SIGKILLs its parent process tree when a scheduler crashes, so it never runs inside the
caller's process (a test runner, the demo). The server gets its own process group (new session),
readiness is ``GET /health_generate`` answering 200 (polled until a deadline, failing fast if the
process exits), logs go to a file that failure messages quote, and teardown signals the whole group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.5


class ServerStartError(RuntimeError):
    pass


# SGLang 0.5.15 validates port + 10000 (its default gRPC port) against 65535 even when gRPC is off.
MAX_SGLANG_PORT = 65535 - 10000


def free_port(host: str = "127.0.0.1", below: int = MAX_SGLANG_PORT + 1) -> int:
    """A free loopback port under ``below``, chosen by the kernel."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port < below:
            return port
    raise RuntimeError(f"no free port under {below} on {host}")


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "<no log>"


def stop_process_group(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group ``process`` leads, SIGKILL it after ``timeout`` s; wait for the leader."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass
class SGLangServer:
    """A running ``truepolicy server`` subprocess."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        stop_process_group(self.process)
        # Children that outlived the launcher (detokenizer, scheduler) share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def generate(self, payload: dict, timeout: float = 300.0) -> dict | list:
        resp = requests.post(f"{self.url}/generate", json=payload, timeout=timeout)
        if resp.status_code != 200:
            raise RuntimeError(f"/generate -> {resp.status_code}: {resp.text[:500]}")
        return resp.json()


def wait_ready(server: SGLangServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerStartError(
                f"SGLang exited with status {server.process.returncode} before it was ready; "
                f"log {server.log_path}:\n{log_tail(server.log_path)}"
            )
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{server.url}/health_generate", timeout=5).status_code == 200:
                return
        time.sleep(POLL_INTERVAL_S)
    raise ServerStartError(
        f"SGLang not ready after {timeout:.0f} s; log {server.log_path}:\n{log_tail(server.log_path)}"
    )


def start_server(
    model_path: Path,
    log_path: Path,
    *,
    device: str = "cpu",
    on_policy: bool = True,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
) -> SGLangServer:
    """Start ``truepolicy server`` on a free loopback port and wait until it generates."""
    port = free_port()
    argv = [
        sys.executable, "-m", "truepolicy.cli", "server",
        "--model-path", str(model_path), "--device", device,
        "--on-policy" if on_policy else "--no-on-policy",
        "--host", "127.0.0.1", "--port", str(port),
        *extra_args,
    ]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    server = SGLangServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        wait_ready(server, ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_server(model_path: Path, log_path: Path, **kwargs) -> Iterator[SGLangServer]:
    server = start_server(model_path, log_path, **kwargs)
    try:
        yield server
    finally:
        server.stop()


def run_offline_engine(
    model_path: Path,
    requests_: Sequence[dict],
    *,
    device: str = "cpu",
    on_policy: bool = True,
    engine_kwargs: dict | None = None,
    timeout: float = READY_TIMEOUT_S,
) -> list[dict]:
    """Run ``sglang.Engine.generate`` on ``requests_`` in a subprocess; return its outputs.

    Each request is a dict of ``Engine.generate`` keyword arguments (``input_ids``,
    ``sampling_params``, ``return_logprob``, ...). The child is ``truepolicy.engine_worker``.
    """
    from server_patches.launcher import runtime_env

    job = {
        "model_path": str(model_path),
        "device": device,
        "engine_kwargs": engine_kwargs or {},
        "requests": list(requests_),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "truepolicy.engine_worker"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=runtime_env(device, on_policy, dict(os.environ)),
        timeout=timeout,
        start_new_session=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"offline engine failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
