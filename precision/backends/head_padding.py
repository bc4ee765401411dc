"""An exact copy of a Llama checkpoint with a larger attention head size, for engines that reject small heads.

vLLM's CPU attention supports head sizes 32, 64, 80, ... only; stories260K has head_dim 8. The copy computes the
same function: each head of size d becomes a head of size D = 4^k d where
- rotary pair j (dims j and j + d/2, frequency theta^(-2j/d)) moves to dims (D/d) j and D/2 + (D/d) j, which
  have the same frequency theta^(-2 (D/d) j / D); the other dims are zero in q, k and v;
- q is scaled by sqrt(D/d) = 2^k, so that q.k / sqrt(D) equals the original q.k / sqrt(d); a power of two
  scales exactly in binary floating point;
- o_proj gets the matching input columns (zero elsewhere).
Zeros add nothing to any sum, so the result differs from the original only by how a kernel for head size D
groups the same nonzero terms. Verified bit-identical in transformers (BF16 and FP32) in the tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

from precision.errors import BackendError
from precision.io import staged_directory
from precision.model import ModelInfo, weight_file
from precision.safetensors_io import write_tensors


def padded_head_dim(head_dim: int, supported: tuple[int, ...]) -> int | None:
    """Smallest supported size D >= head_dim with D / head_dim a power of 4 (so the q scale is a power of 2)."""
    for size in sorted(supported):
        if size >= head_dim and size % head_dim == 0:
            ratio = size // head_dim
            if ratio == 1 or (ratio & (ratio - 1) == 0 and int(math.log2(ratio)) % 2 == 0):
                return size
    return None


def _index_map(old: int, new: int):
    import torch

    stride = new // old
    half_old, half_new = old // 2, new // 2
    return torch.tensor([stride * j for j in range(half_old)] + [half_new + stride * j for j in range(half_old)])


def pad_heads(model: ModelInfo, new_head_dim: int, cache_dir: Path) -> Path:
    """Write (once) and return the padded copy of ``model`` under ``cache_dir``."""
    import torch

    source = Path(model.path)
    config = json.loads((source / "config.json").read_text())
    heads, kv_heads, hidden = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"]), config["hidden_size"]
    old = config.get("head_dim") or hidden // heads
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None) or config.get("partial_rotary_factor", 1.0) != 1.0:
        raise BackendError(f"{source}: head-size padding supports plain RoPE only, this model uses {scaling}; run it on an engine that supports head_dim {old}")
    key = hashlib.sha256(json.dumps([model.config_sha256, model.weights_sha256, new_head_dim]).encode()).hexdigest()[:16]
    target = cache_dir / f"padded-hd{new_head_dim}-{key}"
    if (target / "config.json").is_file():
        return target
    index = _index_map(old, new_head_dim)
    q_scale = math.sqrt(new_head_dim / old)
    padded = {}
    for file in sorted(source.glob("*.safetensors")):
        for name, weight in weight_file(file).tensors().items():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias")):
                count = heads if ".q_proj." in name else kv_heads
                shaped = weight.reshape(count, old, *weight.shape[1:])
                grown = torch.zeros(count, new_head_dim, *weight.shape[1:], dtype=weight.dtype)
                grown[:, index] = shaped
                if ".q_proj." in name:
                    grown *= q_scale
                padded[name] = grown.reshape(count * new_head_dim, *weight.shape[1:]).contiguous()
            elif name.endswith("o_proj.weight"):
                shaped = weight.reshape(weight.shape[0], heads, old)
                grown = torch.zeros(weight.shape[0], heads, new_head_dim, dtype=weight.dtype)
                grown[:, :, index] = shaped
                padded[name] = grown.reshape(weight.shape[0], heads * new_head_dim).contiguous()
            else:
                padded[name] = weight
    with staged_directory(target, ".padding-") as staging:
        write_tensors(staging / "model.safetensors", padded, metadata={"format": "pt"})
        config["head_dim"] = new_head_dim
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for item in source.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name != "config.json" and not item.name.endswith(".index.json"):
                shutil.copy(item, staging / item.name)
    return target
