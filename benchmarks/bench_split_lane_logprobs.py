"""Benchmark (GPU): the contract's logprob with rows spread over many programs
(``parity.ops.split_lane_logprobs``) vs the one-program-per-row forward kernel, one process.

Per (rows, vocabulary): fp32 logits (SGLang's next-token logits), per-row fp32 temperatures (SGLang's
sampler passes them as a tensor), ids. Two times per path: the device's, from 20 calls captured in one
CUDA graph and replayed (kernels only), and the host's per call (Python and launches, clock stopped
before the device is waited for). In the server the sampler's launches are queued behind the step's
CUDA graph, so the device time is the one a decode step pays while the host keeps ahead; the host time
shows what the path costs when it does not. Also whether the bits are equal (the claim: always). The
largest row count where the device ratio one-program / split stays above 1 is where
``split_lane_logprobs.MAX_ROWS`` belongs.

    python benchmarks/bench_split_lane_logprobs.py [--rows 1,8,32,64,128,256,512,1024] [--vocab 32768,151936]
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch
from cuda_timing import device_and_host_us

from parity.ops.policy_loss import CONTRACT_FMA, CONTRACT_TILE, _forward
from parity.ops.split_lane_logprobs import split_lane_logprobs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32,64,128,256,512,1024")
    ap.add_argument("--vocab", default="32768,151936")
    opts = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print(f"{'':>13} {'device us':>26} {'host us':>16}")
    paths = f"{'one-program':>11} {'split':>7}"
    print(f"{'rows':>5} {'vocab':>7} {paths} {'ratio':>6} {paths}  bits")
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
            (a, b), (ha, hb) = device_and_host_us((one_program, split))
            print(
                f"{n:>5} {vocab:>7} {a:>11.1f} {b:>7.1f} {a / b:>6.2f} {ha:>11.1f} {hb:>7.1f}  "
                f"{'equal' if same else 'DIFFER'}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
