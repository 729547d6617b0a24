"""TP parity against real multi-process gloo groups on CPU (torch.multiprocessing spawn, loopback).

Two ranks run SGLang's own ``GroupCoordinator`` (``get_tp_group().all_reduce``: gloo on a CPU
without AMX, sglang/srt/distributed/parallel_state.py:602) on the row-parallel layers' per-rank bf16
partials, then the residual add and RMSNorm; the trainer's single-process TP=2 emulation
(``parity.tp``) must equal it bit for bit. The same workers run the TP patches on SGLang's real
RMSNorm. Four ranks (plain gloo) show why TP >= 3 needs ``cpu_all_reduce_rank_order``.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parity import contract
from parity.ops.fused_allreduce_rmsnorm import reference_allreduce_add_rms_norm, residual_before_rounding
from parity.tp import rank_order_sum, row_parallel_linear, row_parallel_partials
from tests.helpers import describe_mismatch
from truepolicy.sglang_process import free_port

BF16 = torch.bfloat16
EPS = 1e-6

# (name, tokens, K, H, bias): o_proj and down_proj of the tiny models, a larger layer, a biased one.
CASES = (
    ("o_proj", 37, 128, 128, False),
    ("down_proj", 37, 256, 128, False),
    ("o_proj_1_token", 1, 128, 128, False),
    ("down_proj_wide", 300, 1024, 512, False),
    ("biased", 19, 256, 128, True),
)


def case_inputs(name: str, tokens: int, k: int, h: int, bias: bool) -> dict[str, torch.Tensor]:
    """The same inputs in every process (seeded by the case)."""
    g = torch.Generator().manual_seed(sum(map(ord, name)) * 7919 + tokens)
    out = {
        "x": (torch.randn(tokens, k, generator=g) * 2).to(BF16),
        "w": (torch.randn(h, k, generator=g) * k**-0.5).to(BF16),
        "residual": (torch.randn(tokens, h, generator=g) * 4).to(BF16),
        "norm_w": (1 + 0.3 * torch.randn(h, generator=g)).to(BF16),
    }
    out["bias"] = (torch.randn(h, generator=g) * 0.5).to(BF16) if bias else None
    return out


def spawn(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype)
    assert torch.equal(got, want), f"{what}: {describe_mismatch(got, want)}"


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.double() != b.double()).sum())


# --------------------------------------------------------------------------------------------------
# Two ranks: SGLang's GroupCoordinator over gloo
# --------------------------------------------------------------------------------------------------


def _sglang_rank(rank: int, world: int, port: int, out_dir: str, model_path: str, stand_in: str) -> None:
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    # The CUDA build of torch ships libnccl, so SGLang would build a PyNccl communicator on CPU and
    # fail in pynccl.py (torch.cuda.device("cpu")); a missing library disables it, as on a CPU torch.
    os.environ["SGLANG_NCCL_SO_PATH"] = "/nonexistent/libnccl.so.2"
    if stand_in:
        sys.path.insert(0, stand_in)
    torch.set_num_threads(1)
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.layers.layernorm import RMSNorm
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    from server_patches.table import PATCHES
    from server_patches.tp_patches import TP_PATCHES

    set_global_server_args_for_scheduler(
        ServerArgs(model_path=model_path, device="cpu", skip_tokenizer_init=True)
    )
    ps.init_distributed_environment(
        world_size=world, rank=rank, distributed_init_method=f"tcp://127.0.0.1:{port}", local_rank=rank,
        backend="gloo",
    )  # fmt: skip
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    tp_group = ps.get_tp_group()
    results: dict[str, object] = {}
    for case in CASES:
        name = case[0]
        inp = case_inputs(*case)
        # What SGLang's rank computes: its RowParallelLinear shard, then the group's all-reduce.
        partial = row_parallel_partials(inp["x"], inp["w"], inp["bias"], world)[rank]
        reduced = tp_group.all_reduce(partial.clone())
        raw = partial.clone()
        torch.distributed.all_reduce(raw)  # the same call SGLang makes, without SGLang around it
        normed, summed = contract.add_rms_norm(reduced, inp["residual"], inp["norm_w"], EPS)
        results[name] = {"reduced": reduced, "raw": raw, "normed": normed, "summed": summed}

    # Patch `cpu_all_reduce_rank_order` at two ranks: the same bits as gloo.
    rank_order = next(p for p in TP_PATCHES if p.name == "cpu_all_reduce_rank_order")
    rank_order.apply()
    for case in CASES:
        partial = row_parallel_partials(*[case_inputs(*case)[k] for k in ("x", "w", "bias")], world)[rank]
        results[case[0]]["rank_order_patch"] = tp_group.all_reduce(partial.clone())
    rank_order.revert()

    # Patch `allreduce_rmsnorm_unfused` + the table's `rmsnorm`: SGLang's real RMSNorm asked for its
    # fused all-reduce + residual + norm (the call the communicator makes when fusion is on).
    for patch in PATCHES:
        if patch.name == "rmsnorm":
            patch.apply()
    next(p for p in TP_PATCHES if p.name == "allreduce_rmsnorm_unfused").apply()
    inp = case_inputs(*CASES[0])
    norm = RMSNorm(inp["norm_w"].shape[0], eps=EPS)
    norm.weight.data = inp["norm_w"].clone()
    partial = row_parallel_partials(inp["x"], inp["w"], None, world)[rank]
    fused = {}
    for use_attn in (True, False):
        fused[use_attn] = norm.forward_with_allreduce_fusion(
            partial.clone(), inp["residual"].clone(), use_attn_tp_group=use_attn
        )
    results["fused_path"] = fused
    results["no_residual"] = norm.forward_with_allreduce_fusion(inp["residual"].clone())
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()


@pytest.fixture(scope="module")
def two_ranks(tiny_qwen3, tmp_path_factory):
    """Run the two SGLang gloo ranks once; return each rank's results."""
    from server_patches.launcher import CPU_RUNTIME_DIR, real_sgl_kernel_importable

    out = tmp_path_factory.mktemp("tp2")
    stand_in = "" if real_sgl_kernel_importable() else str(CPU_RUNTIME_DIR)
    spawn(_sglang_rank, 2, str(out), str(tiny_qwen3), stand_in)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_rank_gloo_path_equals_trainer_tp2_emulation(two_ranks, case):
    inp = case_inputs(*case)
    server = two_ranks[0][case[0]]
    # Both ranks hold the same bits, and SGLang's all-reduce is the plain gloo call.
    for key in ("reduced", "normed", "summed"):
        assert_bitwise(two_ranks[1][case[0]][key], server[key], f"rank 1 vs rank 0 {key}")
    assert_bitwise(server["raw"], server["reduced"], "torch.distributed.all_reduce vs SGLang's")
    # The trainer, one process: TP=2 row-parallel emulation, then the contract's residual + norm.
    out = row_parallel_linear(inp["x"], inp["w"], inp["bias"], 2)
    assert_bitwise(out, server["reduced"], "row-parallel output")
    normed, summed = contract.add_rms_norm(out, inp["residual"], inp["norm_w"], EPS)
    assert_bitwise(summed, server["summed"], "residual sum")
    assert_bitwise(normed, server["normed"], "normed")
    # The fused kernel's reference path over the same partials.
    partials = row_parallel_partials(inp["x"], inp["w"], inp["bias"], 2)
    ref_normed, ref_summed = reference_allreduce_add_rms_norm(partials, inp["residual"], inp["norm_w"], EPS)
    assert_bitwise(ref_summed, server["summed"], "kernel reference residual sum")
    assert_bitwise(ref_normed, server["normed"], "kernel reference normed")
    # Patch cpu_all_reduce_rank_order at two ranks: gloo's bits exactly.
    assert_bitwise(server["rank_order_patch"], server["reduced"], "rank-order patch vs gloo")


