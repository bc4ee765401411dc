"""Settings tables (verdict thresholds, regression tolerances) read from TOML files and command lines."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

from precision.errors import PrecisionError

T = TypeVar("T")


def read_toml(path: str | Path) -> tuple[dict, bytes]:
    """A TOML file's content and the bytes it was parsed from (to hash exactly what was read). Raises PrecisionError
    naming the file when it cannot be read or parsed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        raw = Path(path).read_bytes()
        return tomllib.loads(raw.decode("utf-8")), raw
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PrecisionError(f"cannot read config file {path}: {exc}") from exc


def from_mapping(cls: type[T], values: dict, table: str) -> T:
    """An instance of the float-valued dataclass ``cls`` with ``values`` over its defaults; unknown names are
    refused with the list of known ones (a misspelled threshold must not be silently ignored)."""
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise PrecisionError(f"unknown {table} setting(s) {sorted(unknown)}; known: {sorted(known)}")
    numbers = {}
    for name, value in values.items():
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        # NaN compares false with everything: a NaN limit would switch its rule off without a word.
        if not math.isfinite(number) or number < 0:
            raise PrecisionError(f"{table} {name}={value!r}: must be a finite number >= 0")
        numbers[name] = number
    return cls(**numbers)
