"""The SGLang 0.5.15 HTTP endpoints the sidecar calls (it is their only client, on loopback).

Verified against sglang 0.5.15 (``srt/entrypoints/http_server.py``, ``srt/managers/io_struct.py``):

- ``POST /pause_generation {"mode": "retract"}``: the scheduler stops, running requests go back to
  the waiting queue with their KV freed (recomputed on resume, so with the new weights); new
  requests wait in the tokenizer manager. Nothing is aborted. (``in_place`` would keep KV computed
  with the old weights and makes ``flush_cache`` fail; ``abort`` loses requests.)
- ``POST /update_weights_from_tensor``: ``serialized_named_tensors`` is one base64
  ``MultiprocessingSerializer`` (ForkingPickler) payload per TP rank; CPU tensors travel as
  shared-memory file names, CUDA tensors as IPC handles. While paused it does not wait for the
  model-update writer lock. ``weight_version`` is set by the tokenizer manager iff the load
  succeeded. ``flush_cache`` must be false here: after the load SGLang *asserts* the flush, which
  fails (inside the scheduler) while retracted requests wait.
- ``POST /flush_cache``: 200 flushed, 400 not flushed (requests waiting or running).
- ``POST /update_weight_version``: its ``abort_all_requests`` defaults to **true**: always sent false.
- ``POST /continue_generation``: resumes; ``torch_empty_cache`` false on CPU.
- ``GET /model_info``: ``model_path``, ``weight_version``. ``GET /server_info``: ``tp_size``,
  ``dtype``, ``disable_radix_cache``.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import requests


class SGLangCallError(RuntimeError):
    def __init__(self, path: str, message: str, status: int | None = None):
        super().__init__(f"SGLang {path}: {message}")
        self.path = path
        self.status = status


@dataclass(frozen=True)
class ServerFacts:
    model_path: str
    weight_version: str
    tp_size: int
    dtype: str
    radix_cache: bool
    plugin_patches: tuple[str, ...]


def serialize_named_tensors(named_tensors: list) -> str:
    """SGLang's tensor-update payload (a ForkingPickler pickle, as MultiprocessingSerializer makes it),
    built here, locally, for the server beside us; base64 for the JSON body."""
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    ForkingPickler(buf).dump(named_tensors)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class SGLangAPI:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.trust_env = False  # loopback: never through a proxy
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _call(self, method: str, path: str, *, json=None, timeout: float | None = None, ok=(200,)):
        try:
            resp = self.session.request(
                method, f"{self.url}{path}", json=json, timeout=timeout or self.timeout_s
            )
        except requests.RequestException as exc:
            raise SGLangCallError(path, f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code not in ok:
            raise SGLangCallError(path, f"HTTP {resp.status_code}: {resp.text[:500]}", resp.status_code)
        return resp

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            return self.session.get(f"{self.url}/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def facts(self) -> ServerFacts:
        info = self._call("GET", "/model_info", timeout=30).json()
        server = self._call("GET", "/server_info", timeout=30).json()
        patches: tuple[str, ...] = ()
        for state in server.get("internal_states") or []:
            report = (state or {}).get("truepolicy") or {}
            patches = tuple(report.get("patches") or ())
        return ServerFacts(
            model_path=info["model_path"],
            weight_version=str(info.get("weight_version")),
            tp_size=int(server.get("tp_size") or 1),
            dtype=str(server.get("dtype") or "auto"),
            radix_cache=not bool(server.get("disable_radix_cache")),
            plugin_patches=patches,
        )

    def weight_version(self) -> str:
        return str(self._call("GET", "/model_info", timeout=30).json().get("weight_version"))

    def pause(self, mode: str = "retract") -> None:
        self._call("POST", "/pause_generation", json={"mode": mode})

    def resume(self, empty_cuda_cache: bool = False) -> None:
        self._call("POST", "/continue_generation", json={"torch_empty_cache": empty_cuda_cache})

    def load_tensors(self, payload: str, tp_size: int, version: str | None) -> None:
        body = {
            "serialized_named_tensors": [payload] * tp_size,
            "flush_cache": False,
            "abort_all_requests": False,
            "weight_version": version,
        }
        out = self._call("POST", "/update_weights_from_tensor", json=body, ok=(200, 400)).json()
        if not out.get("success"):
            raise SGLangCallError("/update_weights_from_tensor", out.get("message", "failed"))

    def load_from_disk(self, model_path: str, version: str | None) -> None:
        body = {
            "model_path": model_path,
            "flush_cache": False,
            "abort_all_requests": False,
            "weight_version": version,
        }
        out = self._call("POST", "/update_weights_from_disk", json=body, ok=(200, 400)).json()
        if not out.get("success"):
            raise SGLangCallError("/update_weights_from_disk", out.get("message", "failed"))

    def flush_cache(self) -> bool:
        return self._call("POST", "/flush_cache", ok=(200, 400)).status_code == 200

    def set_version(self, version: str) -> None:
        self._call(
            "POST", "/update_weight_version", json={"new_version": version, "abort_all_requests": False}
        )
