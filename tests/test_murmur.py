"""The CPU murmur hash equals an independent pure-Python MurmurHash3 and SGLang's Triton kernel."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import torch

from parity.ops.murmur import murmur_hash32_torch


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """Textbook MurmurHash3 x86_32 (the 16-byte input has no tail)."""

    def rotl(x, r):
        return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF

    h = seed
    for (k,) in struct.iter_unpack("<I", data):
        k = rotl((k * 0xCC9E2D51) & 0xFFFFFFFF, 15) * 0x1B873593 & 0xFFFFFFFF
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & 0xFFFFFFFF
    h ^= len(data)
    h ^= h >> 16
    h = h * 0x85EBCA6B & 0xFFFFFFFF
    h ^= h >> 13
    h = h * 0xC2B2AE35 & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_matches_textbook_murmur3():
    gen = torch.Generator().manual_seed(7)
    seeds = torch.cat(
        [torch.tensor([0, 1, (1 << 63) - 1, 42]), torch.randint(0, 1 << 62, (5,), generator=gen)]
    )
    positions = torch.randint(0, 1 << 20, (seeds.numel(),), generator=gen)
    cols = torch.cat([torch.arange(5), torch.randint(0, 1 << 31, (7,), generator=gen)])
    got = murmur_hash32_torch(seeds, positions, cols)
    assert got.dtype == torch.uint32 and got.shape == (seeds.numel(), cols.numel())
    for i, (s, p) in enumerate(zip(seeds.tolist(), positions.tolist(), strict=True)):
        for j, c in enumerate(cols.tolist()):
            data = struct.pack("<IIII", s & 0xFFFFFFFF, s >> 32, p, c)
            assert int(got[i, j]) == murmur3_32(data), (s, p, c)


CHILD = """
import torch
from sglang.srt.layers.utils.hash import murmur_hash32
from parity.ops.murmur import murmur_hash32_torch
g = torch.Generator().manual_seed(3)
seed = torch.randint(0, 1 << 62, (3,), generator=g)
pos = torch.randint(0, 4096, (3,), generator=g)
cols = torch.arange(1031)
print(torch.equal(murmur_hash32(seed, pos, cols), murmur_hash32_torch(seed, pos, cols)))
"""


def test_matches_sglang_triton_kernel_under_the_interpreter(tiny_qwen3):
    from server_patches.launcher import runtime_env

    env = runtime_env("cpu", on_policy=False, base_env=dict(os.environ)) | {"TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
