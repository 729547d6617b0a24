#!/usr/bin/env bash
# Issue 4 headline, one device call: install the carried SGLang wheels and truepolicy, then run
# gpu_server_check.py (Qwen3 + Qwen2 on the GPU, plugin on and off, parity-check style).
#   run(command="bash scripts/gpu_server_check.sh [qwen3 qwen2] [--on-only] [--tp2] [--exact] [--cuda-graph]",
#       carry=[".gpusgl"])
#   (--tp2 needs a 2-GPU kind, e.g. kind="nvidia-h100-x2")
# install.sh's own pipelines may exit non-zero on empty output: source it before `set -e`.
source .gpusgl/install.sh
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # multicast off (device notes)
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/truepolicy . 2>&1 | tail -2
export PYTHONPATH=/tmp/truepolicy:$PYTHONPATH
python3 -c "from importlib.metadata import entry_points; print(entry_points(group='sglang.srt.plugins'))"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 scripts/gpu_server_check.py "$OUT" "$@" 2>&1 | grep -v "Ignore import error" | tail -60