def test_negative_controls_residual_before_rounding_and_tp1_differ(two_ranks):
    bug_diffs = tp1_diffs = total = 0
    for case in CASES:
        if case[1] < 8:
            continue
        inp = case_inputs(*case)
        server = two_ranks[0][case[0]]
        partials = row_parallel_partials(inp["x"], inp["w"], inp["bias"], 2)
        _, bug_summed = residual_before_rounding(partials, inp["residual"], inp["norm_w"], EPS)
        bug_diffs += differing(bug_summed, server["summed"])
        tp1 = F.linear(inp["x"], inp["w"], inp["bias"])  # a TP=1 trainer: one K pass, one rounding
        tp1_diffs += differing(tp1, server["reduced"])
        total += tp1.numel()
    print(f"residual-before-rounding differs in {bug_diffs}, TP=1 in {tp1_diffs} of {total} elements")
    assert bug_diffs > 0.02 * total
    assert tp1_diffs > 0.02 * total


def test_allreduce_rmsnorm_unfused_equals_the_unfused_path(two_ranks):
    inp = case_inputs(*CASES[0])
    server = two_ranks[0][CASES[0][0]]
    for rank in range(2):
        for use_attn, (normed, summed) in two_ranks[rank]["fused_path"].items():
            assert_bitwise(summed, server["summed"], f"rank {rank} use_attn_tp_group={use_attn} sum")
            assert_bitwise(normed, server["normed"], f"rank {rank} use_attn_tp_group={use_attn} normed")
        # Without a residual the original does not all-reduce: the plain norm of x.
        want = contract.rms_norm(inp["residual"], inp["norm_w"], EPS)
        assert_bitwise(two_ranks[rank]["no_residual"], want, "no-residual call")


