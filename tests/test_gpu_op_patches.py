"""The GPU patches of SGLang's elementwise ops (``server_patches.gpu_patches``): RoPE and SiLU-and-mul.

On CUDA SGLang runs sgl_kernel's fused kernels, which compute in fp32 and round once; HF rounds after
every bf16 op. The patched ops compute HF's formulas: checked here against HF's own modules on the
CPU (CI) and on the GPU (marked), each with a negative control (the fp32-once formula the fused
kernels compute differs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server_patches import gpu_patches
from tests.helpers import describe_mismatch

BF16 = torch.bfloat16
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got, want), describe_mismatch(got, want)


@pytest.fixture
def sglang_layers(request):
    """SGLang's layer modules importable in this process (the CPU runtime's stand-ins on the CPU)."""
    if not torch.cuda.is_available():
        request.getfixturevalue("sglang_in_process")


def _rope_module(head_dim: int, base: float, max_pos: int):
    """A bare ``RotaryEmbedding`` with the attributes the patch reads (its __init__ needs server args)."""
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding

    rope = RotaryEmbedding.__new__(RotaryEmbedding)
    torch.nn.Module.__init__(rope)
    rope.head_size = rope.rotary_dim = head_dim
    rope.base, rope.max_position_embeddings, rope.is_neox_style = base, max_pos, True
    return rope


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim,base,max_pos", [(64, 10000.0, 4096), (128, 1e6, 40960)])
def test_rope_patch_equals_hf(sglang_layers, device, head_dim, base, max_pos):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(head_dim)
    config = Qwen3Config(
        head_dim=head_dim, max_position_embeddings=max_pos,
        rope_parameters={"rope_type": "default", "rope_theta": base},
    )  # fmt: skip
    hf = Qwen3RotaryEmbedding(config).to(device)  # inv_freq computed on the CPU, as from_pretrained does
    n, hq, hkv = 301, 4, 2
    positions = torch.randperm(max_pos, generator=gen)[:n].to(device)
    q = (3 * torch.randn(n, hq * head_dim, generator=gen)).to(BF16).to(device)
    k = (3 * torch.randn(n, hkv * head_dim, generator=gen)).to(BF16).to(device)
    got_q, got_k = gpu_patches.rope_hf(_rope_module(head_dim, base, max_pos), positions, q, k)
    cos, sin = hf(q[None], positions[None])
    want_q, want_k = apply_rotary_pos_emb(
        q.view(1, n, hq, head_dim).transpose(1, 2), k.view(1, n, hkv, head_dim).transpose(1, 2), cos, sin
    )
    want_q, want_k = want_q.transpose(1, 2).reshape(n, -1), want_k.transpose(1, 2).reshape(n, -1)
    assert_bitwise(got_q, want_q)
    assert_bitwise(got_k, want_k)
    # negative control: the rotation in fp32 rounded once (what sgl_kernel computes) is not HF's
    x = q.view(n, hq, head_dim).float()
    c, s = cos[0, :, None, :].float(), sin[0, :, None, :].float()
    fused = (x * c + torch.cat((-x[..., head_dim // 2 :], x[..., : head_dim // 2]), -1) * s).to(BF16)
    assert not torch.equal(fused.reshape(n, -1), want_q)


def test_rope_table_covers_the_positions_sglang_reserved(sglang_layers):
    """SGLang reserves its cos/sin cache past ``max_position_embeddings`` for a longer context at load:
    the patch's table covers the same positions (the kernel does not bound-check them on the device)."""
    rope = _rope_module(64, 10000.0, 4096)
    rope.cos_sin_cache = torch.zeros(5120, 64)
    cos, sin = gpu_patches._rope_table(rope, torch.device("cpu"), BF16)
    assert cos.shape == sin.shape == (5120, 32)
    assert gpu_patches._rope_table(rope, torch.device("cpu"), BF16)[0] is cos  # built once
    assert (
        gpu_patches._rope_table(_rope_module(64, 10000.0, 4096), torch.device("cpu"), BF16)[0].shape[0]
        == 4096
    )


