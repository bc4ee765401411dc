"""The data contract: every JSON document precision-check writes, as typed dataclasses with one JSON codec, a
schema version, and a JSON Schema generated from the types and published under docs/schema/.

A document names its type by its ``format`` field; ``DOCUMENTS`` maps each format to its type and version.
``validate`` checks a document before it is written (precision.io.write_json_atomic calls it for every
document with a known format) and ``load`` reads one back as its type, refusing a major version this build
does not know. A change to a type changes its generated schema; tests/test_contract.py fails until the version
is bumped and docs/schema/ regenerated (``python -m precision.contract.publish``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precision.contract.capture import CAPTURE_FORMAT, CAPTURE_VERSION, CaptureManifest, ProgressHeader, PromptEntry
from precision.contract.codec import ContractError, decode, encode, schema_of
from precision.contract.comparison import COMPARISON_FORMAT, COMPARISON_VERSION, Comparison
from precision.contract.results import (GOLDEN_FORMAT, GOLDEN_VERSION, REGRESSION_FORMAT, REGRESSION_VERSION, RUN_FORMAT,
                                        RUN_VERSION, SELFTEST_FORMAT, SELFTEST_VERSION, SUMMARY_FORMAT, SUMMARY_VERSION,
                                        GoldenStore, Regression, RunRecord, Selftest, Summary)

__all__ = ["ContractError", "DOCUMENTS", "DocumentType", "decode", "encode", "json_schema", "load", "validate",
           "CaptureManifest", "Comparison", "GoldenStore", "ProgressHeader", "PromptEntry", "Regression", "RunRecord",
           "Selftest", "Summary"]


@dataclass(frozen=True)
class DocumentType:
    format: str
    type: type
    version: int
    """The schema version this build writes (the document's ``schema_version``)."""
    readable: tuple[int, ...]
    """Versions this build reads: documents of another version are refused with a message."""
    file: str
    """The file name a run writes it to."""


DOCUMENTS: dict[str, DocumentType] = {d.format: d for d in (
    DocumentType(CAPTURE_FORMAT, CaptureManifest, CAPTURE_VERSION, (CAPTURE_VERSION,), "manifest.json"),
    DocumentType(COMPARISON_FORMAT, Comparison, COMPARISON_VERSION, (COMPARISON_VERSION,), "comparison.json"),
    DocumentType(SUMMARY_FORMAT, Summary, SUMMARY_VERSION, (SUMMARY_VERSION,), "summary.json"),
    DocumentType(RUN_FORMAT, RunRecord, RUN_VERSION, (RUN_VERSION,), "run.json"),
    DocumentType(REGRESSION_FORMAT, Regression, REGRESSION_VERSION, (REGRESSION_VERSION,), "regression.json"),
    DocumentType(GOLDEN_FORMAT, GoldenStore, GOLDEN_VERSION, (GOLDEN_VERSION,), "store.json"),
    DocumentType(SELFTEST_FORMAT, Selftest, SELFTEST_VERSION, (SELFTEST_VERSION,), "selftest.json"),
)}


def json_schema(document: DocumentType) -> dict[str, Any]:
    """The published JSON Schema (draft 2020-12) of a document type."""
    defs: dict[str, Any] = {}
    root = schema_of(document.type, defs)
    name = root["$ref"].rsplit("/", 1)[1]
    body = defs.pop(name)
    body["properties"]["schema_version"] = {"const": document.version}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://precision-check/schema/{document.format}-{document.version}.json",
            "title": f"{document.file} ({document.format}, schema version {document.version})",
            **body, "$defs": dict(sorted(defs.items()))}


def document_type(data: Any, where: str) -> DocumentType | None:
    """The registered type of a parsed document, or None when it names no known format (not a document)."""
    if not isinstance(data, dict) or data.get("format") not in DOCUMENTS:
        return None
    document = DOCUMENTS[data["format"]]
    if "schema_version" not in data:
        raise ContractError(f"{where} is a {document.format} document without a schema_version; it is damaged or was not "
                            "written by precision-check: write it again with this one")
    version = data["schema_version"]
    if version not in document.readable or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > max(document.readable)
        hint = ("it was written by a newer precision-check: upgrade this one" if newer
                else "it was written by another precision-check: write it again with this one")
        raise ContractError(f"{where} is a {document.format} document of schema version {version!r}; this precision-check reads "
                            f"version{'s' if len(document.readable) > 1 else ''} {', '.join(map(str, document.readable))} ({hint})")
    return document


def validate(data: Any, where: str) -> Any:
    """``data`` decoded as its document type (named by its ``format``); ContractError if it does not fit."""
    document = document_type(data, where)
    if document is None:
        raise ContractError(f"{where} is not a precision-check document (no known \"format\")")
    try:
        return decode(document.type, data, document.file)
    except ContractError as exc:
        raise ContractError(f"{where} does not match the {document.format} schema: {exc}") from None


def load(path: str | Path, expected_format: str | None = None) -> Any:
    """A document file read back as its typed dataclass."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ContractError(f"cannot read {path} ({exc})") from exc
    if expected_format is not None and (not isinstance(data, dict) or data.get("format") != expected_format):
        raise ContractError(f"{path} is not a {expected_format} document")
    return validate(data, str(path))


def to_json(document: Any) -> dict[str, Any]:
    return encode(document)
