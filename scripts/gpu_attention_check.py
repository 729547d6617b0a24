"""Device check for issue 4 (run by scripts/gpu_attention_check.sh): GPU tests, then the benchmark.

Each stage runs in its own process under a time limit, its full log goes to OUT_DIR, and a summary
(pass/fail counts, the benchmark tables) is printed at the end, so one 10-minute device call returns
everything even if a stage fails or runs long.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

STAGES = [
    # name, command, time limit (s)
    ("env", [sys.executable, "-c", "import torch, triton; "
             "print(torch.cuda.get_device_name(), torch.__version__, 'triton', triton.__version__)"], 30),
    ("matmul tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-s",
                      "tests/test_batch_invariant_matmul_gpu.py"], 120),
    ("attention tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-s",
                         "tests/test_paged_attention_gpu.py"], 240),
    ("benchmark", [sys.executable, "benchmarks/bench_paged_attention.py", "--json", "{out}/bench.json"], 150),
]  # fmt: skip


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rc_all = 0
    tails = []
    for name, cmd, limit in STAGES:
        cmd = [c.replace("{out}", str(out)) for c in cmd]
        log = out / (name.replace(" ", "_") + ".log")
        t0 = time.monotonic()
        print(f"== {name} (limit {limit} s)", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            text = (
                (exc.stdout or b"").decode(errors="replace")
                if isinstance(exc.stdout, bytes)
                else (exc.stdout or "")
            )
            text += f"\nTIMEOUT after {limit} s"
            rc = 124
        log.write_text(text)
        rc_all |= rc != 0
        print(f"   rc={rc} in {time.monotonic() - t0:.0f} s, log {log}", flush=True)
        tails.append((name, rc, text))
    print("\n================ summary ================")
    for name, rc, text in tails:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        keep = 40 if name in ("benchmark",) else 25
        print(f"--- {name}: rc={rc}")
        print("\n".join(lines[-keep:]))
    return int(rc_all)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/attn-out")))
