"""The CUDA device's properties that launchers size their grids by, read once per device (launchers
consult them on every call: decode attention runs them per layer and step)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def device_properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of a CUDA ``device``, cached (an index-less device is the
    current one)."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``."""
    return device_properties(device).multi_processor_count
