"""Benchmark (GPU): seeded Gumbel-max sampling with split rows (``parity.ops.seeded_gumbel``) vs SGLang's
compiled ``multinomial_with_seed`` (one program per row), one process.

Per (rows, vocabulary): both on the same fp32 logprobs (``log_softmax`` of random logits, as SGLang's
sampler passes ``log(probs)``), 63-bit seeds and positions; times from CUDA events over back-to-back
calls after warm-up (the sampler runs outside SGLang's CUDA graphs, launches included); the ratio
SGLang / ours, and whether the ids are equal (the kernel's claim: they always are).

    python benchmarks/bench_seeded_gumbel.py [--rows 1,8,64,256] [--vocab 32768,151936,262144] [--iters 50]
"""

from __future__ import annotations

import argparse
import sys

import torch
from cuda_timing import mean_ms

from parity.ops.seeded_gumbel import seeded_gumbel_argmax


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,64,256")
    ap.add_argument("--vocab", default="32768,151936,262144")
    ap.add_argument("--iters", type=int, default=50)
    opts = ap.parse_args()
    from sglang.srt.layers.sampler import multinomial_with_seed

    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print(f"{'rows':>5} {'vocab':>7} {'sglang us':>10} {'ours us':>9} {'sglang/ours':>11}  ids")
    g = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (int(v) for v in opts.vocab.split(",")):
        for rows in (int(r) for r in opts.rows.split(",")):
            lp = torch.log_softmax(3 * torch.randn(rows, vocab, generator=g, device="cuda"), dim=-1)
            seeds = torch.randint(1 << 32, (1 << 63) - 1, (rows,), generator=g, device="cuda")
            pos = torch.randint(0, 1 << 20, (rows,), generator=g, device="cuda")
            same = torch.equal(seeded_gumbel_argmax(lp, seeds, pos), multinomial_with_seed(lp, seeds, pos))
            theirs = mean_ms(lambda: multinomial_with_seed(lp, seeds, pos), opts.iters)  # noqa: B023
            ours = mean_ms(lambda: seeded_gumbel_argmax(lp, seeds, pos), opts.iters)  # noqa: B023
            print(
                f"{rows:>5} {vocab:>7} {1e3 * theirs:>10.1f} {1e3 * ours:>9.1f} {theirs / ours:>11.2f}  "
                f"{'equal' if same else 'DIFFER'}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
