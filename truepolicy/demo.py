"""The main job: an end-to-end on-policy GRPO loop on the real SGLang server, weights synced every step.

``truepolicy demo`` builds (or reuses) the tiny random Qwen3, starts ``truepolicy server`` (SGLang
with the on-policy plugin) and ``truepolicy sidecar`` (the weight-sync sidecar) as real processes,
and trains the model in this process for a few GRPO steps (:mod:`truepolicy.grpo`): rollouts from
the server, the trainer's recomputation of their logprobs (before the update), the clipped loss
through the fused ratio op, AdamW, then the new bf16 weights pushed through
``weight_sync.client.WeightSyncClient``, the next step's rollouts coming from them.

Every step prints one row: the weight version that generated the rollouts, the mean reward,
``train_rollout_logprob_abs_diff`` (0.0: every token's logprob is the trainer's, bit for bit), the
max |ratio − 1| at the rollout step (0.0), and the push time. At the end the same step-0 requests are
sent to plain SGLang (``--no-on-policy``, the initial weights) for the plugin-off comparison, and a
report (PNG + markdown + metrics.json) goes into ``--output``. Exit status 1 if any bf16 step was not
bitwise on-policy.

Every process the demo starts runs in its own process group and is stopped on exit, on an error and
on Ctrl-C / SIGTERM; a process that dies is named with the tail of its log.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import requests
import torch

from parity.tiny_models import build_tiny_model, load_hf_model
from parity.trainer import prepare_model
from truepolicy import fp8_serving
from truepolicy.grpo import GRPOConfig, Policy, RolloutBatch, collect, recompute, step_requests
from truepolicy.report import GapComparison, ReportInputs, StepRecord, exact, write_report
from truepolicy.sglang_process import ServerStartError, SGLangServer, log_tail, running_server
from truepolicy.sidecar_process import SidecarProcess, SidecarStartError, running_sidecar
from weight_sync.client import WeightSyncClient

ARCH = "qwen3"
# --sleep-on-idle: the idle scheduler waits on its sockets instead of polling them in a busy loop,
# which would hold a core at 100% while the trainer computes.
SERVER_ARGS = ["--skip-tokenizer-init", "--max-total-tokens", "4096", "--sleep-on-idle"]
# On a GPU: SGLang's triton attention, and the pytorch sampler (the plugin's seeded sampling refuses
# the others).
CUDA_SERVER_ARGS = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--disable-cuda-graph",
                    "--mem-fraction-static", "0.3"]  # fmt: skip
# On the CPU the server computes on one OpenMP thread, like the trainer (see _run): the tiny model's
# ops are too small to split, and on a busy 2-core machine the hand-offs cost ~10x the work.
CPU_SERVER_ENV = {"OMP_NUM_THREADS": "1"}
PUSH_TIMEOUT_S = 300.0

T = TypeVar("T")


class DemoError(RuntimeError):
    pass


@dataclass(frozen=True)
class DemoConfig:
    device: str
    steps: int
    fp8: bool
    output: Path
    grpo: GRPOConfig
    server_gpu: int | None = None  # CUDA_VISIBLE_DEVICES of the server and the sidecar (None: inherited)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = GRPOConfig()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--server-gpu", type=int, default=None, metavar="INDEX",
        help="with --device cuda: run the server and the sidecar on this GPU (their CUDA_VISIBLE_DEVICES), "
        "the trainer on its current one; pushes then cross GPUs over NCCL (default: all on one GPU)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=12, help="GRPO steps (one weight push each)")
    parser.add_argument(
        "--fp8", action="store_true",
        help="the sidecar pushes block-FP8 weights (not bitwise on-policy against the bf16 trainer)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=Path("demo-report"), help="report and logs go here")
    parser.add_argument("--prompts", type=int, default=g.prompts_per_step, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=g.group_size, help="completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=g.new_tokens, help="tokens per completion")
    parser.add_argument("--lr", type=float, default=g.learning_rate, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=g.seed)


def config_from_args(opts: argparse.Namespace) -> DemoConfig:
    if opts.steps < 1 or opts.prompts < 1 or opts.group_size < 2 or opts.new_tokens < 1:
        raise DemoError("need --steps >= 1, --prompts >= 1, --group-size >= 2, --new-tokens >= 1")
    grpo = dataclasses.replace(
        GRPOConfig(), prompts_per_step=opts.prompts, group_size=opts.group_size,
        new_tokens=opts.new_tokens, learning_rate=opts.lr, seed=opts.seed,
    )  # fmt: skip
    if opts.server_gpu is not None and (opts.device != "cuda" or opts.server_gpu < 0):
        raise DemoError("--server-gpu takes a GPU index (>= 0) and needs --device cuda")
    return DemoConfig(
        device=opts.device, steps=opts.steps, fp8=opts.fp8, output=opts.output, grpo=grpo,
        server_gpu=opts.server_gpu,
    )  # fmt: skip


# ---- processes ----------------------------------------------------------------------------------
class Processes:
    """The processes the demo started, to name the one that died when a call fails."""

    def __init__(self) -> None:
        self._named: list[tuple[str, SGLangServer | SidecarProcess]] = []

    def add(self, name: str, proc: SGLangServer | SidecarProcess) -> None:
        self._named.append((name, proc))

    def check(self) -> None:
        for name, proc in self._named:
            code = proc.process.poll()
            if code is not None:
                raise DemoError(
                    f"{name} (pid {proc.process.pid}) exited with status {code}; "
                    f"log {proc.log_path}:\n{log_tail(proc.log_path)}"
                )

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``; if it fails, say which process died (if one did), else what failed."""
        try:
            return fn()
        except (requests.RequestException, RuntimeError) as exc:
            self.check()
            raise DemoError(f"{what} failed: {exc}") from exc


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that every ``finally`` stops what the demo started."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- output -------------------------------------------------------------------------------------
HEADER = (
    f"{'step':>4} {'version':>9} {'reward':>7} {'train_rollout_logprob_abs_diff':>31} "
    f"{'max|ratio-1|':>13} {'push_s':>7} {'gen_s':>6} {'train_s':>7}"
)


