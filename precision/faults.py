"""Faulty copies of a checkpoint, for testing the gate end to end with any engine (vLLM included): the target
then runs another checkpoint (--target-model), as when an NPU serves a converted model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from precision.errors import PrecisionError
from precision.model import ModelInfo, weight_file
from precision.safetensors_io import write_tensors
from precision.outputs import claim_output_dir


def write_scaled_checkpoint(model: ModelInfo, out: Path, *, layer: int, factor: float, force: bool = False) -> Path:
    """A copy of ``model`` whose decoder layer ``layer`` has its MLP down-projection weight multiplied by ``factor``,
    written into a new (or, with ``force``, a previous fault checkpoint's) directory, never into the model."""
    if not 0 <= layer < model.num_layers:
        raise PrecisionError(f"--layer {layer} does not exist (0..{model.num_layers - 1})")
    if not math.isfinite(factor) or factor <= 0:
        raise PrecisionError(f"--factor {factor}: must be a finite number > 0, e.g. 1.01")
    source = Path(model.path)
    with claim_output_dir(out, "fault-checkpoint", force=force, complete_marker="config.json", inputs=[source], can_resume=False) as claimed:
        claimed.register(item.name for item in source.iterdir() if item.is_file())
        _write_copy(source, Path(out), layer, factor)
    return Path(out)


def _write_copy(source: Path, out: Path, layer: int, factor: float) -> None:
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    found = False
    for item in sorted(source.iterdir()):
        if item.name == "config.json":
            continue  # copied last: it marks a finished copy
        if item.suffix == ".safetensors":
            tensors = weight_file(item).tensors()
            if name in tensors:
                tensors[name] = (tensors[name].double() * factor).to(tensors[name].dtype)
                found = True
            write_tensors(out / item.name, tensors, metadata={"format": "pt"})
        elif item.is_file():
            shutil.copy(item, out / item.name)
    if not found:
        raise PrecisionError(f"{source} has no tensor {name}; only Llama-family checkpoints are supported")
    shutil.copy(source / "config.json", out / "config.json")
