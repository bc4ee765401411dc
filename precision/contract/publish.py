"""Writes the published JSON Schemas: docs/schema/<format>.schema.json and docs/schema/versions.json.

    python -m precision.contract.publish          write them (refuses to change a released version's schema)
    python -m precision.contract.publish --check  exit 1 when the published files differ from the types

versions.json records, for every format, the sha256 of the canonical schema of each version ever published. A
version's schema never changes once recorded: changing a type means bumping its version in
precision.contract.DOCUMENTS (and, when old files can no longer be read, its ``readable`` versions).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from precision.contract import DOCUMENTS, ContractError, DocumentType, json_schema

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schema"
VERSIONS_FILE = "versions.json"


def canonical(schema: dict) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def schema_sha256(document: DocumentType) -> str:
    return hashlib.sha256(canonical(json_schema(document)).encode("utf-8")).hexdigest()


def schema_file(document: DocumentType) -> str:
    return f"{document.format}.schema.json"


def rendered(document: DocumentType) -> str:
    return json.dumps(json_schema(document), indent=1, ensure_ascii=False) + "\n"


def problems(schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """What differs between the types and the published schemas (empty when they agree)."""
    try:
        versions = json.loads((schema_dir / VERSIONS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        versions = {}
    out = []
    for document in DOCUMENTS.values():
        recorded = versions.get(document.format, {}).get(str(document.version))
        current = schema_sha256(document)
        if recorded is None:
            out.append(f"{document.format} version {document.version} is not published: run python -m precision.contract.publish")
        elif recorded != current:
            out.append(f"the {document.format} schema changed but its version is still {document.version}: bump the version in "
                       "precision.contract.DOCUMENTS and run python -m precision.contract.publish")
        path = schema_dir / schema_file(document)
        if not path.is_file() or path.read_text(encoding="utf-8") != rendered(document):
            out.append(f"{path} differs from the types: run python -m precision.contract.publish")
    return out


def publish(schema_dir: Path = SCHEMA_DIR) -> list[str]:
    schema_dir.mkdir(parents=True, exist_ok=True)
    versions_path = schema_dir / VERSIONS_FILE
    versions = json.loads(versions_path.read_text(encoding="utf-8")) if versions_path.is_file() else {}
    written = []
    for document in DOCUMENTS.values():
        history = versions.setdefault(document.format, {})
        current = schema_sha256(document)
        if history.get(str(document.version), current) != current:
            raise ContractError(f"{document.format} version {document.version} was published with another schema; "
                             "bump its version in precision.contract.DOCUMENTS instead of changing a released one")
        history[str(document.version)] = current
        (schema_dir / schema_file(document)).write_text(rendered(document), encoding="utf-8")
        written.append(schema_file(document))
    versions_path.write_text(json.dumps(versions, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return written


def main(argv: list[str]) -> int:
    if not SCHEMA_DIR.is_dir():
        # An installed package has no checkout around it: writing would land beside site-packages.
        print(f"{SCHEMA_DIR} does not exist: the schemas are published into a source checkout's docs/schema; "
              "run this from a checkout (pip install -e .)", file=sys.stderr)
        return 2
    if "--check" in argv:
        found = problems()
        print("\n".join(found) or "published schemas match the types")
        return 1 if found else 0
    try:
        written = publish()
    except ContractError as exc:
        print(exc, file=sys.stderr)
        return 1
    for name in written:
        print(f"wrote {SCHEMA_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
