"""Faulty copies of a checkpoint, for testing the gate end to end with any engine (vLLM included): the target
then runs another checkpoint (--target-model), as when an NPU serves a converted model."""

from __future__ import annotations

import shutil
from pathlib import Path

from precision.errors import PrecisionError
from precision.model import ModelInfo


def write_scaled_checkpoint(model: ModelInfo, out: Path, *, layer: int, factor: float) -> Path:
    """A copy of ``model`` whose decoder layer ``layer`` has its MLP down-projection weight multiplied by ``factor``."""
    from safetensors.torch import load_file, save_file

    if not 0 <= layer < model.num_layers:
        raise PrecisionError(f"layer {layer} does not exist (0..{model.num_layers - 1})")
    source = Path(model.path)
    out.mkdir(parents=True, exist_ok=True)
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    found = False
    for item in source.iterdir():
        if item.suffix == ".safetensors":
            tensors = load_file(str(item))
            if name in tensors:
                tensors[name] = (tensors[name].double() * factor).to(tensors[name].dtype)
                found = True
            save_file(tensors, str(out / item.name), metadata={"format": "pt"})
        elif item.is_file():
            shutil.copy(item, out / item.name)
    if not found:
        raise PrecisionError(f"{source} has no tensor {name}; only Llama-family checkpoints are supported")
    return out