# --------------------------------------------------------------------------------------------------
# Four ranks: gloo's ring order depends on the position in the batch; the rank-order patch does not
# --------------------------------------------------------------------------------------------------

ROWS, HIDDEN, PAD_ROWS = 24, 128, 7


def four_rank_partials(world: int) -> list[torch.Tensor]:
    """Per-rank partials with a wide dynamic range (so the order of the bf16 roundings shows)."""
    g = torch.Generator().manual_seed(4)
    scale = torch.exp2(torch.randint(-5, 6, (world, ROWS, HIDDEN), generator=g).float())
    return list((torch.randn(world, ROWS, HIDDEN, generator=g) * scale).to(BF16))


def _plain_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    from server_patches.tp_patches import all_reduce_rank_order

    mine = four_rank_partials(world)[rank]
    filler = torch.full((PAD_ROWS, HIDDEN), float(rank + 1), dtype=BF16)
    coordinator = types.SimpleNamespace(world_size=world, device_group=None)

    def gloo(t):
        torch.distributed.all_reduce(t)
        return t

    def patched(t):
        return all_reduce_rank_order(None, coordinator, t)

    results = {}
    for name, reduce in (("gloo", gloo), ("patched", patched)):
        alone = reduce(mine.clone())
        shifted = reduce(torch.cat([filler, mine]))[PAD_ROWS:]  # the same rows later in the batch
        results[name] = {"alone": alone, "shifted": shifted}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp4")
    spawn(_plain_rank, 4, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(4)]


def test_gloo_four_rank_all_reduce_is_position_dependent(four_ranks):
    gloo = four_ranks[0]["gloo"]
    want = rank_order_sum(four_rank_partials(4))
    moved = differing(gloo["alone"], gloo["shifted"])
    not_rank_order = differing(gloo["alone"], want)
    print(f"gloo, 4 ranks: {moved} of {want.numel()} elements change when the rows move in the batch; "
          f"{not_rank_order} differ from the rank-order fp32 sum")  # fmt: skip
    assert moved > 0 and not_rank_order > 0


def test_rank_order_patch_makes_four_rank_all_reduce_batch_invariant(four_ranks):
    partials = four_rank_partials(4)
    want = rank_order_sum(partials)
    for rank in range(4):
        got = four_ranks[rank]["patched"]
        assert_bitwise(got["alone"], want, f"rank {rank}")
        assert_bitwise(got["shifted"], want, f"rank {rank}, rows moved in the batch")
    # ... which is what the trainer's TP=4 row-parallel emulation sums.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(ROWS, 256, generator=g).to(BF16)
    w = (torch.randn(HIDDEN, 256, generator=g) / 16).to(BF16)
    assert_bitwise(
        row_parallel_linear(x, w, None, 4), rank_order_sum(row_parallel_partials(x, w, None, 4)), "tp4"
    )
