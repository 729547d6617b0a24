#!/usr/bin/env bash
# Issue 7's overhead figure on the lent GPU: bench_rollout_api.py (scoring through the sidecar's gRPC
# and HTTP API vs SGLang's /generate, one process) against `truepolicy server --device cuda` serving a
# Qwen3 of 4 layers, hidden 1024 (head_dim 64), bf16.
#   run(command="bash scripts/gpu_api_bench.sh", carry=[".gpusgl"])
# The sidecar's gRPC stubs need grpcio/protobuf newer than the image's: a previous call on the same
# warm machine installs .whl into /tmp/site_api (scripts/gpu_api_wheels.sh).
source .gpusgl/install.sh
set -euo pipefail
test -d /tmp/site_api || { echo "no /tmp/site_api: run scripts/gpu_api_wheels.sh first (carry .whl)"; exit 2; }
export PYTHONPATH=/tmp/site_api:$PYTHONPATH
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/truepolicy . 2>&1 | tail -2
export PYTHONPATH=/tmp/truepolicy:$PYTHONPATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
model=$(python3 -c "
from pathlib import Path
from parity.tiny_models import build_tiny_model
print(build_tiny_model('qwen3', cache_dir=Path('/tmp/models'), overrides=dict(hidden_size=1024,
      intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64)))
" | tail -1)
python3 benchmarks/bench_rollout_api.py --device cuda --model-path "$model" --length 512 --calls 32 \
    --items 4 --concurrency 8 --rounds 3 2>&1 | grep -v "Ignore import error" | tee "$OUT/api_bench.txt" | tail -30
