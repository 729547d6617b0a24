# syntax=docker/dockerfile:1.7
# The truepolicy image: `truepolicy server`, `truepolicy sidecar` and `truepolicy-pod` (the rollout
# pod's entrypoint and probe, deploy/pod/truepolicy_pod.py), from the same pinned install as the
# README's `make setup`: scripts/setup-venv.sh (requirements/ with requirements/constraints.txt:
# sglang 0.5.15, torch 2.11.0, transformers 5.12.1). From the repository root:
#
#   docker build -t truepolicy:0.1.0-cpu .                                   # deploy/overlays/cpu-demo
#   docker build --build-arg VARIANT=gpu -t REGISTRY/truepolicy:0.1.0-gpu .  # deploy/overlays/gpu
#
# cpu: Python 3.11 (what `make test` and CI use). gpu: the CUDA 13.0 development image (torch 2.11.0's
# PyPI build is CUDA 13.0; Triton and SGLang's TVM-FFI kernels are compiled at the first start, which
# needs nvcc and a C compiler) with Python 3.12, as on the GPU machines the numerics are verified on,
# plus SGLang's CUDA kernels (deploy/image/requirements-gpu.txt). See deploy/README.md.
ARG VARIANT=cpu

FROM python:3.11.11-slim-bookworm AS base-cpu
ENV TRUEPOLICY_PYTHON=python3.11

FROM nvidia/cuda:13.0.2-devel-ubuntu24.04 AS base-gpu
ENV TRUEPOLICY_PYTHON=python3.12
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc g++ \
 && rm -rf /var/lib/apt/lists/*

# checkov:skip=CKV_DOCKER_7: base-${VARIANT} is one of the two stages above, each on a pinned tag
FROM base-${VARIANT}
ARG VARIANT
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/truepolicy
COPY . .
# The README's install, unchanged (pip's cache lives in a build cache mount, not in the image).
RUN --mount=type=cache,target=/root/.cache/pip \
    PYTHON="$TRUEPOLICY_PYTHON" bash scripts/setup-venv.sh \
 && if [ "$VARIANT" = gpu ]; then \
      .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
        -c requirements/constraints.txt -r deploy/image/requirements-gpu.txt; \
    fi \
 && .venv/bin/python -m compileall -q truepolicy server_patches parity weight_sync deploy/pod \
 && chmod 0755 deploy/pod/truepolicy_pod.py \
 && ln -s /opt/truepolicy/deploy/pod/truepolicy_pod.py /usr/local/bin/truepolicy-pod \
 && useradd --uid 10001 --user-group --home-dir /home/truepolicy --create-home --shell /usr/sbin/nologin truepolicy
ENV PATH=/opt/truepolicy/.venv/bin:$PATH \
    HOME=/home/truepolicy \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1
USER 10001:10001
# Kubernetes probes the pod (deploy/base/statefulset.yaml: startup and liveness run
# `truepolicy-pod health`, readiness is the sidecar's /ready); a Docker HEALTHCHECK would only
# duplicate them.
# checkov:skip=CKV_DOCKER_2: the Kubernetes probes in deploy/ are the health checks (see above)
EXPOSE 30100 30101
ENTRYPOINT ["truepolicy-pod"]
CMD ["run"]
