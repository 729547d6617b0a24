"""The end-to-end throughput benchmark (``benchmarks/bench_server_throughput.py``), smoke run on the CPU:
two real SGLang servers (the plugin on, and plain), each started twice in turn (``--cycles 2``), a
rollout-shaped batch with logprobs, the table, the per-cycle ratios and the JSON, and a round under
SGLang's profiler (``--profile-steps``: the decode trace written and
summarised). It keeps the GPU run's script in step with the server launcher and SGLang's API, so that the
one device call it gets does not die on a rename. (The CPU rates say nothing about a GPU: no timing is
asserted.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_server_throughput_benchmark_smoke_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "bench_server_throughput.py"),
        "--device", "cpu", "--rounds", "1", "--cycles", "2", "--workloads", "b3_p24_n6",
        "--profile-steps", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ratio to 'plain'" in proc.stdout
    assert "ratio to 'plain' per cycle" in proc.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["logprobs"] is True and result["cycles"] == 2
    # the GPU-only configs are not started on the CPU; plain and plugin in turn, twice
    assert [(r["config"], r["cycle"]) for r in result["results"]] == [
        ("plugin", 0), ("plain", 0), ("plugin", 1), ("plain", 1)
    ]  # fmt: skip
    for log in ("server-plugin.log", "server-plain.log", "server-plugin-c1.log", "server-plain-c1.log"):
        assert (tmp_path / log).is_file(), log
    cell = result["summary"]["plugin"]["b3_p24_n6"]
    assert len(cell["ratios"]) == 2 and all(q > 0 for q in cell["ratios"])
    assert result["summary"]["plain"]["b3_p24_n6"]["ratios"] == [1.0, 1.0]
    for row in result["results"]:
        name = (row["config"], row["cycle"])
        assert "error" not in row, (name, row)
        assert row["b3_p24_n6"]["median"] > 0
        prof = row["b3_p24_n6"]["profile"]
        assert (tmp_path / "profiles" / prof["trace"]).is_file()
        assert prof["steps"] == 2 and prof["category"] == "cpu_op"
        # each decode step runs the model: its matmuls are among the ops traced
        assert any(t["name"] == "aten::mm" and t["calls_per_step"] >= 1 for t in prof["top"]), prof["top"]
    assert "profile of 2 decode steps" in proc.stdout


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_server_throughput", ROOT / "benchmarks" /
                                                  "bench_server_throughput.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _x(cat: str, name: str, ts: float, dur: float, **args) -> dict:
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, pid=1, tid=1, args=args)


def test_summary_compares_each_start_with_the_plain_start_of_its_cycle():
    """Per config and workload: the median over the starts, and each cycle's ratio to that cycle's
    plain (not to a pooled plain): a failed start leaves a gap, not a shifted pairing."""
    bench = _bench_module()
    w = [bench.Workload(1, 8, 4)]
    results = [
        dict(config="plain", cycle=0, b1_p8_n4=dict(median=400.0)),
        dict(config="plugin", cycle=0, b1_p8_n4=dict(median=360.0)),
        dict(config="plain", cycle=1, b1_p8_n4=dict(median=500.0)),
        dict(config="plugin", cycle=1, error="the server did not start"),
        dict(config="plain", cycle=2, b1_p8_n4=dict(median=480.0)),
        dict(config="plugin", cycle=2, b1_p8_n4=dict(median=456.0)),
    ]
    summary = bench.summarize(results, w)
    plugin = summary["plugin"]["b1_p8_n4"]
    assert plugin["rates"] == [360.0, None, 456.0] and plugin["median"] == 408.0
    assert plugin["ratios"] == [0.9, None, 0.95] and plugin["median_ratio"] == 0.925
    assert summary["plain"]["b1_p8_n4"]["median"] == 480.0
    assert summary["plain"]["b1_p8_n4"]["median_ratio"] == 1.0


def test_gpu_idle_gaps_charges_each_long_gap_to_the_launch_after_it():
    """A synthetic two-step trace of known gaps: short gaps (launch latency) are only summed, overlapping
    kernels of two streams leave no gap, and each long gap is charged to the CPU op and runtime call
    that launched the kernel after it, inside the innermost scheduler annotation."""
    bench = _bench_module()
    events = [
        _x("user_annotation", "scheduler.run_batch", 0, 1000),
        _x("user_annotation", "step[DECODE bs=1]", 10, 500),
        _x("cpu_op", "aten::mm", 20, 10),
        _x("cuda_runtime", "cudaLaunchKernel", 22, 2, correlation=1),
        _x("cpu_op", "aten::item", 40, 200),  # the host waits: the next launch comes late
        _x("cpu_op", "aten::add", 245, 10),
        _x("cuda_runtime", "cudaLaunchKernel", 250, 2, correlation=2),
        _x("cuda_runtime", "cudaGraphLaunch", 600, 5, correlation=3),
        _x("cuda_runtime", "cudaGraphLaunch", 610, 5, correlation=4),
        _x("kernel", "mm", 30, 20, correlation=1),  # busy 30..50
        _x("kernel", "side_stream", 45, 30, correlation=99),  # overlaps: busy until 75
        _x("kernel", "add", 260, 5, correlation=2),  # gap 75..260 = 185, launched by aten::add
        _x("kernel", "graph_a", 268, 10, correlation=3),  # gap 3: launch latency
        _x("kernel", "graph_b", 700, 10, correlation=4),  # gap 422, a graph launch at 610 (no cpu op)
    ]
    idle = bench.gpu_idle_gaps(events, steps=2)
    assert idle["short_gaps_us_per_step"] == 1.5
    assert idle["long_gaps_us_per_step"] == (185 + 422) / 2
    rows = {(r["annotation"], r["launch"]): r for r in idle["top"]}
    assert rows[("step[DECODE bs=1]", "aten::add -> cudaLaunchKernel")]["us_per_step"] == 92.5
    assert rows[("scheduler.run_batch", "cudaGraphLaunch")]["us_per_step"] == 211
    assert [r["us_per_step"] for r in idle["top"]] == [211, 92.5]  # most idle time first
