"""Serving configurations as the user writes them: ``--serving NAME:key=value,key=value`` and ``[serving.NAME]``
tables of a TOML file. Values are JSON when they parse (``true``, ``8``, ``"fp8"``), else plain words (``fp8``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from precision.config import read_toml
from precision.errors import PrecisionError
from precision.serving.engine import ServingConfig
from precision.serving.setting_paths import resolve_serving_tables

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_serving(spec: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> (name, settings). A JSON value may not contain a comma."""
    name, sep, body = spec.partition(":")
    if not sep or not _NAME.match(name):
        raise PrecisionError(f"--serving {spec!r}: write it as NAME:key=value,key=value, e.g. --serving chunked:max_num_batched_tokens=16,"
                             "enable_chunked_prefill=true (NAME of letters, digits, '-', '_')")
    settings = {}
    for pair in filter(None, (part.strip() for part in body.split(","))):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise PrecisionError(f"--serving {spec!r}: {pair!r} is not key=value")
        settings[key.strip()] = _value(value.strip())
    return name, settings


def _serving_tables(path: str | Path | None) -> dict:
    if path is None:
        return {}
    data = read_toml(path)[0]
    tables = data.get("serving", {})
    if not isinstance(tables, dict) or any(not isinstance(v, dict) for v in tables.values()):
        raise PrecisionError(f"{path}: [serving] must hold tables [serving.NAME] of engine settings")
    # Paths in the tables are relative to the file, as in run --config (the same rules: precision.serving.setting_paths).
    return resolve_serving_tables(tables, Path(path).expanduser().resolve().parent)


def serving_configurations(specs: list[str], config_path: str | Path | None = None) -> tuple[ServingConfig, ...]:
    """The [serving.NAME] tables of ``config_path`` (in file order), then the ``--serving`` specs."""
    configs = [ServingConfig.from_mapping(name, values) for name, values in _serving_tables(config_path).items()]
    configs += [ServingConfig.from_mapping(*parse_serving(spec)) for spec in specs]
    return tuple(configs)
