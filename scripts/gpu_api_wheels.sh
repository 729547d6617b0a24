#!/usr/bin/env bash
# Installs the carried .whl (grpcio 1.85.1, protobuf, pydantic: what the sidecar's API needs beyond the
# device image) into /tmp/site_api, for a following call on the same warm machine (gpu_api_bench.sh):
# .gpusgl and .whl together exceed one call's 64 MiB.
#   run(command="bash scripts/gpu_api_wheels.sh", carry=[".whl"])
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_api .whl/*.whl
ls /tmp/site_api