def row(r: StepRecord) -> str:
    return (
        f"{r.step:>4} {r.version:>9} {r.reward_mean:>7.3f} {exact(r.train_rollout_logprob_abs_diff):>31} "
        f"{exact(r.max_ratio_dev):>13} {r.push_s:>7.3f} {r.generate_s:>6.1f} {r.train_s:>7.1f}"
    )


def served_version(url: str) -> str:
    return str(requests.get(f"{url}/model_info", timeout=30).json()["weight_version"])


# ---- the run ------------------------------------------------------------------------------------
def server_options(cfg: DemoConfig) -> dict:
    """``running_server`` keyword arguments for the demo's servers on ``cfg.device``."""
    if cfg.device == "cpu":
        return {"device": "cpu", "extra_args": SERVER_ARGS, "env": CPU_SERVER_ENV}
    return {"device": cfg.device, "extra_args": SERVER_ARGS + CUDA_SERVER_ARGS, "env": server_gpu_env(cfg)}


def server_gpu_env(cfg: DemoConfig) -> dict[str, str]:
    """The server's and the sidecar's environment additions for ``--server-gpu``."""
    return {} if cfg.server_gpu is None else {"CUDA_VISIBLE_DEVICES": str(cfg.server_gpu)}


def trainer_model(cfg: DemoConfig, model_path: Path) -> torch.nn.Module:
    """The trainer's bf16 model under the contract of the server's device (CPU or GPU contract)."""
    return prepare_model(load_hf_model(model_path, cfg.device), server_device=cfg.device)


