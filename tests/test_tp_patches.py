"""``server_patches.tp_patches``: the targets exist with the expected signatures on the installed SGLang,
and the hooks' single-process behaviour. Their multi-rank proofs run in real gloo groups
(tests/test_tp_gloo.py)."""

from __future__ import annotations

import types

import pytest
import torch

from parity import contract
from server_patches import tp_patches
from server_patches.tp_patches import TP_PATCHES, all_reduce_rank_order, allreduce_then_norm


@pytest.mark.parametrize("patch", TP_PATCHES, ids=[p.name for p in TP_PATCHES])
def test_targets_match_the_installed_sglang(sglang_in_process, patch):
    patch.check()
    assert patch.proof.startswith("tests/test_tp_")


class _Norm:
    def __init__(self, weight):
        self.weight, self.variance_epsilon = weight, 1e-6

    def forward(self, x, residual=None, post_residual_addition=None):
        assert post_residual_addition is None
        if residual is None:
            return contract.rms_norm(x, self.weight, self.variance_epsilon)
        return contract.add_rms_norm(x, residual, self.weight, self.variance_epsilon)


class _Group:
    def __init__(self, world_size):
        self.world_size, self.calls = world_size, 0

    def all_reduce(self, x):
        self.calls += 1
        return x * 2  # stands for the peers' contribution


def test_unfused_hook_reduces_only_with_a_residual_and_peers(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    res = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    norm = _Norm((1 + 0.1 * torch.randn(64, generator=g)).to(torch.bfloat16))
    for world, use_attn in ((1, True), (2, True), (2, False)):
        group = _Group(world)
        monkeypatch.setattr(tp_patches, "_fusion_group", lambda use_attn_tp_group, group=group: group)
        normed, summed = allreduce_then_norm(norm, x, res, None, norm.weight, use_attn)
        reduced = x * 2 if world > 1 else x
        want = contract.add_rms_norm(reduced, res, norm.weight, 1e-6)
        assert torch.equal(normed, want[0]) and torch.equal(summed, want[1])
        assert group.calls == (1 if world > 1 else 0)
        assert torch.equal(allreduce_then_norm(norm, x, None, None, norm.weight, use_attn), norm.forward(x))
        assert group.calls == (1 if world > 1 else 0)  # no residual: no all-reduce, as in SGLang


def test_rank_order_hook_leaves_other_tensors_to_sglang():
    seen = []

    def original(self, t):
        seen.append(t)
        return t

    coordinator = types.SimpleNamespace(world_size=2, device_group=None)
    ints = torch.arange(6)
    assert all_reduce_rank_order(original, coordinator, ints) is ints
    single = types.SimpleNamespace(world_size=1, device_group=None)
    floats = torch.ones(3)
    assert all_reduce_rank_order(original, single, floats) is floats
    assert len(seen) == 2
