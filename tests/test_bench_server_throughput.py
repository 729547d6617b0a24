"""The end-to-end throughput benchmark (``benchmarks/bench_server_throughput.py``), smoke run on the CPU:
two real SGLang servers (the plugin on, and plain), a rollout-shaped batch with logprobs, the table and
its JSON, and a round under SGLang's profiler (``--profile-steps``: the decode trace written and
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
        "--device", "cpu", "--rounds", "1", "--workloads", "b3_p24_n6", "--profile-steps", "2",
        "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ratio to 'plain'" in proc.stdout
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["logprobs"] is True
    rows = {r["config"]: r for r in result["results"]}
    assert set(rows) == {"plugin", "plain"}  # the GPU-only configs are not started on the CPU
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["b3_p24_n6"]["median"] > 0
        prof = row["b3_p24_n6"]["profile"]
        assert (tmp_path / "profiles" / prof["trace"]).is_file()
        assert prof["steps"] == 2 and prof["category"] == "cpu_op"
        # each decode step runs the model: its matmuls are among the ops traced
        assert any(t["name"] == "aten::mm" and t["calls_per_step"] >= 1 for t in prof["top"]), prof["top"]
    assert "profile of 2 decode steps" in proc.stdout
