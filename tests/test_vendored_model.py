"""The test model vendored under tests/models/ is the copy its PROVENANCE.md describes, with its licence beside it."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

MODEL = Path(__file__).resolve().parent / "models" / "stories260K"
HASH_LINE = re.compile(r"^\s+([0-9a-f]{64})  (\S+)", re.MULTILINE)
VENDORED_SECTION = "\n## This vendored copy"


def provenance_mismatches(model_dir: Path) -> list[str]:
    """Files of ``model_dir`` whose sha256 differs from the one PROVENANCE.md records, plus files it does not list
    and listed files that are missing. PROVENANCE.md's own recorded hash covers its upstream text, the part above
    the section describing the vendored copy."""
    provenance = (model_dir / "PROVENANCE.md").read_text(encoding="utf-8")
    recorded = {name: digest for digest, name in HASH_LINE.findall(provenance)}
    present = {p.name for p in model_dir.iterdir()} - {"LICENSE"}
    problems = [f"{name}: not recorded" for name in sorted(present - set(recorded))]
    problems += [f"{name}: missing" for name in sorted(set(recorded) - present)]
    for name in sorted(present & set(recorded)):
        data = (provenance[:provenance.index(VENDORED_SECTION)].encode("utf-8") if name == "PROVENANCE.md"
                else (model_dir / name).read_bytes())
        if hashlib.sha256(data).hexdigest() != recorded[name]:
            problems.append(f"{name}: sha256 differs")
    return problems


def test_every_vendored_file_has_the_sha256_its_provenance_records():
    assert provenance_mismatches(MODEL) == []


def test_a_changed_or_unrecorded_file_is_caught(tmp_path):
    copy = tmp_path / "stories260K"
    shutil.copytree(MODEL, copy)
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(weights))
    (copy / "extra.bin").write_bytes(b"")
    (copy / "tokenizer.model").unlink()
    assert provenance_mismatches(copy) == ["extra.bin: not recorded", "tokenizer.model: missing",
                                           "model.safetensors: sha256 differs"]


def test_the_mit_licence_of_llama2c_is_beside_the_model():
    licence = (MODEL / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License") and "Copyright (c) 2023 Andrej Karpathy" in licence
