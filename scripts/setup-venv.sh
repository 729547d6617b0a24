#!/usr/bin/env bash
# Create .venv with the pinned runtime (sglang 0.5.15, torch 2.11.0, transformers 5.12.1) and the
# dev tools. Idempotent: re-runs only when requirements/ or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
stamp=.venv/.truepolicy-setup
want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "setting up .venv (sglang 0.5.15, torch 2.11.0, transformers 5.12.1; ~2.5 min, ~5.3 GB)"
"$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" -c requirements/constraints.txt -r requirements/runtime.txt -r requirements/dev.txt
# sglang's own dependency list would pull a different torch and CUDA-only kernels: install it
# without dependencies; requirements/runtime.txt holds what its CPU engine needs.
"${pip[@]}" --no-deps -c requirements/constraints.txt sglang==0.5.15
"${pip[@]}" --no-deps -e .
.venv/bin/python -c "import sglang, torch, transformers; print('sglang', sglang.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