def train(
    cfg: DemoConfig, model_path: Path, served_path: Path, logs: Path
) -> tuple[list[StepRecord], RolloutBatch, torch.Tensor]:
    """The GRPO loop of the trainer (``model_path``, bf16) against the on-policy server (serving
    ``served_path``: the same checkpoint, or its FP8 version); returns the step records and step 0's
    rollouts with their |Δlogp| per token."""
    options = server_options(cfg)
    if cfg.fp8 and cfg.device == "cuda":
        options["extra_args"] = options["extra_args"] + fp8_serving.CUDA_FP8_SERVER_ARGS
    policy = Policy(trainer_model(cfg, model_path), cfg.grpo)
    vocab = policy.model.config.vocab_size
    token = secrets.token_urlsafe(24)
    procs = Processes()
    records: list[StepRecord] = []
    with contextlib.ExitStack() as stack:
        print("starting truepolicy server (SGLang + the on-policy plugin) ...", flush=True)
        server = stack.enter_context(running_server(served_path, logs / "server.log", **options))
        procs.add("truepolicy server", server)
        print(f"  {server.url} (log {server.log_path})\nstarting truepolicy sidecar ...", flush=True)
        sidecar = stack.enter_context(
            running_sidecar(
                server.url, logs / "sidecar.log", token=token, device=cfg.device, env=server_gpu_env(cfg)
            )
        )
        procs.add("truepolicy sidecar", sidecar)
        print(f"  {sidecar.url} (log {sidecar.log_path})\n", flush=True)
        client = WeightSyncClient(
            [sidecar.url], token=token, device=cfg.device, timeout_s=PUSH_TIMEOUT_S,
            quantization=fp8_serving.quantization() if cfg.fp8 else "none",
        )  # fmt: skip
        stack.callback(client.close)
        version = procs.call("reading the served version", lambda: served_version(server.url))
        print(HEADER, flush=True)
        for step in range(cfg.steps):
            procs.check()
            payloads = step_requests(cfg.grpo, step, vocab)
            t0 = time.perf_counter()
            batch = procs.call(f"step {step}: generating", lambda p=payloads: collect(server.url, p))
            t1 = time.perf_counter()
            if batch.versions != {version}:
                raise DemoError(
                    f"step {step}: rollouts from versions {sorted(batch.versions)}, not {version}"
                )
            stats = policy.step(batch)
            t2 = time.perf_counter()
            pushed = f"step-{step + 1}"
            result = procs.call(
                f"step {step}: pushing {pushed}", lambda v=pushed: client.push(policy.model, v)
            )
            records.append(
                StepRecord(
                    step=step, version=version, reward_mean=stats.reward_mean, rewards=stats.rewards,
                    train_rollout_logprob_abs_diff=stats.train_rollout_logprob_abs_diff,
                    max_abs_logprob_diff=stats.logprob_abs_diff.max().item(),
                    max_ratio_dev=stats.max_ratio_dev, loss=stats.loss, clip_frac=stats.clip_frac,
                    push_version=pushed, push_s=result.timings["total_s"], push_bytes=result.bytes,
                    generate_s=t1 - t0, train_s=t2 - t1,
                )
            )  # fmt: skip
            print(row(records[-1]), flush=True)
            if step == 0:
                first, first_gap = batch, stats.logprob_abs_diff
            version = pushed
    return records, first, first_gap


def plugin_off_gap(cfg: DemoConfig, model_path: Path, logs: Path) -> tuple[RolloutBatch, torch.Tensor]:
    """Step 0's requests again, on plain SGLang (``--no-on-policy``) serving the initial bf16
    checkpoint; returns its rollouts and their |Δlogp| per token against the trainer's recomputation
    on the initial weights."""
    model = trainer_model(cfg, model_path)
    payloads = step_requests(cfg.grpo, 0, model.config.vocab_size)
    print("\nplugin-off comparison: step 0's requests on plain SGLang (--no-on-policy, initial weights) ...")
    with running_server(
        model_path, logs / "server-plugin-off.log", on_policy=False, **server_options(cfg)
    ) as server:
        procs = Processes()
        procs.add("plain SGLang server (--no-on-policy)", server)
        off = procs.call("plugin-off generation", lambda: collect(server.url, payloads))
    trainer = recompute(model, off, cfg.grpo.temperature)
    return off, (off.logprobs.double() - trainer.double()).abs()


