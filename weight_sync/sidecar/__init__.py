"""The weight-sync sidecar: trainer → process group (gloo / NCCL) → (FP8) → SGLang, atomic and versioned.

- :mod:`~weight_sync.sidecar.updater`: the update state machine (the one core object);
- :mod:`~weight_sync.sidecar.app`: its HTTP API (FastAPI); :mod:`~weight_sync.sidecar.cli`: the command;
- :mod:`~weight_sync.sidecar.wire`: the JSON types; :mod:`~weight_sync.sidecar.errors`: error → status;
- :mod:`~weight_sync.sidecar.plan` (manifest validation and bucket layout),
  :mod:`~weight_sync.sidecar.pipeline` (receive → check / FP8 → staging),
  :mod:`~weight_sync.sidecar.sglang_api` (the SGLang endpoints used),
  :mod:`~weight_sync.sidecar.group` (the trainer–sidecars process group).
"""
