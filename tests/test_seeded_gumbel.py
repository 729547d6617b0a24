"""Seeded Gumbel-max sampling with split rows (``parity.ops.seeded_gumbel``): the token ids of SGLang's
``multinomial_with_seed``. The Triton kernel under the Triton interpreter (a child Python, this file's
``__main__``) against the plain-PyTorch formula and against SGLang's own function body (its Triton
hash interpreted too), and on CUDA (GPU-marked) against SGLang's compiled function itself: random
distributions, flat rows (the noise alone decides), rows of one column to a Qwen vocabulary, ties
and NaNs placed in different chunks and within one (the first maximal column, NaN greatest, as
``torch.argmax``), strided rows, 16/32/64-bit logprobs, int32 positions, seeds above 2**32, poisoned
outputs.

Negative controls: the same inputs tell apart a hash of the column within its chunk, a hash without the
position, and the last maximal column instead of the first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from parity.ops.murmur import murmur_hash32_torch
from parity.ops.seeded_gumbel import CHUNK, seeded_gumbel_argmax, seeded_gumbel_argmax_reference
from tests.helpers import run_under_triton_interpreter

# (rows, columns): decode rows of a Qwen vocabulary, a batch across chunk edges, tiny rows, no rows
SHAPES = ((1, 151936), (9, CHUNK + 1), (5, 3 * CHUNK - 7), (4, 1), (3, 5), (0, 17))


def inputs(rows, cols, dtype=torch.float32, device="cpu", seed=0, flat=False):
    """Logprobs (log_softmax of logits of mixed scale; ``flat``: all equal, so that the noise alone
    decides) as rows of a wider buffer, 63-bit seeds (high words in use), positions up to 2**20."""
    g = torch.Generator().manual_seed(seed * 1009 + cols)
    logits = torch.zeros(rows, cols) if flat else 3 * torch.randn(rows, cols, generator=g)
    wide = torch.full((rows, cols + 5), float("nan"))
    wide[:, 2 : cols + 2] = torch.log_softmax(logits, dim=-1)
    seeds = torch.randint(1 << 32, (1 << 63) - 1, (rows,), generator=g)
    positions = torch.randint(0, 1 << 20, (rows,), generator=g)
    return wide.to(dtype).to(device)[:, 2 : cols + 2], seeds.to(device), positions.to(device)


def special_rows(device):
    """Rows whose answer the formula's order decides: +inf ties across chunks and within one, NaNs
    after and before a +inf, an all -inf row, and [expected ids]."""
    cols = 3 * CHUNK
    lp = torch.full((5, cols), -5.0)
    lp[0, [CHUNK + 3, 2 * CHUNK + 1]] = float("inf")  # first maximal column: in the second chunk
    lp[1, [7, 9]] = float("inf")  # within one chunk
    lp[2, [2 * CHUNK + 5, 2 * CHUNK + 6]] = float("nan")  # NaN greatest, the first one wins
    lp[2, 3] = float("inf")
    lp[3, [CHUNK - 1, 2]] = float("nan")
    lp[4] = float("-inf")  # every sum -inf: the first column
    seeds = torch.arange(5, dtype=torch.int64) + (1 << 40)
    return lp.to(device), seeds.to(device), torch.arange(5).to(device), [CHUNK + 3, 7, 2 * CHUNK + 5, 2, 0]


def check_cases(device: str) -> None:
    for rows, cols in SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            lp, seeds, pos = inputs(rows, cols, dtype, device)
            before = lp.clone()
            got = seeded_gumbel_argmax(lp, seeds, pos)
            assert got.shape == (rows, 1) and got.dtype == torch.int64
            assert torch.equal(got, seeded_gumbel_argmax_reference(lp, seeds, pos)), (rows, cols, dtype)
            assert torch.equal(lp, before), "the input was written"
        lp, seeds, pos = inputs(rows, cols, torch.float16, device, flat=True)
        got = seeded_gumbel_argmax(lp, seeds, pos.to(torch.int32))
        assert torch.equal(got, seeded_gumbel_argmax_reference(lp, seeds, pos)), ("flat", rows, cols)
    lp, seeds, pos, want = special_rows(device)
    assert seeded_gumbel_argmax(lp, seeds, pos).flatten().tolist() == want
    assert seeded_gumbel_argmax_reference(lp, seeds, pos).flatten().tolist() == want
    print(f"ok {device}")


def sglang_matches(device: str, rows: int = 8, cols: int = 4 * CHUNK + 3) -> None:
    """SGLang's own ``multinomial_with_seed`` (uncompiled under the interpreter, compiled on CUDA)."""
    from sglang.srt.layers import sampler

    fn = sampler.multinomial_with_seed if device == "cuda" else sampler.multinomial_with_seed.__wrapped__
    for flat in (False, True):
        lp, seeds, pos = inputs(rows, cols, torch.float32, device, seed=3, flat=flat)
        lp = lp.contiguous()
        want = fn(lp, seeds, pos)
        got = seeded_gumbel_argmax(lp, seeds, pos)
        assert torch.equal(got, want), f"flat={flat}: {int((got != want).sum())} of {rows} ids differ"
    print(f"sglang ok {device}")


