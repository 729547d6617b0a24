"""The CUDA-event timer of the sampler-path benchmarks (imported as a sibling module: the scripts run as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``)."""

from __future__ import annotations

import torch

WARMUP = 3


def mean_ms(fn, iters: int) -> float:
    """Mean milliseconds per call of ``fn`` over ``iters`` back-to-back calls after ``WARMUP`` calls, from
    two CUDA events around the loop: launches included, as outside a CUDA graph."""
    for _ in range(WARMUP):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters
