"""Benchmark (GPU): seeded Gumbel-max sampling with split rows (``parity.ops.seeded_gumbel``) vs SGLang's
compiled ``multinomial_with_seed`` (one program per row), one process.

Per (rows, vocabulary): both on the same fp32 logprobs (``log_softmax`` of random logits, as SGLang's
sampler passes ``log(probs)``), 63-bit seeds and positions. Two times per function, as in
``bench_split_lane_logprobs.py``: the device's, from 20 calls captured in one CUDA graph and replayed
(kernels only), and the host's per call (Python, torch.compile's guards for SGLang's, launches). The
ratio SGLang / ours of each, and whether the ids are equal (the kernel's claim: they always are).
(The H200 figures of 2026-11-30 in docs/parity.md, 1.9-3.6x up to 64 rows, came from back-to-back calls
timed by CUDA events: the host's time as much as the device's.)

    python benchmarks/bench_seeded_gumbel.py [--rows 1,8,64,256] [--vocab 32768,151936,262144]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
from cuda_timing import device_and_host_us

from parity.ops.seeded_gumbel import seeded_gumbel_argmax


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,64,256")
    ap.add_argument("--vocab", default="32768,151936,262144")
    opts = ap.parse_args()
    from sglang.srt.layers.sampler import multinomial_with_seed

    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print(f"{'':>13} {'device us':>24} {'host us':>24}")
    both = f"{'sglang':>7} {'ours':>7} {'ratio':>6}"
    print(f"{'rows':>5} {'vocab':>7} {both}    {both}  ids")
    g = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (int(v) for v in opts.vocab.split(",")):
        for rows in (int(r) for r in opts.rows.split(",")):
            lp = torch.log_softmax(3 * torch.randn(rows, vocab, generator=g, device="cuda"), dim=-1)
            seeds = torch.randint(1 << 32, (1 << 63) - 1, (rows,), generator=g, device="cuda")
            pos = torch.randint(0, 1 << 20, (rows,), generator=g, device="cuda")
            same = torch.equal(seeded_gumbel_argmax(lp, seeds, pos), multinomial_with_seed(lp, seeds, pos))
            theirs = partial(multinomial_with_seed, lp, seeds, pos)
            ours = partial(seeded_gumbel_argmax, lp, seeds, pos)
            dev, host = device_and_host_us((theirs, ours))
            cells = "    ".join(f"{a:>7.1f} {b:>7.1f} {a / b:>6.2f}" for a, b in (dev, host))
            print(f"{rows:>5} {vocab:>7} {cells}  {'equal' if same else 'DIFFER'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
