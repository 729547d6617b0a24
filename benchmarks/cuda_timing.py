"""CUDA timers shared by the GPU benchmarks (imported as a sibling module: the scripts run as
``python benchmarks/<name>.py``, which puts this folder on ``sys.path``)."""

from __future__ import annotations

import time

import torch

WARMUP = 3
GRAPH_CALLS, GRAPH_REPLAYS, HOST_ITERS = 20, 20, 200  # the sampler benchmarks' defaults


def host_us(fn, iters: int) -> float:
    """Host microseconds per call of ``fn``: the Python and launch cost alone, the clock stopped before
    the device is waited for (what a step outside CUDA graphs adds when the GPU waits on the host)."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / iters


def graph_us(fn, calls: int, replays: int) -> float:
    """Device microseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, replayed
    ``replays`` times back to back, timed by CUDA events: kernels only, no launch cost (``fn`` must be
    capturable: no host sync, no host read of a device value)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (calls * replays)


def device_and_host_us(fns) -> tuple[list[float], list[float]]:
    """Per function of ``fns``: its device microseconds per call (:func:`graph_us`, ``GRAPH_CALLS``
    calls replayed ``GRAPH_REPLAYS`` times) and its host microseconds per call (:func:`host_us`,
    ``HOST_ITERS`` calls): the two columns of the sampler-path benchmarks."""
    return [graph_us(fn, GRAPH_CALLS, GRAPH_REPLAYS) for fn in fns], [host_us(fn, HOST_ITERS) for fn in fns]
