#!/usr/bin/env bash
# Issue 5 on the lent GPU, in one device call:
#   run(command="bash scripts/gpu_fp8_device_run.sh", carry=[".gpusgl"])
# 1. the GPU tests of the FP8 kernel (bitwise vs the reference), 2. the benchmark against a plain
# device-to-device copy, 3. real SGLang 0.5.15 serving our FP8 weights (needs .gpusgl, optional).
OUT=${OUT:-/tmp/fp8-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== 1. GPU tests"
timeout 240 python3 -m pytest -m gpu tests/test_fp8_block_quant.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest.log" | tail -30
echo "== 2. benchmark"
timeout 200 python3 benchmarks/bench_fp8_block_quant.py --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
if [ -f .gpusgl/install.sh ] && [ "${SKIP_SGLANG:-0}" = 0 ]; then
  echo "== 3. SGLang serving our FP8 weights"
  source .gpusgl/install.sh
  timeout 330 python3 scripts/gpu_fp8_sglang_check.py 2>&1 | grep -v "Ignore import error" \
    > "$OUT/sglang.log"
  tail -40 "$OUT/sglang.log"
fi
echo "== benchmark table"
tail -9 "$OUT/bench.log"
