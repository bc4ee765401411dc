"""Settings tables (verdict thresholds, regression tolerances) read from TOML files and command lines."""

from __future__ import annotations

from dataclasses import fields
from typing import TypeVar

from precision.errors import PrecisionError

T = TypeVar("T")


def from_mapping(cls: type[T], values: dict, table: str) -> T:
    """An instance of the float-valued dataclass ``cls`` with ``values`` over its defaults; unknown names are
    refused with the list of known ones (a misspelled threshold must not be silently ignored)."""
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise PrecisionError(f"unknown {table} setting(s) {sorted(unknown)}; known: {sorted(known)}")
    try:
        return cls(**{k: float(v) for k, v in values.items()})
    except (TypeError, ValueError) as exc:
        raise PrecisionError(f"{table} settings must be numbers: {exc}") from exc
