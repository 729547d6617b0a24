#!/usr/bin/env python3
"""``truepolicy-pod``: the rollout pod's entrypoint and its SGLang probe (one container, two processes).

    truepolicy-pod run    [--config-dir DIR]   run `truepolicy server` and `truepolicy sidecar`
    truepolicy-pod health [--config-dir DIR]   exit 0 iff SGLang's /health answers 200

Why one container holds both: deploy/README.md ("One container, two processes").

The arguments of both come from ``DIR/server.args`` and ``DIR/sidecar.args`` (the mounted ConfigMap),
split into words like a shell does (``shlex``; ``#`` starts a comment) but never run through a shell.

``run`` supervises. SGLang is what the pod is for: when the server exits, the sidecar is stopped and
``run`` exits with the server's status, so the kubelet restarts the container. The sidecar holds no
state the server lacks (it reads the served version back from SGLang when it attaches), so when it
exits it is restarted alone, with a back-off, while SGLang keeps serving the trainer's latest
weights; except with status 2 (a usage or configuration error, which a restart cannot fix): then
everything stops and the container fails visibly (CrashLoopBackOff). SIGTERM / SIGINT: the sidecar
then the server get SIGTERM (each is the leader of its own process group, so SGLang's scheduler and
detokenizer get it too), SIGKILL after ``--grace`` seconds. As PID 1 it also reaps orphans.

``health`` is the liveness / startup probe: SGLang listens on loopback only (its admin endpoints
must not be reachable from the network), which a kubelet ``httpGet`` cannot reach; the URL is derived
from ``server.args`` (``--host`` / ``--port``), so it cannot drift from what the server was told.
Standard library only: it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_CONFIG_DIR = "/etc/truepolicy"
SERVER_ARGS = "server.args"
SIDECAR_ARGS = "sidecar.args"
SGLANG_DEFAULT_HOST = "127.0.0.1"  # sglang.launch_server's defaults
SGLANG_DEFAULT_PORT = 30000
FATAL_SIDECAR_STATUS = 2  # argparse / SettingsError: restarting cannot help
POLL_S = 0.2
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a sidecar that ran this long restarts with the shortest back-off


def log(message: str) -> None:
    print(f"truepolicy-pod: {message}", file=sys.stderr, flush=True)


def split_args(text: str) -> list[str]:
    return shlex.split(text, comments=True)


def read_args(path: Path) -> list[str]:
    return split_args(path.read_text())


def flag_value(args: list[str], flag: str, default: str | None = None) -> str | None:
    """The last value of ``flag`` in ``args`` (``--flag v`` or ``--flag=v``), else ``default``."""
    value = default
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def sglang_health_url(server_args: list[str]) -> str:
    host = flag_value(server_args, "--host", SGLANG_DEFAULT_HOST)
    if host in ("", "0.0.0.0", "::"):
        host = SGLANG_DEFAULT_HOST
    port = int(flag_value(server_args, "--port", str(SGLANG_DEFAULT_PORT)))
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


def health(url: str, timeout_s: float) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


def default_truepolicy() -> list[str]:
    exe = shutil.which("truepolicy")
    return [exe] if exe else [sys.executable, "-m", "truepolicy.cli"]


def exit_status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


class Supervisor:
    def __init__(self, server_cmd: list[str], sidecar_cmd: list[str], grace_s: float):
        self.server_cmd = server_cmd
        self.sidecar_cmd = sidecar_cmd
        self.grace_s = grace_s
        self.server_pid: int | None = None
        self.server_status: int | None = None
        self.sidecar_pid: int | None = None
        self.sidecar_pgid: int | None = None  # kept after it exits: its children may outlive it
        self.sidecar_started = 0.0
        self.sidecar_restart_at: float | None = None
        self.sidecar_fatal: int | None = None
        self.backoff_s = 1.0
        self.stop_signal: int | None = None
        self.stopping = False
        self.procs: dict[int, subprocess.Popen] = {}

    def _spawn(self, cmd: list[str]) -> int:
        # Its own session: the process group holds all its children, so killpg reaches them. The
        # Popen is kept until _reap collects its status: a discarded one polls (and may reap) its
        # child when garbage-collected, and that exit would go unseen.
        proc = subprocess.Popen(cmd, start_new_session=True)
        self.procs[proc.pid] = proc
        return proc.pid

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.pop(pid, None)
            if proc is not None:
                proc.returncode = exit_status(wait_status)  # reaped here: Popen must not wait again
            if pid == self.server_pid:
                self.server_status = exit_status(wait_status)
            elif pid == self.sidecar_pid:
                self._sidecar_exited(exit_status(wait_status))
            # else: an orphan re-parented to us (PID 1): reaped, nothing else to do

    def _sidecar_exited(self, status: int) -> None:
        self.sidecar_pid = None
        if self.stopping:
            log(f"sidecar exited with status {status}")
            return
        if status == FATAL_SIDECAR_STATUS:
            self.sidecar_fatal = status
            log(f"sidecar exited with status {status} (usage or configuration error): stopping")
            return
        ran = time.monotonic() - self.sidecar_started
        self.backoff_s = 1.0 if ran >= STABLE_S else min(self.backoff_s * 2, BACKOFF_MAX_S)
        self.sidecar_restart_at = time.monotonic() + self.backoff_s
        log(f"sidecar exited with status {status} after {ran:.0f} s; restarting in {self.backoff_s:.0f} s")

    def _start_sidecar(self) -> None:
        self.sidecar_pid = self.sidecar_pgid = self._spawn(self.sidecar_cmd)
        self.sidecar_started = time.monotonic()
        self.sidecar_restart_at = None

    @staticmethod
    def _signal_group(pid: int | None, signum: int) -> None:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signum)

    def _stop(self) -> None:
        """SIGTERM to the sidecar, then the server; SIGKILL to what is left after the grace period."""
        self.stopping = True
        self._signal_group(self.sidecar_pid, signal.SIGTERM)
        if self.server_status is None:
            self._signal_group(self.server_pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            self._reap()
            if self.sidecar_pid is None and self.server_status is not None:
                break
            time.sleep(POLL_S)
        # Whatever is left of both process groups (a leader may be gone while its children are not).
        for pgid in (self.sidecar_pgid, self.server_pid):
            self._signal_group(pgid, signal.SIGKILL)
        self.sidecar_pid = None
        time.sleep(POLL_S)
        self._reap()

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log(f"server: {shlex.join(self.server_cmd)}")
        log(f"sidecar: {shlex.join(self.sidecar_cmd)}")
        self.server_pid = self._spawn(self.server_cmd)
        self._start_sidecar()
        while True:
            self._reap()
            if self.stop_signal is not None:
                log(f"signal {signal.Signals(self.stop_signal).name}: stopping sidecar and server")
                self._stop()
                return 0
            if self.server_status is not None:
                log(f"server exited with status {self.server_status}: stopping the sidecar")
                self._stop()
                return self.server_status or 1  # the server never exits on its own when healthy
            if self.sidecar_fatal is not None:
                self._stop()
                return self.sidecar_fatal
            if self.sidecar_pid is None and time.monotonic() >= (self.sidecar_restart_at or 0.0):
                self._start_sidecar()
            time.sleep(POLL_S)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="truepolicy-pod", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run `truepolicy server` and `truepolicy sidecar`")
    check = sub.add_parser("health", help="exit 0 iff SGLang's /health answers 200")
    for p in (run, check):
        p.add_argument("--config-dir", type=Path, default=Path(DEFAULT_CONFIG_DIR))
    run.add_argument(
        "--truepolicy",
        type=shlex.split,
        default=None,
        help="the truepolicy command (default: `truepolicy` on PATH, else this Python's -m truepolicy.cli)",
    )
    run.add_argument("--grace", type=float, default=45.0, help="seconds from SIGTERM to SIGKILL")
    check.add_argument("--timeout", type=float, default=20.0, help="seconds (SGLang's own check: 20)")
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    server_args = read_args(opts.config_dir / SERVER_ARGS)
    if opts.command == "health":
        return health(sglang_health_url(server_args), opts.timeout)
    sidecar_args = read_args(opts.config_dir / SIDECAR_ARGS)
    exe = opts.truepolicy or default_truepolicy()
    return Supervisor([*exe, "server", *server_args], [*exe, "sidecar", *sidecar_args], opts.grace).run()


if __name__ == "__main__":
    sys.exit(main())
