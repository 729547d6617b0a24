"""Block-wise FP8 (128x128, float8_e4m3fn) weight quantization for SGLang's block-FP8 loader.

- :mod:`weight_sync.fp8.block_quant`: the Triton kernel, its launcher and the PyTorch reference
  (one stated semantics, bitwise equal).
- :mod:`weight_sync.fp8.policy`: which parameters are quantized, and the names SGLang loads.
- :mod:`weight_sync.fp8.bucket`: quantizing straight into a flat transfer bucket.
"""

from weight_sync.fp8.block_quant import (
    BLOCK,
    CANDIDATE_CONFIGS,
    DEFAULT_CONFIGS,
    EPS,
    FP8_MAX,
    Fp8LaunchConfig,
    NonFiniteWeightError,
    check_finite_scales,
    fp8_block_dequant,
    fp8_block_quant,
    fp8_block_quant_torch,
    fp8_block_quant_triton,
    launch_config,
    scale_shape,
    shape_class,
)
from weight_sync.fp8.bucket import (
    BucketEntry,
    BucketFill,
    BucketPlan,
    SourceTensor,
    bucket_view,
    fill_bucket,
    fill_bucket_from,
    plan_bucket,
    plan_fill,
)
from weight_sync.fp8.policy import DEFAULT_POLICY, Fp8BlockPolicy, TensorSpec, sglang_shape_problems

__all__ = [
    "BLOCK",
    "CANDIDATE_CONFIGS",
    "DEFAULT_CONFIGS",
    "DEFAULT_POLICY",
    "EPS",
    "FP8_MAX",
    "BucketEntry",
    "BucketFill",
    "Fp8LaunchConfig",
    "BucketPlan",
    "Fp8BlockPolicy",
    "NonFiniteWeightError",
    "SourceTensor",
    "TensorSpec",
    "bucket_view",
    "check_finite_scales",
    "fill_bucket",
    "fill_bucket_from",
    "fp8_block_dequant",
    "fp8_block_quant",
    "fp8_block_quant_torch",
    "fp8_block_quant_triton",
    "launch_config",
    "plan_bucket",
    "plan_fill",
    "scale_shape",
    "sglang_shape_problems",
    "shape_class",
]
