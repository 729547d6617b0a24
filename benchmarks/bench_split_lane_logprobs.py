"""Benchmark (GPU): the contract's logprob with rows spread over many programs
(``parity.ops.split_lane_logprobs``) vs the one-program-per-row forward kernel, one process.

Per (rows, vocabulary): fp32 logits (SGLang's next-token logits), per-row fp32 temperatures (SGLang's
sampler passes them as a tensor), ids; times from CUDA events over back-to-back calls after warm-up,
launches included (the sampler runs outside SGLang's CUDA graphs); the ratio one-program / split and
whether the bits are equal (the claim: always). Where the ratio drops below 1 is where
``split_lane_logprobs.MAX_ROWS`` belongs.

    python benchmarks/bench_split_lane_logprobs.py [--rows 1,8,32,64,128,256,512] [--vocab 32768,151936]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
from cuda_timing import mean_ms

from parity.ops.policy_loss import CONTRACT_FMA, CONTRACT_TILE, _forward
from parity.ops.split_lane_logprobs import split_lane_logprobs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32,64,128,256,512")
    ap.add_argument("--vocab", default="32768,151936")
    opts = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print(f"{'rows':>5} {'vocab':>7} {'one-program us':>15} {'split us':>9} {'ratio':>6}  bits")
    g = torch.Generator(device="cuda").manual_seed(0)
    for vocab in (int(v) for v in opts.vocab.split(",")):
        for n in (int(r) for r in opts.rows.split(",")):
            logits = 4 * torch.randn(n, vocab, generator=g, device="cuda")
            ids = torch.randint(0, vocab, (n,), generator=g, device="cuda")
            temps = torch.tensor([1.0, 0.7], device="cuda")[torch.arange(n, device="cuda") % 2]

            one_program = partial(
                _forward, logits, ids, None, None, None, None, temps, 0, False, CONTRACT_TILE, CONTRACT_FMA
            )
            split = partial(split_lane_logprobs, logits, ids, temps)
            same = torch.equal(one_program()[0].view(torch.int32), split().view(torch.int32))
            a, b = 1e3 * mean_ms(one_program, 50), 1e3 * mean_ms(split, 50)
            print(
                f"{n:>5} {vocab:>7} {a:>15.1f} {b:>9.1f} {a / b:>6.2f}  {'equal' if same else 'DIFFER'}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
