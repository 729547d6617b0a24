"""The sgl_kernel stand-in: outside every import path, raising for every op but the one it implements."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from server_patches.launcher import CPU_RUNTIME_DIR


@pytest.fixture(scope="module")
def stand_in():
    spec = importlib.util.spec_from_file_location(
        "sgl_kernel_stand_in", CPU_RUNTIME_DIR / "sgl_kernel" / "__init__.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_not_importable_from_a_normal_install():
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sgl_kernel; print(getattr(sgl_kernel, 'TRUEPOLICY_STAND_IN', False))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # Either no sgl_kernel at all (CPU machines) or a real one (GPU installs): never ours.
    assert probe.returncode != 0 or probe.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["rmsnorm_cpu", "fused_add_rmsnorm_cpu", "silu_and_mul", "anything"])
def test_every_other_name_raises_naming_itself(stand_in, name):
    op = getattr(stand_in, name)
    with pytest.raises(NotImplementedError, match=f"sgl_kernel.{name} is not available"):
        op(torch.zeros(1))


def test_dunder_lookups_stay_attribute_errors(stand_in):
    with pytest.raises(AttributeError):
        stand_in.__path_hooks_probe__  # noqa: B018


def test_assign_req_to_token_pool_cpu_copies_slices_in_order(stand_in):
    gen = torch.Generator().manual_seed(1)
    pool_len = 37
    req_to_token = torch.full((5, pool_len), -1, dtype=torch.int32)
    rows = torch.tensor([3, 0, 4])
    starts = torch.tensor([0, 5, 36])
    ends = torch.tensor([7, 5 + 11, 37])
    total = int((ends - starts).sum())
    out_cache_loc = torch.randint(0, 10_000, (total,), generator=gen, dtype=torch.int64)
    expected = req_to_token.clone()
    taken = 0
    for r, s, e in zip(rows.tolist(), starts.tolist(), ends.tolist(), strict=True):
        for j in range(s, e):
            expected[r, j] = int(out_cache_loc[taken])
            taken += 1
    stand_in.assign_req_to_token_pool_cpu(rows, req_to_token, starts, ends, out_cache_loc, pool_len)
    assert torch.equal(req_to_token, expected)


def test_assign_req_to_token_pool_cpu_rejects_out_of_row_slices(stand_in):
    req_to_token = torch.zeros((1, 4), dtype=torch.int32)
    with pytest.raises(ValueError, match="slice"):
        stand_in.assign_req_to_token_pool_cpu(
            torch.tensor([0]), req_to_token, torch.tensor([2]), torch.tensor([6]),
            torch.arange(4), 4,
        )  # fmt: skip
    assert not req_to_token.any()
