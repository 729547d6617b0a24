"""Small helpers shared by tests (no fixtures here)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by full forward passes (no KV cache): the trainer's view."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :]


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as the integer dtype of its element size (compares NaNs and signed zeros exactly)."""
    t = t.detach().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def count_differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((bit_view(a) != bit_view(b.to(a.device))).sum())


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit-for-bit equality (shape first); on failure max |Δ| and the count of differing elements."""
    assert got.shape == want.shape, (what, tuple(got.shape), tuple(want.shape))
    want = want.to(got.device)
    if not torch.equal(bit_view(got), bit_view(want)):
        diff = (got.double() - want.double()).abs()
        raise AssertionError(
            f"{what}: not bitwise: max |Δ| = {diff.max().item():.3e}, "
            f"{count_differing(got, want)} of {got.numel()} differ"
        )


def nan_empty(*args, **kwargs) -> torch.Tensor:
    """``torch.empty`` with floating-point outputs poisoned to NaN: swapped in for a kernel module's
    ``_empty`` to show that every output element is written."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(math.nan) if t.is_floating_point() else t


def describe_mismatch(got: torch.Tensor, want: torch.Tensor) -> str:
    diff = (got.double() - want.double()).abs()
    return f"max |Δ| = {diff.max().item():.3e}, differing elements: {int((diff > 0).sum())} of {diff.numel()}"


# ---------------------------------------------------------------------------------------------------
# GPU attention tests (tests/test_paged_attention_mma_gpu.py): a tiny Qwen3 and its decode loop
# ---------------------------------------------------------------------------------------------------


def qwen3_on_device(layers: int, hidden: int, heads: int, kv_heads: int, device: str = "cuda"):
    """A random-weight Qwen3 (head dim 128, bf16, vocab 32000) in eval mode on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "qwen3", hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128, vocab_size=32000,
        max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).to(device).eval()


def decode_loop_vs_full_logprobs(model, ids: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token logprobs of ``ids`` [1, N]: (prefill ``prompt`` tokens, then one-token steps over the KV
    cache) and (one full forward)."""
    with torch.no_grad():
        full = model(input_ids=ids).logits[0].float().log_softmax(-1)
        out = model(input_ids=ids[:, :prompt], use_cache=True)
        rows, cache = [out.logits[0]], out.past_key_values
        for t in range(prompt, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            rows.append(out.logits[0])
        inc = torch.cat(rows).float().log_softmax(-1)
    tok = ids[0, 1:]
    return inc[:-1].gather(-1, tok[:, None])[:, 0], full[:-1].gather(-1, tok[:, None])[:, 0]


def exact_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T (+ b)`` in float64, then one rounding to x's dtype: the exact answer for inputs whose
    products and sums are exact in float64 and in a kernel's fp32 (small integers)."""
    y = x.double() @ w.double().T
    if b is not None:
        y = y + b.double()
    return y.to(x.dtype)


def cubin_resource_usage(cubin: bytes) -> str | None:
    """``cuobjdump -res-usage`` of a compiled kernel (e.g. ``"... STACK:0 ..."``: no register spills),
    with the cuobjdump Triton ships; None where that binary is absent."""
    import tempfile

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout


def run_under_triton_interpreter(script: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``script`` (a test file's ``__main__``) in a child Python with ``TRITON_INTERPRET=1``.

    Triton reads the variable when a kernel is decorated, i.e. when its module is first imported, so
    the interpreted kernels need a fresh process. Fails the calling test with the child's output
    unless it exits 0; returns the finished process."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc


def poisoned_empty(*args, **kwargs) -> torch.Tensor:
    """``torch.empty`` with every output poisoned: NaN floats, -1 integers (ids, indices)."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(math.nan if t.is_floating_point() else -1)


def interpreter_checks(op_module, check, empty=nan_empty) -> None:
    """The child side of :func:`run_under_triton_interpreter` for a kernel module with an ``_empty``
    allocator: poison its outputs with ``empty`` (every element must be written), run ``check("cpu")``
    under the interpreter and print the line the parent test looks for."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    op_module._empty = empty
    check("cpu")
    print("interpreter checks passed")


def interpreter_results(script: str | Path, timeout: float = 600) -> dict:
    """Run ``script`` under the interpreter (:func:`run_under_triton_interpreter`); its ``__main__``
    prints one JSON object as its last line of output, returned here."""
    proc = run_under_triton_interpreter(script, timeout)
    return json.loads(proc.stdout.strip().splitlines()[-1])
