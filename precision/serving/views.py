"""A capture restricted to some of its sites, so a configuration captured at a lower level of detail (only the
final-norm states and logits of a compiled graph) is compared with the baseline on exactly the sites both hold.

The restricted copy is a complete capture directory of its own (manifest, tensors, hashes), written once per
parity run; its manifest's backend record says what it was cut from (``restricted_from``)."""

from __future__ import annotations

import json
from pathlib import Path

from precision.capture import manifest as schema
from precision.capture.arrays import TensorFile
from precision.capture.reader import CaptureReader
from precision.io import write_json_atomic
from precision.model import sha256_file
from precision.names import POSITIONS
from precision.outputs import claim_output_dir
from precision.safetensors_io import write_tensors


def restricted_capture(source: CaptureReader, sites: list[str], out: Path) -> CaptureReader:
    """``source`` with only ``sites`` (and the positions), written to ``out``; reused when already written from the
    same source manifest and sites."""
    out = Path(out)
    wanted = {"capture": str(source.path.resolve()), "manifest_sha256": source.manifest_sha256(), "sites": sorted(sites)}
    if (out / schema.MANIFEST).is_file():
        existing = CaptureReader(out)
        if existing.manifest["backend"].get("restricted_from") == wanted:
            return existing
    with claim_output_dir(out, "capture", force=True, complete_marker=schema.MANIFEST, inputs=[source.path]):
        (out / schema.TENSOR_DIR).mkdir(exist_ok=True)
        manifest = json.loads((source.path / schema.MANIFEST).read_text(encoding="utf-8"))
        prompts = []
        for record in source.prompts:
            tensors = TensorFile(source.path / record.file).tensors()
            kept = {name: tensors[name] for name in [*sites, POSITIONS]}
            target = out / record.file
            write_tensors(target, kept)
            entry = record.to_json()
            entry["tensors"] = {name: record.tensors[name] for name in kept}
            entry["sha256"], entry["bytes"] = sha256_file(target), target.stat().st_size
            prompts.append(entry)
        manifest["prompts"] = prompts
        manifest["backend"]["restricted_from"] = wanted  # the backend record is open to such keys; the manifest is not
        write_json_atomic(out / schema.MANIFEST, manifest)
    return CaptureReader(out)
