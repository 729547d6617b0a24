#!/usr/bin/env bash
# Issue 4 on the lent GPU, in one device call (< 10 min):
#   run(command="bash scripts/gpu_attention_check.sh", carry=[".gpusgl"])
# 1. GPU tests of the paged attention and batch-invariant matmul kernels (bitwise), 2. the benchmark
# against SGLang's triton attention kernels and cuBLAS. .gpusgl (../shared/tools/gpu-sglang-wheels.sh)
# is only needed for SGLang's kernels in the benchmark; without it those columns report FAILED.
OUT=${OUT:-/tmp/attn-out}
mkdir -p "$OUT"
if [ -f .gpusgl/install.sh ]; then
  source .gpusgl/install.sh  # before `set -e`: its pipelines may exit non-zero on empty output
fi
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 scripts/gpu_attention_check.py "$OUT" 2>&1 | grep -v "Ignore import error"
