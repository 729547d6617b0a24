"""The 2-GPU weight-sync benchmark (issue 12), dry run on the CPU: gloo, a tiny Llama, two processes,
the ablation rows included.

It drives the real client (``WeightSyncClient.manifest`` / ``_stream``) and the sidecar's real receive
path (``plan.validate`` -> ``pipeline.receive`` -> FP8 -> hand-off payload): this keeps the GPU run's
script in step with those APIs, so that the one device call it gets does not die on a rename.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_weight_sync_benchmark_dry_run(tmp_path):
    out = tmp_path / "ws.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_weight_sync_nccl.py"),
        "--device", "cpu", "--backend", "gloo", "--size", "tiny",
        "--pushes", "1", "--buckets-mib", "0.0625,1", "--timeout", "60", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "NO SGLang server" in proc.stdout
    result = json.loads(out.read_text())
    rows = {(r["bucket_mib"], r["mode"]): r for r in result["rows"]}
    # --ablate is on by default: the bf16 push without packing / checks / both, and with the old layout
    # (hiprio needs NCCL).
    modes = ("plain", "bf16", "fp8", "nopack", "nocheck", "bare", "oldlay")
    assert set(rows) == {(b, m) for b in (0.0625, 1.0) for m in modes}
    assert rows[(0.0625, "bf16")]["buckets"] > rows[(1.0, "bf16")]["buckets"] > 1
    assert "bf16 push time spent on: the pack copies" in proc.stdout
    assert not result["sidecar"]["nopack_flagged"]
    for (_, mode), r in rows.items():
        assert r["seconds"] > 0 and r["gbps"] > 0
        if mode in ("bf16", "fp8"):
            assert isinstance(r["payload_bytes"], int) and r["payload_bytes"] > 0, r["payload_bytes"]
        if mode != "plain":
            assert r["fill_s"] >= 0 and r["drain_s"] >= 0 and r["landed_s"] > 0, r
    staged = result["sidecar"]["staging_bytes"]
    assert staged["1/fp8"] < staged["1/bf16"]  # FP8 weights take half the bytes
    # tiny Llama: embed + lm_head 2 x 1024 x 256, 2 layers of 590336, final norm 256 (bf16, no padding)
    assert result["trainer"]["params"] == 1_705_216
    assert result["trainer"]["wire_bytes"] == 2 * 1_705_216
