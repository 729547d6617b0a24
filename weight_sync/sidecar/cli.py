"""``truepolicy sidecar``: run the weight-sync sidecar beside one SGLang server.

``add_arguments(parser)`` / ``run(opts)`` are what ``truepolicy/cli.py`` wires in; ``python -m
weight_sync.sidecar`` runs the same thing on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from weight_sync.sidecar import settings as settings_mod


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings_mod.add_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(opts: argparse.Namespace) -> int:
    from weight_sync.sidecar.serve import serve

    logging.basicConfig(
        level=opts.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = settings_mod.from_args(opts)
    except (settings_mod.SettingsError, OSError) as exc:
        print(f"truepolicy sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings, opts.log_level))
    except RuntimeError as exc:  # e.g. the gRPC port is taken
        print(f"truepolicy sidecar: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="truepolicy sidecar", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
