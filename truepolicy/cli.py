"""The ``truepolicy`` command."""

from __future__ import annotations

import argparse
import sys

from server_patches import launcher


def _add_server_parser(sub) -> argparse.ArgumentParser:
    server = sub.add_parser(
        "server",
        help="run the real SGLang server with the on-policy plugin",
        description=(
            "Launch the real SGLang 0.5.15 HTTP server (sglang.launch_server) with the truepolicy "
            "plugin enabled. The options below are truepolicy's; every other argument is passed "
            "unchanged to SGLang (see `python -m sglang.launch_server --help`)."
        ),
        epilog="All other arguments go to SGLang, e.g. --port 30000 --skip-tokenizer-init.",
        allow_abbrev=False,
    )
    launcher.add_server_arguments(server)
    return server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="truepolicy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_server_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="the main job: an on-policy GRPO loop on the real server, weights synced every step",
        description="Build a tiny Qwen3, start `truepolicy server` and `truepolicy sidecar`, train it for a "
        "few GRPO steps with rollouts from the server and a weight push after every step, print per step "
        "the reward, train_rollout_logprob_abs_diff and max |ratio - 1|, and write a report (PNG, markdown).",
    )
    from truepolicy import demo as demo_module

    demo_module.add_arguments(demo)

    check = sub.add_parser(
        "parity-check",
        help="rollouts from a running server vs the trainer side; exit 1 unless bitwise equal",
        description="Send mixed rollouts to a running server, recompute them with the trainer side "
        "(HF transformers + parity.prepare_model), print per-request stats and "
        "train_rollout_logprob_abs_diff; exit status 1 if it is not exactly 0.0.",
    )
    from parity import cli as parity_cli

    parity_cli.add_arguments(check)

    sidecar = sub.add_parser(
        "sidecar",
        help="the weight-sync sidecar beside one SGLang server (HTTP control API, NCCL/gloo receive)",
        description="Receive trainer weights over a torch.distributed group, optionally FP8-quantize "
        "them, and load them into the SGLang server atomically, with a version per update.",
    )
    from weight_sync.sidecar import cli as sidecar_cli

    sidecar_cli.add_arguments(sidecar)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:
        # Only the server's parser: the launcher must not import the trainer-side stack (the demo's,
        # the sidecar's) into an SGLang host that may lack it.
        server_only = argparse.ArgumentParser(prog="truepolicy")
        _add_server_parser(server_only.add_subparsers(dest="command", required=True))
        opts, rest = server_only.parse_known_args(argv)
        try:
            launcher.exec_server(opts, rest)
        except launcher.LaunchError as exc:
            print(f"truepolicy server: {exc}", file=sys.stderr)
            return 2
        return 0  # not reached: exec_server replaces this process
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.command == "demo":
        from truepolicy import demo as demo_module

        return demo_module.run(opts)
    if opts.command == "parity-check":
        from parity import cli as parity_cli

        return parity_cli.run(opts)
    if opts.command == "sidecar":
        from weight_sync.sidecar import cli as sidecar_cli

        return sidecar_cli.run(opts)
    parser.error(f"unknown command {opts.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
