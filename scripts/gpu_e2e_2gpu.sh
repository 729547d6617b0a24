#!/usr/bin/env bash
# Device checks on a 2-GPU machine (issues 11, 12 and the GPU contract's norm), run as steps:
#   run(kind="nvidia-h100-x2", command="bash scripts/gpu_api_wheels.sh", carry=[".whl"])   # first
#   run(command="bash scripts/gpu_e2e_2gpu.sh norm tp2", carry=[".gpusgl"])                  # then, warm
#   run(command="bash scripts/gpu_e2e_2gpu.sh demo tp1", carry=[".gpusgl"])
# Steps (each time-boxed, its whole output in $OUT/STEP.txt, a summary printed):
#   norm  tests/test_rms_norm_pairwise.py + tests/test_tp_kernel_gpu.py on the GPUs (the GPU contract's
#         norm kernel; the fused all-reduce + RMSNorm kernel, symmetric memory over both GPUs)
#   fused issue 11: benchmarks/bench_fused_allreduce_rmsnorm.py, the one-shot kernel bitwise vs the
#         unfused path (NCCL + the norm kernel) and the contract, and the latency table (~15 s)
#   sync  issue 12: benchmarks/bench_weight_sync_nccl.py, trainer (GPU 0, the client) -> sidecar (GPU 1,
#         its receive path, no SGLang) for a synthetic Llama-3-8B vs a plain broadcast (~3 min)
#   tp2   issue 11: `truepolicy server --tp-size 2` on both GPUs, plugin on and off, vs the trainer
#         emulating TP=2 (scripts/gpu_server_check.py --tp2)
#   demo  issue 12: `truepolicy demo --device cuda --server-gpu 1`: the trainer on GPU 0 pushes every
#         GRPO step's weights over NCCL to the sidecar + server on GPU 1; each step's rollouts bitwise
#   tp1   the TP=1 headline again (Qwen3 and Qwen2, plugin on) under the current GPU contract (mma)
#   moe   issue 14: the Qwen3-MoE decode loop == one full forward under the GPU contract
#   exact the TP=1 headline with --gpu-attention exact (Qwen3 and Qwen2, plugin on)
# The sidecar's gRPC stubs need the carried grpcio/protobuf/pydantic: scripts/gpu_api_wheels.sh installs
# them into /tmp/site_api first (.gpusgl and .whl together exceed one call's 64 MiB).
source .gpusgl/install.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1  # multicast off
test -d /tmp/site_api || { echo "no /tmp/site_api: run scripts/gpu_api_wheels.sh first (carry .whl)"; exit 2; }
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/truepolicy . 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/truepolicy:/tmp/site_api:$PYTHONPATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name --format=csv,noheader
source scripts/device_step.sh
for what in "$@"; do
    case $what in
        norm) step norm 150 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_rms_norm_pairwise.py \
                  tests/test_tp_kernel_gpu.py ;;
        fused) step fused 200 python3 benchmarks/bench_fused_allreduce_rmsnorm.py --json "$OUT/fused.json"
               sed -n '/^(b) latency/,$p' "$OUT/fused.txt" ;;
        sync) step sync 330 python3 benchmarks/bench_weight_sync_nccl.py --json "$OUT/weight_sync.json"
              grep -v "^\[" "$OUT/sync.txt" | tail -40 ;;
        tp2) step tp2 330 python3 scripts/gpu_server_check.py "$OUT/tp2" qwen3 --tp2 ;;
        demo) step demo 420 python3 -m truepolicy.cli demo --device cuda --server-gpu 1 --steps 2 \
                  --output "$OUT/demo" ;;
        tp1) step tp1 280 python3 scripts/gpu_server_check.py "$OUT/tp1" qwen3 qwen2 --on-only ;;
        moe) step moe 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_moe_gpu.py -k decode_loop ;;
        exact) step exact 280 python3 scripts/gpu_server_check.py "$OUT/exact" qwen3 qwen2 --on-only --exact ;;
        *) echo "unknown step $what"; exit 2 ;;
    esac
done
