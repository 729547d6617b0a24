"""Prometheus metrics of one sidecar (its own registry; ``GET /metrics`` serves the text format)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "truepolicy_sidecar"
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sync_duration = Histogram(
            f"{PREFIX}_sync_duration_seconds",
            "Duration of successful weight syncs (commit to done)",
            registry=r,
            buckets=DURATION_BUCKETS,
        )
        self.stage_seconds = Gauge(
            f"{PREFIX}_last_sync_stage_seconds", "Stages of the last successful sync", ["stage"], registry=r
        )
        self.paused_seconds = Histogram(
            f"{PREFIX}_generation_paused_seconds",
            "How long generation was paused per sync",
            registry=r,
            buckets=DURATION_BUCKETS,
        )
        self.bytes = Counter(f"{PREFIX}_sync_bytes", "Bytes received from the trainer", registry=r)
        self.bandwidth = Gauge(
            f"{PREFIX}_last_sync_bandwidth_bytes_per_second",
            "Receive bandwidth of the last successful sync",
            registry=r,
        )
        self.syncs = Counter(f"{PREFIX}_syncs", "Successful weight syncs", registry=r)
        self.failures = Counter(
            f"{PREFIX}_sync_failures", "Failed or refused weight syncs, by error code", ["error"], registry=r
        )
        self.restores = Counter(
            f"{PREFIX}_restores", "Previous versions put back after a failed apply", registry=r
        )
        self.cache_not_flushed = Counter(
            f"{PREFIX}_prefix_cache_not_flushed",
            "Syncs after which SGLang could not flush its prefix cache (requests were waiting)",
            registry=r,
        )
        self.version_info = Gauge(
            f"{PREFIX}_version_info", "The weight version the server serves (label)", ["version"], registry=r
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when SGLang is up and a version is known", registry=r)
        self._version: str | None = None

    def set_version(self, version: str | None) -> None:
        if self._version is not None:
            self.version_info.remove(self._version)
        self._version = version
        if version is not None:
            self.version_info.labels(version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