def _noise_variant(lp, seeds, pos, *, chunk_local=False, last=False, no_position=False):
    """The formula with one thing changed (negative controls): the column hashed within its chunk,
    the position left out, the last maximal column."""
    cols = torch.arange(lp.shape[1])
    h = murmur_hash32_torch(
        seeds, torch.zeros_like(pos) if no_position else pos, cols % CHUNK if chunk_local else cols
    )
    x = h.to(torch.float64) / torch.iinfo(torch.uint32).max
    x = -torch.log(-torch.log(x).clamp(min=torch.finfo(x.dtype).min)) + lp.to(x.dtype)
    if last:
        return x.shape[1] - 1 - torch.argmax(x.flip(1), dim=1, keepdim=True)
    return torch.argmax(x, dim=1, keepdim=True)


def test_negative_controls_are_told_apart():
    lp, seeds, pos = inputs(64, 4096, flat=True, seed=5)
    want = seeded_gumbel_argmax_reference(lp, seeds, pos)
    assert torch.equal(_noise_variant(lp, seeds, pos), want)  # the variant itself is the formula
    for change in ("no_position", "chunk_local"):
        differ = int((_noise_variant(lp, seeds, pos, **{change: True}) != want).sum())
        print(f"{change}: {differ} of 64 flat rows sample another id")
        assert differ > 0, change
    lp, seeds, pos, expected = special_rows("cpu")
    assert _noise_variant(lp, seeds, pos, last=True)[:2].flatten().tolist() != expected[:2]


def test_bad_input_is_refused():
    lp, seeds, pos = inputs(3, 10)
    with pytest.raises(TypeError):
        seeded_gumbel_argmax(lp.to(torch.int32), seeds, pos)
    with pytest.raises(TypeError):
        seeded_gumbel_argmax(lp[0], seeds, pos)  # 1-D
    with pytest.raises(ValueError):
        seeded_gumbel_argmax(lp, seeds[:2], pos)
    with pytest.raises(TypeError):
        seeded_gumbel_argmax(lp, seeds.to(torch.int32), pos)
    with pytest.raises(TypeError):
        seeded_gumbel_argmax(lp, seeds, pos.float())
    with pytest.raises(ValueError):
        seeded_gumbel_argmax(lp[:, :0], seeds, pos)


def test_kernel_under_the_triton_interpreter():
    proc = run_under_triton_interpreter(__file__, timeout=900)
    assert "interpreter checks passed" in proc.stdout, proc.stdout[-4000:]


def test_kernel_compiles_for_sm90_with_the_formulas_float64_operations():
    """Compiled for sm_90 (no GPU needed): the division is IEEE's (``div.rn.f64``), the logs are
    float64 (libdevice's, inlined: no float32 ``lg2.approx``), the noise is never narrowed to float32."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiles with the real Triton JIT")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from parity.ops import seeded_gumbel as op

    types = dict(LOGP="*fp32", slp="i64", SEED="*i64", POS="*i64", PART_V="*fp64", PART_I="*i32",
                 n_cols="i32", n_chunks="i32")  # fmt: skip
    fn = op._chunk_max_kernel
    sig = {n: "constexpr" if n == "CHUNK" else types[n] for n in fn.arg_names}
    ptx = triton.compile(
        ASTSource(fn, sig, constexprs=dict(CHUNK=op.CHUNK)), target=GPUTarget("cuda", 90, 32)
    ).asm["ptx"]
    assert "div.rn.f64" in ptx, ptx[:2000]
    for approx in ("div.approx", "div.full", "lg2.approx", "cvt.rn.f32.f64"):
        assert approx not in ptx, approx


@pytest.mark.gpu
def test_kernel_equals_sglangs_multinomial_with_seed_on_cuda():
    check_cases("cuda")
    sglang_matches("cuda", rows=64, cols=151936)
    sglang_matches("cuda", rows=1, cols=151936)


# ---------------------------------------------------------------------------------------------------
# Child process (TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------


def _child() -> None:
    from parity.ops import seeded_gumbel as op
    from tests.helpers import interpreter_checks, poisoned_empty

    def checks(device: str) -> None:
        check_cases(device)
        sglang_matches(device)

    interpreter_checks(op, checks, empty=poisoned_empty)  # every id and partial must be written


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _child()
