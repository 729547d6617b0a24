"""A fault-injecting HTTP proxy in front of a real SGLang server, for the sidecar's failure paths.

Every request is forwarded to the upstream server unchanged, except that a path armed with
``fail_next(path)`` answers its next call with an error status instead (once): the sidecar then sees
exactly what a failing SGLang endpoint looks like, with no test switch inside the sidecar.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._armed: dict[str, int] = {}
        self.injected: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, path: str, status: int = 500) -> None:
        with self._lock:
            self._armed[path] = status

    def _take(self, path: str) -> int | None:
        with self._lock:
            status = self._armed.pop(path, None)
            if status is not None:
                self.injected.append(path)
            return status

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(30)

    def _handler(self):
        proxy = self
        session = requests.Session()
        session.trust_env = False

        class Handler(BaseHTTPRequestHandler):
            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?", 1)[0]
                status = proxy._take(path)
                if status is not None:
                    self._send(status, json.dumps({"error": f"injected by FaultProxy on {path}"}).encode())
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                resp = session.request(
                    self.command, proxy.upstream + self.path, data=body, headers=headers, timeout=600
                )
                self._send(resp.status_code, resp.content, resp.headers.get("Content-Type"))

            def _send(self, status: int, content: bytes, content_type: str | None = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type or "application/octet-stream")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = _relay

            def log_message(self, *args) -> None:  # quiet: the sidecar and SGLang log the calls
                pass

        return Handler
