#!/usr/bin/env bash
# One device call after a change to the server's rollout path (RoPE as one kernel, the sampler's
# sync-free logprobs, the q/k norms and SiLU-and-mul as one kernel each, the seeded sampler's split rows,
# the sampled tokens' logprobs over split lanes): the GPU tests of those ops and their benchmarks,
# then the headline with CUDA graphs (Qwen3 and Qwen2, plugin on). The plugin-off controls do not run
# the plugin's code and do not fit in the same call on a cold machine (4 server starts, ~130 s each
# before the JIT caches are warm): they are scripts/gpu_server_check.sh's. Each step has its own time box and writes to $OUT as it goes.
#   run(command="bash scripts/gpu_rollout_check.sh", carry=[".gpusgl"])
# Then the price end to end: scripts/gpu_server_throughput.sh (its own call).
source .gpusgl/install.sh
set -uo pipefail
export PYTHONPATH=$PWD:$PYTHONPATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source scripts/device_step.sh
step op_tests 180 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_rope.py \
    tests/test_logprobs_row_temperature.py tests/test_gpu_op_patches.py tests/test_qk_norm.py \
    tests/test_silu_and_mul.py tests/test_seeded_gumbel.py tests/test_split_lane_logprobs.py
step sampler_benches 80 bash -c 'python3 benchmarks/bench_seeded_gumbel.py; python3 benchmarks/bench_split_lane_logprobs.py'
step headline 310 bash scripts/gpu_server_check.sh qwen3 qwen2 --cuda-graph --on-only
