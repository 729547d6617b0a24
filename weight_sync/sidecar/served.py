"""What the server serves: every checkpoint tensor's name, shape and dtype, read from the checkpoint.

SGLang's ``load_weights`` takes checkpoint names (``model.layers.0.self_attn.q_proj.weight``), not
its fused parameter names (``qkv_proj``), so the checkpoint SGLang loaded is the ground truth of
what an update may contain. Only the safetensors headers are read (a few KB per file, no tensor
data): ``model.safetensors.index.json`` when sharded, else every ``*.safetensors`` file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype codes -> torch names (those that can travel; others are reported as they are).
SAFETENSORS_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F8_E4M3": "float8_e4m3fn",
    "I64": "int64",
    "I32": "int32",
    "U8": "uint8",
    "BOOL": "bool",
}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
FLOATING = {"bfloat16", "float16", "float32"}


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ServedModel:
    model_path: str
    tensors: dict[str, TensorSpec]


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header of {n} bytes")
        return json.loads(f.read(n))


def read_checkpoint(model_path: str | Path, served_dtype: str | None = None) -> ServedModel:
    """The served tensors of the checkpoint in ``model_path``.

    ``served_dtype``: SGLang's ``--dtype`` when it is not ``auto``: floating tensors are loaded into
    parameters of that dtype, so an update must bring that dtype (FP8 weights and scales excepted).
    """
    root = Path(model_path)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a local checkpoint directory (pass the sidecar --model-path)")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [root / f for f in files]
    else:
        paths = sorted(root.glob("*.safetensors"))
    if not paths:
        raise CheckpointError(f"no safetensors files in {root}")
    tensors: dict[str, TensorSpec] = {}
    for path in paths:
        for name, meta in read_header(path).items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(meta["dtype"], meta["dtype"])
            if served_dtype and dtype in FLOATING:
                dtype = served_dtype
            tensors[name] = TensorSpec(tuple(int(s) for s in meta["shape"]), dtype)
    return ServedModel(str(root), tensors)