def test_decode_grid_spans_the_whole_context_under_cuda_graph_capture():
    """The decode hook's bound on chunks per request: at capture the seq lens are placeholders and a
    replay serves any length up to the pool's width (``req_to_token``), so the grid covers the width;
    otherwise the batch's longest request (or None: the launcher finds it). Launches with spare chunks
    give the same bits (the kernels' launch-option tests)."""
    bound = gpu_patches.decode_max_chunks
    assert bound(4096, torch.tensor([1, 1]), 64, capturing=True) == 64
    assert bound(4097, None, 64, capturing=True) == 65
    assert bound(4096, torch.tensor([100, 7]), 64, capturing=False) == 2
    assert bound(4096, torch.tensor([], dtype=torch.int64), 64, capturing=False) is None
    assert bound(4096, None, 64, capturing=False) is None


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_patch_equals_hf(sglang_layers, device):
    from sglang.srt.layers.activation import SiluAndMul

    gen = torch.Generator().manual_seed(7)
    gate_up = (4 * torch.randn(257, 2 * 1376, generator=gen)).to(BF16).to(device)
    gate, up = gate_up.split(1376, -1)
    op = SiluAndMul.__new__(SiluAndMul)
    torch.nn.Module.__init__(op)
    want = F.silu(gate) * up  # HF: act_fn(gate_proj(x)) * up_proj(x)
    assert_bitwise(gpu_patches.silu_and_mul_hf(op, gate_up), want)
    # negative control: silu(gate) * up in fp32 rounded once (sgl_kernel's silu_and_mul)
    assert not torch.equal((F.silu(gate.float()) * up.float()).to(BF16), want)


def _rms_norm_module(head_dim: int, eps: float, weight: torch.Tensor):
    from sglang.srt.layers.layernorm import RMSNorm

    norm = RMSNorm(head_dim, eps=eps)
    norm.weight.data = weight
    return norm


@pytest.mark.parametrize("device", DEVICES)
def test_qk_norm_patch_equals_the_trainers_norms(sglang_layers, device):
    """The one-kernel q/k norm (``qk_norm_cuda``) against the trainer side: HF's Qwen3 attention applies
    ``q_norm`` / ``k_norm`` to ``[tokens, heads, head_dim]`` views, its RMSNorms computing the GPU
    contract's norm (``parity.ops.rms_norm_pairwise.rms_norm``: the kernel on CUDA) -- bitwise. The
    negative control (SGLang's fused formula) is tests/test_qk_norm.py's."""
    from parity.ops.rms_norm_pairwise import rms_norm

    gen = torch.Generator().manual_seed(11)
    tokens, hq, hk, d, eps = 67, 16, 8, 128, 1e-6
    qkv = (5 * torch.randn(tokens, (hq + 2 * hk) * d, generator=gen)).to(BF16).to(device)
    q, k, _v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    qw, kw = ((1 + 0.3 * torch.randn(2, d, generator=gen)).to(BF16).to(device)).unbind(0)
    got_q, got_k = gpu_patches.qk_norm_one_kernel(
        q=q, k=k, q_norm=_rms_norm_module(d, eps, qw), k_norm=_rms_norm_module(d, eps, kw), head_dim=d,
        alt_stream=None,
    )  # fmt: skip
    assert_bitwise(got_q, rms_norm(q.reshape(tokens, hq, d), qw, eps).reshape(tokens, -1))
    assert_bitwise(got_k, rms_norm(k.reshape(tokens, hk, d), kw, eps).reshape(tokens, -1))
    # (..., heads * head_dim) with more leading dims: the same rows, the input's shape back
    got_q3, got_k3 = gpu_patches.qk_norm_one_kernel(
        q.reshape(1, tokens, -1), k.reshape(1, tokens, -1), _rms_norm_module(d, eps, qw),
        _rms_norm_module(d, eps, kw), d,
    )  # fmt: skip
    assert_bitwise(got_q3, got_q.reshape(1, tokens, -1))
    assert_bitwise(got_k3, got_k.reshape(1, tokens, -1))


def test_qk_norm_patch_refuses_what_it_does_not_compute(sglang_layers):
    from sglang.srt.layers.layernorm import GemmaRMSNorm

    q, k = torch.zeros(3, 4 * 64, dtype=BF16), torch.zeros(3, 2 * 64, dtype=BF16)
    w = torch.ones(64, dtype=BF16)
    norms = dict(q_norm=_rms_norm_module(64, 1e-6, w), k_norm=_rms_norm_module(64, 1e-5, w))
    with pytest.raises(NotImplementedError, match="qk_norm_cuda.*epsilons"):
        gpu_patches.qk_norm_one_kernel(q, k, head_dim=64, **norms)
    with pytest.raises(NotImplementedError, match="qk_norm_cuda.*bf16 only"):
        gpu_patches.qk_norm_one_kernel(q.float(), k.float(), norms["q_norm"], norms["q_norm"], 64)
    gemma = GemmaRMSNorm(64, eps=1e-6)
    with pytest.raises(NotImplementedError, match="qk_norm_cuda.*GemmaRMSNorm"):
        gpu_patches.qk_norm_one_kernel(q, k, gemma, _rms_norm_module(64, 1e-6, w), 64)
