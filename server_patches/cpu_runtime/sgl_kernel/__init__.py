"""Import-only stand-in for the CPU build of ``sgl_kernel`` (CPU runtime of SGLang 0.5.15 only).

SGLang's CPU engine imports names from the CPU build of ``sgl_kernel`` at import time. That build
is not on PyPI and needs AVX-512/AMX; our CPU machines are AVX2, so SGLang never calls its AMX
kernels and takes its ``forward_native`` paths instead. This module lets those imports resolve.

Every attribute is a function that raises ``NotImplementedError`` naming itself when called, except
``assign_req_to_token_pool_cpu``, the one op the CPU engine really calls, implemented below.

This directory is never on the import path of a normal install: ``truepolicy server`` puts it on
the PYTHONPATH of the SGLang processes only when the device is CPU and the real ``sgl_kernel``
cannot be imported (``server_patches.launcher``). It must never reach a GPU install.
"""

import torch

__version__ = "0.0.0+truepolicy.cpu-stand-in"
TRUEPOLICY_STAND_IN = True


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's new KV-cache slots into its row of the request-to-token table.

    For request i, ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]]`` receives the
    next ``end_offset[i] - start_offset[i]`` entries of ``out_cache_loc`` (requests are laid out
    consecutively and in order there). ``pool_len`` is the row length of ``req_to_token``.
    """
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    taken = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        if not 0 <= start <= end <= pool_len:
            raise ValueError(f"assign_req_to_token_pool_cpu: slice [{start}, {end}) of a {pool_len} row")
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[taken : taken + n].to(req_to_token.dtype)
        taken += n


def _unavailable(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: truepolicy's CPU stand-in for sgl_kernel only "
            "implements assign_req_to_token_pool_cpu (the real CPU build needs AVX-512/AMX)"
        )

    op.__name__ = name
    op.__qualname__ = name
    return op


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(name)
