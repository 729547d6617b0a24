#!/usr/bin/env bash
# One device call for the tensor-core paged attention (issue 4) after a change to its kernels: the GPU
# tests (bitwise; eight pytest workers, as compiling the fold's launch variants cold takes most of
# the time), then the benchmark's table by group size and the decode table. Each step has its own
# time box and writes to $OUT as it goes.
#   run(command="bash scripts/gpu_kernels_check.sh", carry=[".gpusgl"])
source .gpusgl/install.sh
set -uo pipefail
export PYTHONPATH=$PWD:$PYTHONPATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source scripts/device_step.sh
step mma_tests 250 python3 -m pytest -q -s -n 8 tests/test_paged_attention_mma_gpu.py -p no:cacheprovider
step mma_groups 200 python3 benchmarks/bench_paged_attention.py --only groups
step mma_decode 90 python3 benchmarks/bench_paged_attention.py --only decode
