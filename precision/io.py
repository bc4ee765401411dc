"""Small file helpers: atomic writes and output directories that never overwrite by accident."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from precision.errors import PrecisionError


DOCUMENT_LOG_VARIABLE = "PRECISION_CHECK_DOCUMENT_LOG"
"""When set, every document written is listed in that file (one "sha256<TAB>path" line each): tests/conftest.py
validates them all against the published JSON Schemas at the end of the test session."""


class DocumentWriteError(RuntimeError):
    """A document this tool built does not match its published schema: an internal error, not bad input."""


def _json_safe(value: Any) -> Any:
    """NaN/Inf are legitimate measured values; JSON has no literal for them, so they become strings
    "NaN", "Infinity", "-Infinity" (the spellings JavaScript's Number() and Python's float() accept)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
_TEXT_KEYS = frozenset({"id", "category", "scope", "first_worse_scope", "prompt", "name"})


def _restore_non_finite(value: Any, key: str | None = None) -> Any:
    if isinstance(value, str):
        return _NON_FINITE.get(value, value) if key not in _TEXT_KEYS else value
    if isinstance(value, dict):
        return {k: _restore_non_finite(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_non_finite(v, key) for v in value]
    return value


def read_result_json(path: Path, expected_format: str | None = None) -> Any:
    """A JSON document written by write_json_atomic, as plain dicts and lists with "NaN" / "Infinity" /
    "-Infinity" turned back into floats. A document with a known ``format`` is checked against its typed schema
    (precision.contract: an unknown schema version or a malformed document raises ContractError) and only its
    float fields are converted (``expected_format``: refuse any other document); any other JSON falls back to converting those strings everywhere except under
    free-text keys such as a prompt's id."""
    from precision.contract import ContractError, document_type, validate
    from precision.contract.codec import to_plain

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if expected_format is not None and (not isinstance(data, dict) or data.get("format") != expected_format):
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ContractError(f"{path} is not a {expected_format} document (format {found!r})")
    if document_type(data, str(path)) is not None:
        return to_plain(validate(data, str(path)))
    return _restore_non_finite(data)


def os_error_message(exc: OSError, path: Path, action: str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"disk full while {action} {path}; free space and rerun (captures continue with --resume)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission for {action} {path}; choose a writable --out directory"
    return f"error while {action} {path}: {exc.strerror or exc}"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside ``path`` and rename it into place, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PrecisionError(os_error_message(exc, path, "writing")) from exc


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON; a document with a known ``format`` must match its published schema first (a
    mismatch is a bug in precision-check: DocumentWriteError, never a half-valid file)."""
    from precision.contract import ContractError, document_type, validate

    try:
        document = document_type(data, str(path))
        if document is not None:
            validate(data, str(path))
    except ContractError as exc:
        raise DocumentWriteError(f"precision-check built a document that does not match its own schema: {exc}") from exc
    text = json.dumps(_json_safe(data), indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    write_text_atomic(path, text)
    log = os.environ.get(DOCUMENT_LOG_VARIABLE)
    if document is not None and log:  # the test suite checks every document it made against docs/schema/
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"{digest}\t{Path(path).resolve()}\n")


@contextlib.contextmanager
def staged_directory(target: Path, prefix: str) -> Iterator[Path]:
    """A temporary directory beside ``target`` that becomes ``target`` when the block succeeds, so a reader never
    sees a half-built directory; if another process published ``target`` first, that one is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_comparison(comparison: str | Path) -> tuple[Path, dict]:
    """A comparison.json (or the directory holding it): its path and content. Raises PrecisionError naming the file
    and the fix when it is unreadable, damaged, of an unknown version or not a comparison."""
    from precision.contract import ContractError
    from precision.contract.comparison import COMPARISON_FORMAT

    path = Path(comparison)
    path = path / "comparison.json" if path.is_dir() else path
    try:
        document = read_result_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PrecisionError(f"cannot read comparison {path}: {exc}; pass the comparison.json written by 'precision-check compare' or run") from exc
    except ContractError as exc:
        raise PrecisionError(f"{path} is damaged or of another version ({exc}); recreate it with 'precision-check compare'") from exc
    if not isinstance(document, dict) or document.get("format") != COMPARISON_FORMAT:
        raise PrecisionError(f"{path} is not a precision-check comparison.json")
    return path, document
