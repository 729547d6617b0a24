"""The sidecar's configuration: one typed object, read in one place (command line, then environment).

Secrets never come from the command line (it is visible in ``ps``): the bearer token comes from
``$TRUEPOLICY_SIDECAR_TOKEN`` or from a file (``--token-file``, e.g. a mounted Kubernetes Secret),
SGLang's admin key likewise from ``$TRUEPOLICY_SGLANG_API_KEY`` or ``--sglang-api-key-file``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from weight_sync.api.rollout import SCORE_BATCHES_IN_FLIGHT

TOKEN_ENV = "TRUEPOLICY_SIDECAR_TOKEN"
SGLANG_KEY_ENV = "TRUEPOLICY_SGLANG_API_KEY"

MiB = 1 << 20
GiB = 1 << 30


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    sglang_url: str
    host: str = "127.0.0.1"
    http_port: int = 30100
    grpc_port: int = 30101
    device: str = "cpu"
    token: str | None = None
    sglang_api_key: str | None = None
    model_path: str | None = None  # None: the path SGLang reports in /model_info
    max_request_bytes: int = 16 * MiB  # HTTP bodies (the manifest) above this: 413
    max_tensors: int = 200_000
    max_bucket_bytes: int = 2 * GiB
    max_total_bytes: int = 1 << 40
    transfer_timeout_s: float = 300.0  # process-group operations (one bucket) time out after this
    prepare_ttl_s: float = 120.0  # a prepared transfer not committed within this is dropped
    sglang_timeout_s: float = 600.0  # one SGLang call (loading a large model can take a while)
    keep_previous: bool = True  # keep the served version in host RAM to restore it on failure
    checkpoint_version: str = (
        "default"  # the version tag of the checkpoint on disk (SGLang's --weight-version)
    )
    allow_stale_prefix_cache: bool = False  # apply even if SGLang could not flush its prefix cache
    score_batches_in_flight: int = SCORE_BATCHES_IN_FLIGHT  # coalesced Score batches at SGLang at once

    @property
    def auth_required(self) -> bool:
        return self.token is not None


def _read_secret(environ, env_name: str, path: str | None) -> str | None:
    """A secret from a file (a mounted Secret) or else from the environment; never from argv."""
    if path:
        value = Path(path).read_text().strip()
        if not value:
            raise SettingsError(f"{path} is empty")
        return value
    value = environ.get(env_name, "").strip()
    return value or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sglang-url", required=True, help="the SGLang server this sidecar feeds")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    parser.add_argument("--http-port", type=int, default=30100, help="HTTP API (control, rollout, scoring)")
    parser.add_argument("--grpc-port", type=int, default=30101, help="gRPC API (truepolicy.v1 services)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where buckets land")
    parser.add_argument(
        "--model-path", default=None, help="checkpoint of the served model (default: SGLang's)"
    )
    parser.add_argument("--token-file", default=None, help=f"bearer token file (else ${TOKEN_ENV})")
    parser.add_argument(
        "--sglang-api-key-file", default=None, help=f"SGLang admin key file (else ${SGLANG_KEY_ENV})"
    )
    parser.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="serve mutating endpoints without a token (loopback only; for local experiments)",
    )
    parser.add_argument(
        "--checkpoint-version",
        default="default",
        help="the version tag SGLang gives the checkpoint it loaded (its --weight-version)",
    )
    parser.add_argument(
        "--allow-stale-prefix-cache",
        action="store_true",
        help="apply an update even when SGLang could not flush its prefix cache (off-policy prefixes!)",
    )
    parser.add_argument(
        "--score-batches-in-flight",
        type=int,
        default=SCORE_BATCHES_IN_FLIGHT,
        help="coalesced Score batches sent to SGLang at once (later calls wait and are batched)",
    )
    parser.add_argument("--max-request-mib", type=float, default=16.0, help="largest HTTP body accepted")
    parser.add_argument("--max-tensors", type=int, default=200_000)
    parser.add_argument("--max-bucket-mib", type=float, default=2048.0)
    parser.add_argument("--transfer-timeout", type=float, default=300.0, help="seconds per bucket")
    parser.add_argument("--prepare-ttl", type=float, default=120.0)
    parser.add_argument("--sglang-timeout", type=float, default=600.0)
    parser.add_argument(
        "--keep-previous",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the served version in host RAM (1x model) to restore it if an apply fails",
    )


def from_args(opts: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    token = _read_secret(environ, TOKEN_ENV, opts.token_file)
    key = _read_secret(environ, SGLANG_KEY_ENV, opts.sglang_api_key_file)
    if token is None and not opts.insecure_no_token:
        raise SettingsError(
            f"no bearer token: set ${TOKEN_ENV} or --token-file (or --insecure-no-token on loopback)"
        )
    if token is None and not _is_loopback(opts.host):
        raise SettingsError(f"refusing to serve without a token on non-loopback address {opts.host}")
    for flag, port in (("--http-port", opts.http_port), ("--grpc-port", opts.grpc_port)):
        if not 1 <= port <= 65535:
            raise SettingsError(f"bad {flag} {port}")
    if opts.score_batches_in_flight < 1:
        raise SettingsError(f"--score-batches-in-flight must be >= 1, got {opts.score_batches_in_flight}")
    if opts.http_port == opts.grpc_port:
        raise SettingsError(f"--http-port and --grpc-port are both {opts.http_port}")
    return Settings(
        sglang_url=opts.sglang_url.rstrip("/"),
        host=opts.host,
        http_port=opts.http_port,
        grpc_port=opts.grpc_port,
        device=opts.device,
        token=token,
        sglang_api_key=key,
        model_path=opts.model_path,
        max_request_bytes=int(opts.max_request_mib * MiB),
        max_tensors=opts.max_tensors,
        max_bucket_bytes=int(opts.max_bucket_mib * MiB),
        transfer_timeout_s=opts.transfer_timeout,
        prepare_ttl_s=opts.prepare_ttl,
        sglang_timeout_s=opts.sglang_timeout,
        keep_previous=opts.keep_previous,
        checkpoint_version=opts.checkpoint_version,
        allow_stale_prefix_cache=opts.allow_stale_prefix_cache,
        score_batches_in_flight=opts.score_batches_in_flight,
    )
