"""Which values of engine settings are paths, and their resolution against the directory of the file that holds them
([run.engine_args], [run.additional_config] and [serving.NAME] tables of a run configuration file), as the file's
other paths are: a configuration and the files it names can live together in a repository.

Engine settings are free-form (vLLM's EngineArgs, nested tables such as speculative_config, vllm-ascend's
additional_config), so no one type says "path". Two rules decide:

  explicit    a string written as a relative path (``./x``, ``../x``, ``.``, ``..``) or from the home (``~``,
              ``~/x``) is a path wherever it stands, at any depth;
  by name     a setting vLLM reads as a local path or a Hugging Face id (PATH_SETTINGS; dotted names are keys of
              nested tables) is resolved when it names something that exists under the file's directory, and
              otherwise stays as written: "org/model" is a hub id, not a missing directory.

A setting naming a path that does not exist yet (a download_dir to create) is written ``./cache``. Absolute paths
stay themselves. Nothing here imports vLLM: the file is read before any engine is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PATH_SETTINGS = frozenset({
    "download_dir", "hf_config_path", "model_weights", "generation_config", "log_config_file", "allowed_local_media_path",
    "mm_encoder_fp8_scale_path", "mm_encoder_fp8_scale_save_path", "spec_model", "speculative_config.model",
    "compilation_config.cache_dir", "compilation_config.local_cache_dir", "compilation_config.debug_dump_path",
})
"""vLLM 0.32 EngineArgs fields (and nested config fields) that hold a filesystem path or a hub id. ``tokenizer`` and
``model`` are not here: precision-check sets them itself (precision.backends.vllm refuses them)."""

_EXPLICIT_PREFIXES = ("./", "../", "~/", ".\\", "..\\")
_EXPLICIT_WHOLE = (".", "..", "~")


def is_explicit_path(value: Any) -> bool:
    """A string that can only mean a path: relative to here (./, ../) or to the home (~)."""
    return isinstance(value, str) and (value in _EXPLICIT_WHOLE or value.startswith(_EXPLICIT_PREFIXES))


def _resolved(value: str, base: Path) -> str:
    return str((base / Path(value).expanduser()).resolve())


def resolve_setting_paths(settings: dict[str, Any], base: Path, prefix: str = "") -> dict[str, Any]:
    """``settings`` with their path values resolved against ``base`` (the file's directory) by the module's two
    rules; nested tables and lists are walked. A new dict: ``settings`` is not changed."""
    return {key: _resolve_value(value, base, f"{prefix}{key}") for key, value in settings.items()}


def _resolve_value(value: Any, base: Path, name: str) -> Any:
    if isinstance(value, dict):
        return resolve_setting_paths(value, base, f"{name}.")
    if isinstance(value, list):
        return [_resolve_value(item, base, name) for item in value]
    if is_explicit_path(value):
        return _resolved(value, base)
    if name in PATH_SETTINGS and isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
        return _resolved(value, base)
    return value


def resolve_serving_tables(tables: dict[str, dict], base: Path) -> dict[str, dict]:
    """Every [serving.NAME] table with its paths resolved against ``base``."""
    return {name: resolve_setting_paths(table, base) for name, table in tables.items()}
