#!/usr/bin/env bash
# The price of exactness end to end, one device call: install the carried SGLang wheels and truepolicy,
# then benchmarks/bench_server_throughput.py on the GPU (plugin vs plain SGLang vs SGLang's
# deterministic mode vs its defaults; Qwen3-0.6B shapes). Results and server logs in $OUT/throughput.
#   run(command="bash scripts/gpu_server_throughput.sh [--rounds 2] [--configs ...]", carry=[".gpusgl"])
# install.sh's own pipelines may exit non-zero on empty output: source it before `set -e`.
source .gpusgl/install.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # multicast off (device notes)
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/truepolicy . 2>&1 | tail -2
export PYTHONPATH=/tmp/truepolicy:$PYTHONPATH
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 benchmarks/bench_server_throughput.py --device cuda --out "$OUT/throughput" "$@" 2>&1 \
    | grep --line-buffered -v "Ignore import error" | tee "$OUT/throughput.txt" | tail -40
# $OUT returns at most 8 files: the traces travel as one archive
if [ -d "$OUT/throughput/profiles" ]; then
    tar -czf "$OUT/throughput/profiles.tar.gz" -C "$OUT/throughput" profiles && rm -rf "$OUT/throughput/profiles"
fi