def run(opts: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(opts)
        with _sigterm_as_interrupt():
            return _run(cfg)
    except (DemoError, ServerStartError, SidecarStartError) as exc:
        print(f"\ntruepolicy demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntruepolicy demo: interrupted; every process it started was stopped", file=sys.stderr)
        return 130


def _run(cfg: DemoConfig) -> int:
    t_start = time.perf_counter()
    if cfg.fp8 and (reason := fp8_serving.fp8_unsupported(cfg.device)):
        raise DemoError(reason)
    if cfg.device == "cpu":
        # The trainer's ops are tiny (the contract's attention runs row by row): OpenMP's hand-offs
        # between threads cost more than the work, ~10x on a busy 2-core machine. One thread (the
        # server's too: CPU_SERVER_ENV); the bits do not depend on it (0.0 at every step either way).
        torch.set_num_threads(1)
    model_path = build_tiny_model(ARCH)
    logs = cfg.output / "logs"
    print(f"model: tiny {ARCH} (random weights) {model_path}\noutput: {cfg.output}")
    served_path = model_path
    if cfg.fp8:
        served_path = fp8_serving.write_fp8_checkpoint(model_path, cfg.output / "fp8-checkpoint", cfg.device)
        print(
            f"served as block FP8: {served_path}\nFP8 rollouts are NOT bitwise on-policy against the bf16 "
            "trainer: the difference is measured below."
        )
    print()
    records, first, first_gap = train(cfg, model_path, served_path, logs)
    off, off_gap = plugin_off_gap(cfg, model_path, logs)
    inputs = report_inputs(cfg, model_path, records, (first, first_gap), (off, off_gap), t_start)
    paths = write_report(inputs, cfg.output)
    print()
    for note in inputs.notes[2:]:
        print(note)
    print(
        f"plugin off (step 0, initial weights): mean |Δlogp| {off_gap.mean().item():.3e}, "
        f"max {off_gap.max().item():.3e}"
    )
    print(f"report: {paths['png']}, {paths['md']}, {paths['json']}")
    print(f"wall time: {inputs.wall_s:.0f} s")
    return 0 if (bitwise(records) or cfg.fp8) else 1


def bitwise(records: list[StepRecord]) -> bool:
    return all(r.train_rollout_logprob_abs_diff == 0.0 and r.max_ratio_dev == 0.0 for r in records)


def report_inputs(
    cfg: DemoConfig,
    model_path: Path,
    records: list[StepRecord],
    on: tuple[RolloutBatch, torch.Tensor],
    off: tuple[RolloutBatch, torch.Tensor],
    t_start: float,
) -> ReportInputs:
    notes = [
        f"Reward: fraction of completion tokens whose id is a multiple of {cfg.grpo.target_modulus}; "
        f"mean {records[0].reward_mean:.3f} at step 0, {records[-1].reward_mean:.3f} at step "
        f"{records[-1].step}.",
        "train_rollout_logprob_abs_diff: mean |server − trainer| over the step's rollout tokens, the trainer "
        "recomputing them before its update; max |ratio − 1|: the loss op's ratio at the rollout step.",
    ]
    if cfg.fp8:
        notes.append(
            "FP8 rollouts are NOT bitwise on-policy against the bf16 trainer: the server computes with "
            "block-FP8 weights (and FP8 activations), the trainer in bf16. Measured here: mean |Δlogp| "
            f"{sum(r.train_rollout_logprob_abs_diff for r in records) / len(records):.3e} per token, "
            f"max |ratio − 1| {max(r.max_ratio_dev for r in records):.3e}."
        )
    elif bitwise(records):
        notes.append("Every step was bitwise on-policy: both values are exactly 0.0 at every step.")
    else:
        notes.append("NOT bitwise on-policy: some step has a nonzero difference (see the table).")
    what = (
        "The same requests (step 0's prompts, sampling seeds and n) on the initial weights: plugin on = "
        "the training run's step 0 on `truepolicy server`; plugin off = plain SGLang 0.5.15 (`truepolicy "
        "server --no-on-policy`, started after training on the initial checkpoint). Each rollout's own "
        "tokens are recomputed by the trainer (HF + parity.prepare_model, initial weights). Measured "
        "once, on the initial weights: the plugin-off server is not trained along. Plain SGLang ignores "
        "`sampling_seed` outside its deterministic mode, so its completions are other samples of the "
        "same requests; each rollout is compared with the trainer on its own tokens."
    )
    if cfg.fp8:
        what += " Plugin on serves the FP8 checkpoint here, plugin off the bf16 one."
    config = {"steps": cfg.steps, "device": cfg.device, "fp8": cfg.fp8, "model": str(model_path)}
    return ReportInputs(
        mode="fp8" if cfg.fp8 else "bf16",
        device=cfg.device,
        config=config | dataclasses.asdict(cfg.grpo),
        steps=records,
        gap=GapComparison(
            what=what,
            on=on[1].flatten(),
            off=off[1].flatten(),
            same_completions=(off[0].completions == on[0].completions).all(-1).float().mean().item(),
        ),
        notes=notes,
        wall_s=time.perf_counter() - t_start,
    )
