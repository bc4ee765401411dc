"""Copies of real captures with values planted into their tensors (a NaN, an Inf, a logit bias), the manifest's
hashes rewritten to match, so compare and judge read them as ordinary captures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from precision.capture.reader import CaptureReader
from precision.model import sha256_file


def planted_copy(source: CaptureReader, destination: Path, edit: Callable[[str, str, torch.Tensor], torch.Tensor | None]) -> CaptureReader:
    """A copy of ``source`` in ``destination`` where ``edit(prompt_id, site, tensor)`` may return a replacement."""
    shutil.copytree(source.path, destination)
    manifest_path = destination / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for record in manifest["prompts"]:
        path = destination / record["file"]
        tensors = load_file(str(path))
        changed = False
        for site, tensor in list(tensors.items()):
            replacement = edit(record["id"], site, tensor.clone())
            if replacement is not None:
                tensors[site] = replacement.to(tensor.dtype).contiguous()
                changed = True
        if changed:
            save_file(tensors, str(path))
            record["sha256"] = sha256_file(path)
            record["bytes"] = path.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    return CaptureReader(destination)
