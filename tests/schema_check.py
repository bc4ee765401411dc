"""Validation of written documents against the published JSON Schemas (docs/schema/), with jsonschema: an
implementation independent of precision.contract's own decoder, so the two check each other."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from tests.conftest import REPO

SCHEMA_DIR = REPO / "docs" / "schema"


@lru_cache(maxsize=None)
def validator(document_format: str):
    import jsonschema

    schema = json.loads((SCHEMA_DIR / f"{document_format}.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def schema_errors(path: Path) -> tuple[str | None, list[str]]:
    """(the document's format, what does not match its published schema)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    document_format = data.get("format") if isinstance(data, dict) else None
    if not (SCHEMA_DIR / f"{document_format}.schema.json").is_file():
        return document_format, [f"{path}: no published schema for format {document_format!r}"]
    errors = sorted(validator(document_format).iter_errors(data), key=lambda e: list(e.absolute_path))
    return document_format, [f"{path}: {'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors[:5]]


def check_logged_documents(log: Path) -> tuple[list[str], dict[str, int]]:
    """Every document the log lists that still holds what was written (a test may damage or replace a document
    on purpose after writing it; the writer validated it then)."""
    if not log.is_file():
        return [], {}
    problems, counts = [], {}
    for line in sorted(set(log.read_text(encoding="utf-8").splitlines())):
        digest, _, name = line.partition("\t")
        path = Path(name)
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            continue
        document_format, errors = schema_errors(path)
        counts[document_format] = counts.get(document_format, 0) + 1
        problems += errors
    return problems, counts
