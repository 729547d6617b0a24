"""Benchmark: the price of exactness end to end -- rollout throughput of ``truepolicy server`` (plugin on)
against the same SGLang 0.5.15 without it, and against SGLang's own answers.

The kernel benchmarks (``bench_paged_attention.py``, ``bench_batch_invariant_matmul.py``) time one op
each against its fastest non-exact counterpart. What an RL user pays is the sum over a model's
forward, under SGLang's scheduler, CUDA graphs and sampler: this script measures that. Servers, one
after the other, on the same model and the same rollout-shaped workloads:

- ``plugin``: ``truepolicy server`` (the on-policy patches; on a GPU with ``--cuda-graph``);
- ``plain``: the same SGLang without the plugin, on the backends the plugin mode uses (GPU: the triton
  attention backend and the pytorch sampler; CPU: torch_native): what the patches cost by themselves.
  The baseline of the ratios;
- ``sglang-deterministic`` (GPU): SGLang's own batch-invariant mode (``--enable-deterministic-inference``,
  triton attention): deterministic, but not the trainer's numbers;
- ``sglang-default`` (GPU): SGLang's defaults for the GPU (its fastest attention and sampler): what a
  user who gives up exactness runs.

Every server captures CUDA graphs up to the same batch size (GPU). A workload is ``batch`` requests
of ``prompt`` random token ids each, sampled at temperature 1 for exactly ``new`` tokens
(``ignore_eos``), each sampled token's logprob returned (``return_logprob``, as a rollout asks;
``--no-logprobs``: without), sent as one batched ``/generate`` call (SGLang schedules them together,
as a rollout step does). Each workload runs once to warm up, then ``--rounds`` times on fresh
prompts (no prefix-cache hits); the table gives the median output tokens/s and its ratio to
``plain`` (same process, same model). A server that does not start is reported and skipped.

GPU model (``--model qwen3-0.6b``): Qwen3-0.6B's shapes (28 layers, hidden 1024, 16 / 8 heads of 128,
MLP 3072, vocab 151936; its lm_head untied) with random bf16 weights, built locally into the model
cache. CPU (``--model tiny``): the tiny Qwen3 of the tests, small workloads: a smoke run of the same
code (the CPU figures say nothing about a GPU).

Measured (2026-11-29, H200, at ``ef0ff98``: RoPE as one kernel, the sampler's logprobs without host
synchronisation), output tokens/s with logprobs, ``--rounds 2``; plugin vs plain in one run:
1 x 1k prompt 367.5 vs 402.7 (0.91x), 64 x 1k 9703 vs 10549 (0.92x), 8 x 16k 539 vs 564 (0.96x);
``plain,sglang-deterministic`` in another: plain 489.5 / 10601 / 564, deterministic 181.5 / 6550 / 333
(0.37x / 0.62x / 0.59x). At 1 request plain's own rate moves between server starts (378-490 tok/s over
three runs, 2.0-2.6 ms per token), so that ratio is taken within one run; ``--rounds 7 --configs
plain,plugin --workloads b1_p1024_n256,b4_p1024_n256``: 0.84x at 1 request, 0.91x at 4. Before
RoPE was one kernel and the sampler synchronisation-free (``da79070``, no logprobs asked): 0.59x,
0.78x, 0.87x. ``sglang-default``: not measured (the carried wheels lack its default
FlashAttention-3 and FlashInfer binaries).

At ``e5488f8`` (q/k norms and SiLU-and-mul as one kernel each), two runs of ``--configs plain,plugin
--workloads b1_p1024_n256,b64_p1024_n256``: 0.85x / 0.79x (``--rounds 3``) and 0.91x / 0.97x
(``--rounds 2``); plain at 1 request 489 and 458 tok/s. The spread between server starts is as large
as the effects measured: compare within one run, over several runs.

``--cycles C``: the configs are started C times in turn (plain, plugin, plain, plugin, ...), each start a
fresh server, so that each plugin start is compared with the plain start beside it: the table gives,
per config, the median over the cycles of each start's median, and per workload each cycle's ratio to
that cycle's ``plain`` (the spread of the ratio over server starts, instead of one draw of it).

``--profile-steps K``: after a workload's rounds, one more round under SGLang's profiler
(``/start_profile``, by stage); per decode step of the first K: the GPU kernels' count, summed time and
span (busy / span below 1: the GPU waited for the host), the kernels taking the most time, and the GPU's
idle time, each gap of 10 us or more charged to the launch after it (:func:`gpu_idle_gaps`); the
traces in ``--out``/profiles (Perfetto / chrome://tracing). Where a config's decode step goes. (Once,
at 64 requests, the plugin's scheduler died of heap corruption as the profiler stopped, "free():
invalid next size", as in SGLang's issue 3931 about serving under the torch profiler; the timed
rounds before it were kept. No run without the profiler has failed so.)

    python benchmarks/bench_server_throughput.py [--device cuda] [--configs plugin,plain,...]
        [--workloads b64_p1024_n256,...] [--rounds 3] [--cycles 1] [--profile-steps 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parity.tiny_models import COMMON, build_tiny_model  # noqa: E402
from truepolicy.sglang_process import ServerStartError, running_server  # noqa: E402

# Qwen3-0.6B's shapes (its config.json), random weights; the lm_head untied, as in every model the GPU
# parity checks serve (it is its own matmul either way).
QWEN3_0_6B = dict(
    vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
    tie_word_embeddings=False, initializer_range=0.02,
)  # fmt: skip
MODELS = {"qwen3-0.6b": QWEN3_0_6B, "tiny": {}}
CUDA_GRAPH_MAX_BS = 64  # every GPU server captures up to this batch (the largest workload's)


@dataclass(frozen=True)
class ServerConfig:
    """One server under test: the plugin on or off, and the SGLang arguments it adds per device."""

    name: str
    on_policy: bool
    gpu_args: tuple[str, ...]
    cpu_args: tuple[str, ...] | None  # None: GPU only

    def args(self, device: str) -> tuple[str, ...] | None:
        return self.gpu_args if device == "cuda" else self.cpu_args


CONFIGS = {
    c.name: c
    for c in (
        ServerConfig("plugin", True, ("--cuda-graph",), ()),
        ServerConfig("plain", False, ("--attention-backend", "triton", "--sampling-backend", "pytorch"), ()),
        ServerConfig(
            "sglang-deterministic", False,
            ("--attention-backend", "triton", "--enable-deterministic-inference"), None,
        ),
        ServerConfig("sglang-default", False, (), None),
    )
}  # fmt: skip
BASELINE = "plain"


@dataclass(frozen=True)
class Workload:
    batch: int
    prompt: int
    new: int

    @property
    def name(self) -> str:
        return f"b{self.batch}_p{self.prompt}_n{self.new}"

    @staticmethod
    def parse(name: str) -> Workload:
        try:
            b, p, n = name.split("_")
            assert b[0] == "b" and p[0] == "p" and n[0] == "n"
            return Workload(int(b[1:]), int(p[1:]), int(n[1:]))
        except (ValueError, AssertionError):
            raise argparse.ArgumentTypeError(f"workload {name!r}: b<batch>_p<prompt>_n<new>") from None


WORKLOADS = {
    "cuda": "b1_p1024_n256,b64_p1024_n256,b8_p16384_n256",
    "cpu": "b1_p32_n16,b4_p32_n16",
}


def context_length(workloads: list[Workload]) -> int:
    """The servers' context length: the longest request, and room for SGLang's reserved tokens (it
    shortens a request that ends within 2 tokens of the context length)."""
    return max(w.prompt + w.new for w in workloads) + 64


def prompts(w: Workload, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (w.batch, w.prompt), generator=g).tolist()


def run_round(
    session: requests.Session, url: str, w: Workload, vocab: int, seed: int, logprobs: bool
) -> float:
    """One batched /generate of ``w`` on fresh prompts (with each sampled token's logprob when
    ``logprobs``, as a rollout asks); its output tokens per second (wall clock)."""
    payload = {
        "input_ids": prompts(w, vocab, seed),
        "sampling_params": {"max_new_tokens": w.new, "temperature": 1.0, "ignore_eos": True},
        "return_logprob": logprobs,
    }
    t0 = time.perf_counter()
    resp = session.post(f"{url}/generate", json=payload, timeout=1800)
    elapsed = time.perf_counter() - t0
    resp.raise_for_status()
    out = resp.json()
    got = [o["meta_info"]["completion_tokens"] for o in out]
    if len(out) != w.batch or any(n != w.new for n in got):
        raise RuntimeError(f"{w.name}: expected {w.batch} completions of {w.new} tokens, got {got}")
    if logprobs and any(len(o["meta_info"]["output_token_logprobs"]) != w.new for o in out):
        raise RuntimeError(f"{w.name}: a completion without one logprob per token")
    return w.batch * w.new / elapsed


PROFILE_TOP = 12  # kernels (ops on the CPU) listed per profiled workload


def profile_round(
    session: requests.Session, url: str, w: Workload, vocab: int, seed: int, logprobs: bool, steps: int,
    out_dir: Path, profile_id: str, device: str,
) -> dict:  # fmt: skip
    """One more round of ``w`` (not timed) under SGLang's own profiler: ``POST /start_profile`` with
    ``profile_by_stage``, so that the scheduler traces the prefill and then the first ``steps`` decode
    steps (torch.profiler; GPU kernels through CUPTI, inside CUDA graphs too) and writes
    ``<profile_id>-TP-0-DECODE.trace.json.gz`` to ``out_dir`` as the next decode step begins. The decode
    trace, summarised by :func:`summarize_decode_trace`."""
    body = {
        "output_dir": str(out_dir.resolve()), "profile_by_stage": True, "num_steps": steps,
        "activities": ["CPU", "GPU"] if device == "cuda" else ["CPU"], "with_stack": False,
        "record_shapes": False, "profile_id": profile_id,
    }  # fmt: skip
    session.post(f"{url}/start_profile", json=body, timeout=120).raise_for_status()
    run_round(session, url, w, vocab, seed, logprobs)
    trace = out_dir / f"{profile_id}-TP-0-DECODE.trace.json.gz"
    if not trace.is_file():
        raise RuntimeError(f"{w.name}: SGLang's profiler wrote no decode trace {trace}")
    return summarize_decode_trace(trace, steps, device)


def summarize_decode_trace(trace: Path, steps: int, device: str) -> dict:
    """Per decode step, from a Chrome trace of ``steps`` steps: on a GPU the kernels (category
    ``kernel``): how many, their summed time (``busy_us``), the span from the first kernel's start to
    the last one's end (``span_us``: the step period as the GPU saw it; busy / span < 1 is time the GPU
    waited for the host), and the kernels taking the most time. On the CPU (a smoke run) the same over
    ``cpu_op`` events, whose times are inclusive (a nested op is counted in its parent too): only the
    listing means something there."""
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    category = "kernel" if device == "cuda" else "cpu_op"
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == category]
    if not ops:
        raise RuntimeError(f"{trace}: no {category!r} events")
    per_name: dict[str, list[float]] = {}
    for e in ops:
        per_name.setdefault(e["name"], []).append(float(e["dur"]))
    start = min(float(e["ts"]) for e in ops)
    end = max(float(e["ts"]) + float(e["dur"]) for e in ops)
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:PROFILE_TOP]
    return dict(
        category=category, steps=steps, trace=trace.name,
        events_per_step=len(ops) / steps,
        busy_us_per_step=sum(float(e["dur"]) for e in ops) / steps,
        span_us_per_step=(end - start) / steps,
        top=[dict(name=name, us_per_step=sum(d) / steps, calls_per_step=len(d) / steps) for name, d in top],
        idle=gpu_idle_gaps(events, steps) if device == "cuda" else None,
    )  # fmt: skip


IDLE_GAP_MIN_US = 10.0  # shorter GPU idle gaps are kernel-to-kernel launch latency: summed, not listed


def _innermost(intervals: list[dict], at: float) -> dict | None:
    """The shortest of the ``X`` events that hold the instant ``at``."""
    holding = [e for e in intervals if float(e["ts"]) <= at <= float(e["ts"]) + float(e["dur"])]
    return min(holding, key=lambda e: float(e["dur"])) if holding else None


def gpu_idle_gaps(events: list[dict], steps: int) -> dict:
    """Where the GPU waited for the host. Idle time is the span not covered by any kernel (kernels of
    several streams may overlap). Gaps shorter than ``IDLE_GAP_MIN_US`` (launch latency between
    kernels) are only summed; each longer one is charged to the launch of the kernel after it: the
    CUDA runtime call with the kernel's ``correlation`` id (``cudaLaunchKernel``, ``cudaGraphLaunch``,
    ...), the innermost CPU op holding that call, and the innermost scheduler annotation
    (``user_annotation``) holding it. Grouped by (annotation, op), most idle time first, per step."""
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"),
                     key=lambda e: float(e["ts"]))  # fmt: skip
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}  # fmt: skip
    cpu_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    annotations = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"]
    groups: dict[tuple[str, str], list[float]] = {}
    short_us = 0.0
    busy_until = float(kernels[0]["ts"]) if kernels else 0.0
    for k in kernels:
        start = float(k["ts"])
        gap = start - busy_until
        if 0 < gap < IDLE_GAP_MIN_US:
            short_us += gap
        elif gap >= IDLE_GAP_MIN_US:
            call = runtime.get(k.get("args", {}).get("correlation"))
            at = float(call["ts"]) if call else start
            op = _innermost(cpu_ops, at) if call else None
            where = _innermost(annotations, at) if call else None
            what = f"{op['name']} -> {call['name']}" if op else (call["name"] if call else "-")
            groups.setdefault((where["name"] if where else "-", what), []).append(gap)
        busy_until = max(busy_until, start + float(k["dur"]))
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:PROFILE_TOP]
    return dict(
        short_gaps_us_per_step=short_us / steps,
        long_gaps_us_per_step=sum(sum(g) for g in groups.values()) / steps,
        top=[dict(annotation=a, launch=w, us_per_step=sum(g) / steps, gaps_per_step=len(g) / steps)
             for (a, w), g in rows],
    )  # fmt: skip


def print_profile(config: str, workload: str, prof: dict) -> None:
    what = "kernels" if prof["category"] == "kernel" else "cpu ops (inclusive times)"
    print(
        f"  {config:<22} {workload:<18} profile of {prof['steps']} decode steps, per step: "
        f"{prof['events_per_step']:.0f} {what}, busy {prof['busy_us_per_step']:.0f} us, "
        f"span {prof['span_us_per_step']:.0f} us",
        flush=True,
    )
    for t in prof["top"]:
        print(f"      {t['us_per_step']:>9.1f} us {t['calls_per_step']:>6.1f}x  {t['name'][:90]}", flush=True)
    idle = prof["idle"]
    if idle is not None:
        print(f"      GPU idle per step: {idle['short_gaps_us_per_step']:.0f} us in gaps under "
              f"{IDLE_GAP_MIN_US:.0f} us, {idle['long_gaps_us_per_step']:.0f} us in longer ones, by the "
              "launch after the gap:", flush=True)  # fmt: skip
        for g in idle["top"]:
            print(f"      {g['us_per_step']:>9.1f} us {g['gaps_per_step']:>6.1f}x  {g['annotation'][:40]} / "
                  f"{g['launch'][:60]}", flush=True)  # fmt: skip


def bench_config(
    config: ServerConfig, args: tuple[str, ...], device: str, model: Path, vocab: int,
    workloads: list[Workload], rounds: int, logprobs: bool, logs: Path, profile_steps: int, cycle: int,
) -> dict:  # fmt: skip
    """Start ``config``'s server, run every workload (warm-up + rounds); tokens/s per workload. With
    ``profile_steps`` > 0, one more round per workload under the profiler (:func:`profile_round`).
    ``cycle``: which start of this config (0, 1, ...; the log and trace names carry it from 1 on)."""
    label = config.name if cycle == 0 else f"{config.name}-c{cycle}"
    log = logs / f"server-{label}.log"
    longest = context_length(workloads)
    total = max(w.batch * (w.prompt + w.new) for w in workloads)
    server_args = [
        "--skip-tokenizer-init", "--max-total-tokens", str(max(total, 4096)),
        "--context-length", str(longest),
        *(["--cuda-graph-max-bs", str(CUDA_GRAPH_MAX_BS)] if device == "cuda" else []), *args,
    ]  # fmt: skip
    t0 = time.monotonic()
    result: dict = {"config": config.name, "cycle": cycle, "args": list(args)}
    try:
        with running_server(
            model, log, device=device, on_policy=config.on_policy,
            extra_args=server_args,
        ) as server:  # fmt: skip
            result["start_s"] = round(time.monotonic() - t0, 1)
            session = requests.Session()
            session.trust_env = False
            for i, w in enumerate(workloads):
                run_round(session, server.url, w, vocab, 1_000_000 + i, logprobs)  # warm-up
                rates = [
                    run_round(session, server.url, w, vocab, i * 1000 + r, logprobs) for r in range(rounds)
                ]
                result[w.name] = dict(median=statistics.median(rates), min=min(rates), max=max(rates))
                print(
                    f"  {label:<22} {w.name:<18} {statistics.median(rates):>10.1f} tok/s "
                    f"(min {min(rates):.1f}, max {max(rates):.1f})",
                    flush=True,
                )
                if profile_steps:
                    prof = profile_round(
                        session, server.url, w, vocab, 2_000_000 + i, logprobs, profile_steps,
                        logs / "profiles", f"{label}-{w.name}", device,
                    )  # fmt: skip
                    result[w.name]["profile"] = prof
                    print_profile(label, w.name, prof)
    except (ServerStartError, RuntimeError, requests.RequestException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result["error"] = first
        print(f"  {label}: FAILED: {first} (log {log})", flush=True)
    return result


def summarize(results: list[dict], workloads: list[Workload]) -> dict:
    """Per config and workload over the cycles: each start's median tokens/s (None where the start
    failed), their median, and each cycle's ratio to the same cycle's ``plain`` (None where either is
    missing) with the median of those ratios."""
    out: dict = {}
    for r in results:
        out.setdefault(r["config"], {w.name: dict(rates=[], ratios=[]) for w in workloads})
    base = {r["cycle"]: r for r in results if r["config"] == BASELINE}
    for r in results:
        for w in workloads:
            rate = r[w.name]["median"] if w.name in r else None
            b = base.get(r["cycle"], {})
            ratio = rate / b[w.name]["median"] if rate is not None and w.name in b else None
            cell = out[r["config"]][w.name]
            cell["rates"].append(rate)
            cell["ratios"].append(ratio)
    for cells in out.values():
        for cell in cells.values():
            rates = [x for x in cell["rates"] if x is not None]
            ratios = [x for x in cell["ratios"] if x is not None]
            cell["median"] = statistics.median(rates) if rates else None
            cell["median_ratio"] = statistics.median(ratios) if ratios else None
    return out


def print_table(summary: dict, workloads: list[Workload], cycles: int) -> None:
    over = "median of rounds" + (f", median of {cycles} server starts" if cycles > 1 else "")
    print(f"\n== output tokens/s ({over}) and ratio to {BASELINE!r} (the same SGLang, no plugin)")
    print(f"{'config':<22}" + "".join(f"{w.name:>26}" for w in workloads))
    for config, cells in summary.items():
        row = []
        for w in workloads:
            cell = cells[w.name]
            if cell["median"] is None:
                row.append(f"{'failed':>26}")
                continue
            ratio = f" ({cell['median_ratio']:.3f}x)" if cell["median_ratio"] is not None else ""
            row.append(f"{cell['median']:>16.1f}{ratio:>10}")
        print(f"{config:<22}" + "".join(row))
    if cycles > 1:
        print(f"\n== ratio to {BASELINE!r} per cycle (each start against the {BASELINE!r} start beside it)")
        for config, cells in summary.items():
            if config == BASELINE:
                continue
            for w in workloads:
                ratios = " ".join("-" if q is None else f"{q:.3f}" for q in cells[w.name]["ratios"])
                print(f"{config:<22} {w.name:<18} {ratios}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if gpu else "cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default=None, help="cuda: qwen3-0.6b; cpu: tiny")
    ap.add_argument("--configs", default=None, help=f"comma-separated, of {', '.join(CONFIGS)} (default: all "
                    "that the device runs)")  # fmt: skip
    ap.add_argument("--workloads", default=None, help="comma-separated b<batch>_p<prompt>_n<new>")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=1, help="start the configs this many times in turn "
                    "(per-cycle ratios to plain)")  # fmt: skip
    ap.add_argument("--no-logprobs", action="store_true", help="do not ask for the sampled tokens' logprobs")
    ap.add_argument("--out", type=Path, default=None, help="server logs, results.json (default: a temp dir)")
    ap.add_argument("--profile-steps", type=int, default=0, help="after the rounds, trace this many "
                    "decode steps per workload with SGLang's profiler (default 0: no profile)")  # fmt: skip
    opts = ap.parse_args(argv)
    if opts.rounds < 1:
        ap.error("--rounds: at least 1")
    if opts.cycles < 1:
        ap.error("--cycles: at least 1")
    if opts.profile_steps < 0:
        ap.error("--profile-steps: 0 or more")
    names = opts.configs.split(",") if opts.configs else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}: choose from {list(CONFIGS)}")
    if BASELINE not in names:
        ap.error(f"--configs must include the baseline {BASELINE!r}")
    configs = [(CONFIGS[n], CONFIGS[n].args(opts.device)) for n in names]
    skipped = [c.name for c, a in configs if a is None]
    configs = [(c, a) for c, a in configs if a is not None]
    workloads = [Workload.parse(n) for n in (opts.workloads or WORKLOADS[opts.device]).split(",")]
    short = [w.name for w in workloads if opts.profile_steps and w.new < opts.profile_steps + 2]
    if short:
        ap.error(f"--profile-steps {opts.profile_steps}: workloads {short} decode too few tokens "
                 "(at least 2 more than the profiled steps: the trace is written mid-round)")  # fmt: skip
    out = opts.out or Path(tempfile.mkdtemp(prefix="bench-server-throughput-"))
    out.mkdir(parents=True, exist_ok=True)

    model_name = opts.model or ("qwen3-0.6b" if opts.device == "cuda" else "tiny")
    overrides = dict(MODELS[model_name])
    longest = context_length(workloads)
    positions = overrides.get("max_position_embeddings", COMMON["max_position_embeddings"])
    if longest > positions:
        overrides["max_position_embeddings"] = longest
    model = build_tiny_model("qwen3", overrides=overrides)  # the model cache, not --out (GBs)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    device_name = torch.cuda.get_device_name() if opts.device == "cuda" else "cpu"
    not_here = f" (not on {opts.device}: {skipped})" if skipped else ""
    logprobs = not opts.no_logprobs
    print(
        f"server throughput: {device_name}, model {model_name} (random weights), {opts.rounds} rounds, "
        f"{opts.cycles} cycle(s), "
        f"{'with' if logprobs else 'without'} logprobs; configs {[c.name for c, _ in configs]}{not_here}",
        flush=True,
    )
    results = [
        bench_config(
            c, a, opts.device, model, vocab, workloads, opts.rounds, logprobs, out, opts.profile_steps, cycle
        )
        for cycle in range(opts.cycles)
        for c, a in configs
    ]
    summary = summarize(results, workloads)
    print_table(summary, workloads, opts.cycles)
    meta = dict(device=device_name, model=model_name, rounds=opts.rounds, cycles=opts.cycles)
    meta["logprobs"] = logprobs
    meta["workloads"] = [asdict(w) for w in workloads]
    (out / "results.json").write_text(json.dumps(dict(meta, results=results, summary=summary), indent=1))
    print(f"results: {out / 'results.json'}")
    return 0 if all("error" not in r for r in results if r["config"] in (BASELINE, "plugin")) else 1


if __name__ == "__main__":
    sys.exit(main())
