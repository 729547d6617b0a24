"""Seeded, random-weight tiny models (Qwen3, Qwen2, Llama, Qwen3-MoE) built locally: no hub access, ever.

``build_tiny_model("qwen3")`` writes a bf16 safetensors checkpoint with ``save_pretrained`` into a
cache directory keyed by the architecture, the config and the seed, and returns its path. Building
is atomic (a temporary directory renamed into place), so concurrent builders never see half a model.

The weights are drawn with a larger init range than a real model's (``initializer_range=0.2``) so the
next-token distributions are peaked: greedy decoding then has clear winners instead of near-ties.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

CACHE_ENV = "TRUEPOLICY_MODEL_CACHE"

COMMON = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

ARCHITECTURES = {
    "qwen3": dict(model_type="qwen3", head_dim=32),
    "qwen2": dict(model_type="qwen2"),
    "llama": dict(model_type="llama", head_dim=32),
    # 8 experts, top-2, renormalised top-k weights (norm_topk_prob, as Qwen3-30B-A3B; transformers'
    # default is False); every layer sparse (SGLang's Qwen3-MoE has no dense-MLP layers).
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
    ),
}


def default_cache_dir() -> Path:
    if CACHE_ENV in os.environ:
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "truepolicy" / "models"


def tiny_config(arch: str, overrides: dict | None = None):
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    spec = dict(ARCHITECTURES[arch])
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, **(COMMON | spec | (overrides or {})), dtype="bfloat16")


def build_tiny_model(
    arch: str = "qwen3", *, seed: int = 0, cache_dir: Path | None = None, overrides: dict | None = None
) -> Path:
    """Build (or reuse) the tiny ``arch`` model for ``seed``; return its directory.

    ``overrides``: config fields to change (e.g. a larger hidden size for a GPU check); part of the
    cache key like the rest of the config.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, overrides)
    key = hashlib.sha256(
        json.dumps({"config": config.to_dict(), "seed": seed}, sort_keys=True, default=str).encode()
    ).hexdigest()[:12]
    root = cache_dir or default_cache_dir()
    target = root / f"tiny-{arch}-{key}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not lost to a concurrent builder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_hf_model(path: Path, device: str = "cpu") -> torch.nn.Module:
    """The trainer's view of a checkpoint: HF transformers, bf16, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return model.to(device).eval()
