#!/usr/bin/env bash
# Issues 11 and 12 on 2 GPUs, in one device call (about 4-5 minutes; ~10 if every timeout is hit):
#   run(kind="nvidia-h100-x2", command="bash scripts/gpu_tp2_run.sh", carry=[".whl"], timeout_s=600)
# 0. tests/test_tp_kernel_gpu.py's symmetric-memory tests (issue 11; ~1 min): the one-shot kernel bitwise.
# 1. benchmarks/bench_fused_allreduce_rmsnorm.py (issue 11): the fused all-reduce + RMSNorm kernel at
#    TP=2 bitwise against the unfused path / the contract, the negative control, latency fused vs unfused
#    (~60-90 s). It prints a line as each phase / case starts, and a per-case watchdog prints every
#    thread's stack and exits 4 if one hangs. If it does not finish cleanly (rc 3, 4 or 124), two short
#    triage runs follow (--size smoke): --fused symmetric-torch (symmetric-memory transport, no Triton)
#    and --fused gather (the Triton kernel, NCCL all-gather transport): which one passes says whether
#    the kernel or the transport hangs.
# 2. benchmarks/bench_weight_sync_nccl.py (issue 12): trainer (GPU 0, our client) -> sidecar (GPU 1, its
#    receive path, no SGLang) throughput for 256 MiB / 1 GiB / 4 GiB buckets x {bf16, FP8}, against a
#    plain torch.distributed.broadcast of the same bytes.
# Logs and JSON land in $OUT (fetched by the device tool). NVLink multicast stays off throughout.
# Optional: FUSED_ARGS / SYNC_ARGS add options to either benchmark (e.g. SYNC_ARGS="--pushes 10").
# Installs nothing into the image. The image has no pydantic (weight_sync's wire types need it), and its
# grpcio / protobuf may be older than the generated stubs need: if weight_sync does not import, the wheels
# carried in .whl/ (pydantic 2.14.4 and its needs, grpcio 1.85.1, protobuf 7.36.2) go to /tmp/tp2-site,
# for step 2 only.
OUT=${OUT:-/tmp/tp2-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
T0=$SECONDS
{
  nvidia-smi --query-gpu=index,name,driver_version,memory.used,memory.total --format=csv,noheader
  nvidia-smi topo -m
  python3 -c "import torch, triton; print('python', __import__('sys').version.split()[0], 'torch', \
torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version(), 'gpus', \
torch.cuda.device_count())"
  df -h /dev/shm | tail -1
  free -g | head -2
} 2>&1 | tee "$OUT/env.log"

echo "== 0. the one-shot kernel's 2-GPU tests (issue 11): row counts 1..2048, grids changing between calls"
timeout -k 10 240 python3 -m pytest -q -x -m gpu tests/test_tp_kernel_gpu.py -k "symmetric or negative" 2>&1 \
  | tail -15 | tee "$OUT/tp_kernel_tests.log"
echo "tests rc=${PIPESTATUS[0]} ($((SECONDS - T0)) s so far)"

echo "== 1. fused all-reduce + RMSNorm, TP=2 (issue 11)"
# shellcheck disable=SC2086  # FUSED_ARGS / SYNC_ARGS: extra options, word-split on purpose
timeout -k 10 200 python3 benchmarks/bench_fused_allreduce_rmsnorm.py --json "$OUT/fused.json" $FUSED_ARGS 2>&1 \
  | tee "$OUT/fused.log"
rc1=${PIPESTATUS[0]}
echo "bench 1 rc=$rc1 ($((SECONDS - T0)) s so far)"
if [ "$rc1" = 3 ] || [ "$rc1" = 4 ] || [ "$rc1" = 124 ] || [ "$rc1" = 137 ]; then
  for mode in symmetric-torch gather; do
    echo "== 1b. triage: --size smoke --fused $mode"
    timeout -k 10 90 python3 benchmarks/bench_fused_allreduce_rmsnorm.py --size smoke --fused "$mode" \
      --iters 10 --case-timeout 30 --json "$OUT/fused_triage_$mode.json" 2>&1 | tee "$OUT/fused_triage_$mode.log" \
      | grep -E "^\[|WATCHDOG|FAILED|bitwise:|done in|Error|error" | tail -40
    echo "triage $mode rc=${PIPESTATUS[0]} ($((SECONDS - T0)) s so far)"
  done
fi

echo "== 2. weight sync trainer -> sidecar over NCCL (issue 12)"
WS_IMPORTS="import weight_sync.client, weight_sync.sidecar.updater, weight_sync.sidecar.pipeline, weight_sync.fp8"
if ! python3 -c "$WS_IMPORTS" 2>"$OUT/imports.log"; then
  tail -3 "$OUT/imports.log"
  if ls .whl/pydantic-2.14.4-*.whl >/dev/null 2>&1; then
    echo "weight_sync does not import with the image's packages: carried wheels -> /tmp/tp2-site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tp2-site \
      .whl/pydantic-2.14.4-*.whl .whl/pydantic_core-2.50.5-*.whl .whl/annotated_types-0.8.0-*.whl \
      .whl/typing_inspection-0.4.5-*.whl .whl/typing_extensions-4.16.0-*.whl .whl/grpcio-1.85.1-*.whl \
      .whl/protobuf-7.36.2-*.whl 2>&1 | tail -3
    export PYTHONPATH=/tmp/tp2-site:$PYTHONPATH
    python3 -c "$WS_IMPORTS" 2>>"$OUT/imports.log" || tail -5 "$OUT/imports.log"
  else
    echo "no .whl/ carried: step 2 will fail to import (run with carry=[\".whl\"])"
  fi
fi
# shellcheck disable=SC2086
timeout -k 10 230 python3 benchmarks/bench_weight_sync_nccl.py --json "$OUT/weight_sync.json" $SYNC_ARGS 2>&1 \
  | tee "$OUT/weight_sync.log"
rc2=${PIPESTATUS[0]}
echo "bench 2 rc=$rc2"
echo "== done in $((SECONDS - T0)) s: fused rc=$rc1 (0 ok, 1 bitwise failure, 2 symmetric-memory op failed," \
  "3 a rank died or raised, 4 a watchdog fired: a phase hung, 124 timeout), weight sync rc=$rc2"
[ "$rc1" = 0 ] && [ "$rc2" = 0 ]
