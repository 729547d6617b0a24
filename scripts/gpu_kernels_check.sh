#!/usr/bin/env bash
# One device call for the kernel work that is written and interpreter-proven but not yet measured:
# the tensor-core paged attention (issue 4), the MoE GPU contract (issue 14) and the policy-loss
# launch sweep (issue 8). Each step has its own time box and writes to $OUT as it goes.
#   run(command="bash scripts/gpu_kernels_check.sh", carry=[".gpusgl"])
source .gpusgl/install.sh
set -uo pipefail
export PYTHONPATH=$PWD:$PYTHONPATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source scripts/device_step.sh
step mma_tests 150 python3 -m pytest -q -s tests/test_paged_attention_mma_gpu.py -p no:cacheprovider
step mma_bench 100 python3 benchmarks/bench_paged_attention.py --only decode
step moe_tests 170 python3 -m pytest -q -s tests/test_moe_gpu.py -p no:cacheprovider
step loss_sweep 140 python3 benchmarks/bench_policy_loss.py --sweep --vocab 32768 --out "$OUT/policy_loss"
