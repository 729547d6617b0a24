"""Which parameters are pushed as block FP8 and which stay bf16: a name-based, configurable policy.

The policy works on *checkpoint* parameter names (the names SGLang's ``load_weights`` accepts, e.g.
``model.layers.3.self_attn.q_proj.weight``, ``model.layers.3.mlp.experts.7.down_proj.weight``),
not on SGLang's fused names (``qkv_proj``, ``gate_up_proj``): SGLang maps the per-projection names
onto its fused parameters itself, shard by shard, for the FP8 weight and for its scale alike.

Default decision (first matching rule wins, keep rules first):

- kept in bf16 (or the source dtype): embeddings (``embed_tokens``, ``wte``...), ``lm_head``,
  every norm (``*norm*.weight``: input/post-attention layernorms, Qwen3's q/k norms, the final
  norm), every bias, MoE router gates (``mlp.gate.weight``, ``shared_expert_gate``, ``router``),
  and anything else not matched below;
- quantized to block FP8: 2-D ``.weight`` parameters of decoder-layer linear projections:
  ``*_proj.weight`` (q/k/v/o, gate/up/down, shared experts, per-expert projections, DeepSeek's
  ``*_proj_with_mqa``) and Mixtral-style experts ``experts.N.w1/w2/w3.weight``.

A quantized ``X.weight`` is pushed as two tensors: ``X.weight`` (``float8_e4m3fn``, same shape) and
``X.weight_scale_inv`` (fp32, ``[ceil(N/128), ceil(K/128)]``), the names SGLang's
``Fp8LinearMethod`` registers when its ``Fp8Config`` has ``weight_block_size=[128, 128]``.

SGLang only loads block FP8 if each shard it fuses (q/k/v into ``qkv_proj``, gate/up into
``gate_up_proj``) has a multiple of 128 output rows, and, with tensor parallelism, if each rank's
slice is whole blocks. :func:`sglang_shape_problems` reports violations before anything is sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from weight_sync.fp8.block_quant import BLOCK, FP8_DTYPE, scale_shape

WEIGHT_SUFFIX = ".weight"
SCALE_SUFFIX = ".weight_scale_inv"

DEFAULT_KEEP: tuple[str, ...] = (
    r"(^|\.)(embed_tokens|embeddings|wte|wpe|word_embeddings|embed_in)\.",
    r"(^|\.)(lm_head|embed_out)\.|^output\.",
    r"(^|\.)[^.]*norm[^.]*\.weight$",  # *layernorm, *_norm, norm, ln_*: all contain "norm"
    r"\.bias$",
    r"(^|\.)(mlp|block_sparse_moe|feed_forward)\.gate\.",  # MoE router (incl. e_score_correction_bias)
    r"(^|\.)shared_expert_gate\.",
    r"(^|\.)router\.",
)
DEFAULT_QUANTIZE: tuple[str, ...] = (
    r"(^|\.)layers\.\d+\.(.+\.)?[a-z0-9_]*_proj(_with_mqa)?\.weight$",
    r"(^|\.)layers\.\d+\.(.+\.)?experts\.\d+\.w[123]\.weight$",
)

# transformers 5 keeps MoE experts as fused 3-D parameters in memory (no ".weight" suffix).
_FUSED_EXPERTS = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)$")
# Shards SGLang fuses into one parameter: each must be whole 128-row blocks for block FP8.
_FUSED_SHARDS = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj|w1|w3)\.weight$")
# Column-parallel (rows split across TP ranks) and row-parallel (columns split) projections.
_COLUMN_PARALLEL = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj|w1|w3)\.weight$")
_ROW_PARALLEL = re.compile(r"\.(o_proj|down_proj|w2)\.weight$")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to push: its name, shape and dtype on the wire, and where it comes from."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str  # the parameter it is made from
    role: str  # "fp8_weight", "fp8_scale" or "passthrough"


@dataclass(frozen=True)
class Decision:
    quantize: bool
    reason: str


@dataclass(frozen=True)
class Fp8BlockPolicy:
    """Name-based FP8 policy. ``keep`` regexes win over ``quantize`` regexes; no match keeps bf16.

    ``extra_keep`` / ``extra_quantize`` add rules to the defaults (e.g. keep the first and last
    decoder layers in bf16: ``extra_keep=(r"layers\\.(0|27)\\.",)``).
    """

    keep: tuple[str, ...] = DEFAULT_KEEP
    quantize: tuple[str, ...] = DEFAULT_QUANTIZE
    extra_keep: tuple[str, ...] = ()
    extra_quantize: tuple[str, ...] = ()
    passthrough_dtype: torch.dtype | None = None  # None: keep each kept tensor's own dtype
    _keep_re: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)
    _quant_re: tuple[re.Pattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_keep_re", tuple(re.compile(p) for p in self.extra_keep + self.keep))
        object.__setattr__(
            self, "_quant_re", tuple(re.compile(p) for p in self.extra_quantize + self.quantize)
        )

    @property
    def weight_block_size(self) -> list[int]:
        return [BLOCK, BLOCK]

    def decide(self, name: str, shape: tuple[int, ...] | torch.Size) -> Decision:
        for pat in self._keep_re:
            if pat.search(name):
                return Decision(False, f"keep rule {pat.pattern!r}")
        if _FUSED_EXPERTS.search(name):
            raise ValueError(
                f"{name!r} (shape {list(shape)}) is a fused in-memory expert tensor: convert it to "
                "per-expert checkpoint names (experts.N.gate_proj.weight, ...) before quantizing"
            )
        for pat in self._quant_re:
            if pat.search(name):
                if len(shape) != 2:
                    raise ValueError(
                        f"{name!r} matches quantize rule {pat.pattern!r} but has shape {list(shape)}: "
                        "block FP8 takes 2-D weights (split fused expert tensors into per-expert "
                        "checkpoint names first)"
                    )
                return Decision(True, f"quantize rule {pat.pattern!r}")
        return Decision(False, "no rule matched (kept)")

    def should_quantize(self, name: str, shape: tuple[int, ...] | torch.Size) -> bool:
        return self.decide(name, shape).quantize

    @staticmethod
    def scale_name(name: str) -> str:
        """``X.weight`` -> ``X.weight_scale_inv`` (the name SGLang's block-FP8 loader expects)."""
        if not name.endswith(WEIGHT_SUFFIX):
            raise ValueError(f"only '*.weight' parameters are quantized, got {name!r}")
        return name[: -len(WEIGHT_SUFFIX)] + SCALE_SUFFIX

    def specs(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> list[TensorSpec]:
        """The tensors pushed for parameter ``name``: the FP8 weight and its scales, or itself."""
        shape = tuple(int(s) for s in shape)
        if self.should_quantize(name, shape):
            return [
                TensorSpec(name, shape, FP8_DTYPE, name, "fp8_weight"),
                TensorSpec(self.scale_name(name), scale_shape(shape), torch.float32, name, "fp8_scale"),
            ]
        return [TensorSpec(name, shape, self.passthrough_dtype or dtype, name, "passthrough")]

    def plan(self, named_shapes: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> list[TensorSpec]:
        out: list[TensorSpec] = []
        for name, shape, dtype in named_shapes:
            out.extend(self.specs(name, shape, dtype))
        return out

    def quantization_config(self, param_names: Iterable[str] = ()) -> dict:
        """The ``quantization_config`` of a config.json that makes SGLang build block-FP8 layers.

        Linear projections that the default rules would quantize but this policy keeps are listed
        as ``ignored_layers`` (module names), so SGLang builds them unquantized.
        """
        default = Fp8BlockPolicy()
        ignored = []
        for name in param_names:
            if not name.endswith(WEIGHT_SUFFIX):
                continue
            if default.should_quantize(name, (1, 1)) and not self.should_quantize(name, (1, 1)):
                ignored.append(name[: -len(WEIGHT_SUFFIX)])
        cfg = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_block_size": self.weight_block_size,
        }
        if ignored:
            cfg["ignored_layers"] = ignored
        return cfg


DEFAULT_POLICY = Fp8BlockPolicy()


def sglang_shape_problems(
    named_shapes: Iterable[tuple[str, tuple[int, ...]]],
    policy: Fp8BlockPolicy = DEFAULT_POLICY,
    tp_size: int = 1,
) -> list[str]:
    """Quantized weights whose shapes SGLang's block-FP8 loader would refuse (empty: all fine).

    Mirrors ``Fp8LinearMethod.validate_block_quant_shapes``: fused shards need whole 128-row blocks;
    with ``tp_size > 1`` each rank's rows (column-parallel) or columns (row-parallel) must be whole
    blocks too.
    """
    problems = []
    for name, shape in named_shapes:
        if not policy.should_quantize(name, shape):
            continue
        n, k = shape
        if _FUSED_SHARDS.search(name) and n % BLOCK:
            problems.append(f"{name}: {n} output rows is not a multiple of {BLOCK} (SGLang fuses this shard)")
        if tp_size > 1 and _COLUMN_PARALLEL.search(name) and (n % tp_size or (n // tp_size) % BLOCK):
            problems.append(f"{name}: {n} rows over tp={tp_size} is not whole {BLOCK}-row blocks per rank")
        if tp_size > 1 and _ROW_PARALLEL.search(name) and (k % tp_size or (k // tp_size) % BLOCK):
            problems.append(f"{name}: {k} columns over tp={tp_size} is not whole {BLOCK}-col blocks per rank")
    return problems
