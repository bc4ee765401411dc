"""The run configuration file (``precision-check run --config run.toml``): everything the run command's flags hold,
in TOML, with the flags the user gives on the command line overriding it.

    [run]                                # the flags of `precision-check run`, '-' written '_'
    prompts = "prompts/"                 # relative paths are resolved against this file's directory
    model = "models/my-model"
    target = "vllm"
    truth = "none"                       # or a backend spec
    max_new_tokens = 32
    layers = [0, 15, 31]                 # or "all" / "0,15,31"
    replay = false                       # the file's form of --no-replay
    [run.engine_args]                    # --engine-arg KEY=VALUE, typed by TOML instead of JSON
    max_model_len = 2048
    [run.additional_config]              # --additional-config (vllm-ascend)
    enable_reduce_sample = false
    [thresholds]                         # the verdict rules (precision.analysis.verdict.Thresholds)
    r_logits_fail = 1.3
    [regress]                            # read by `regress --config` (a CI gate keeps one file for both)
    [serving.NAME]                       # RunConfig.serving: the serving stage's configurations (precision.serving)
    max_num_batched_tokens = 16          # each one the run's target settings with this table's over them

Paths inside engine settings ([run.engine_args], [run.additional_config], [serving.NAME]) are resolved against this
file's directory too, by precision.serving.setting_paths' rules (./x, ../x and ~/x anywhere; the settings vLLM reads
as paths, such as download_dir or speculative_config.model, when they exist there).

Unknown tables and keys are refused, naming the known ones: a misspelled setting must not be silently ignored.
``--force``, ``--resume`` and ``--quiet`` are about one invocation, not about what is run, so they stay flags.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from precision.errors import PrecisionError

TABLES = ("run", "thresholds", "regress", "serving")
"""The top-level tables a run configuration file may hold."""

_PATH, _STRING, _INTEGER, _BOOLEAN, _TABLE, _STRINGS, _LAYERS, _REFERENCE = (
    "a path (string)", "a string", "an integer", "true or false", "a table", "a list of strings",
    "\"all\", a string like \"0,15,31\" or a list of integers", "a backend spec or a golden store's directory (string)")

RUN_KEYS: dict[str, str] = {
    "prompts": _PATH, "model": _PATH, "out": _PATH, "reference": _REFERENCE, "target": _STRING, "truth": _STRING,
    "max_new_tokens": _INTEGER, "positions": _STRING, "layers": _LAYERS, "engine_args": _TABLE, "additional_config": _TABLE,
    "trust_remote_code": _BOOLEAN, "target_model": _PATH, "target_variants": _STRINGS, "envelope": _STRING, "replay": _BOOLEAN,
    "layer_streamed": _BOOLEAN, "repeats": _INTEGER, "metric_convention": _STRING, "junit": _PATH,
}
"""The [run] keys and what each must be. Each is a flag of `precision-check run` (replay: the inverse of --no-replay;
target_variants: --target-variant, repeated)."""

CHOICES = {"envelope": ("default", "none"), "metric_convention": ("precision-check", "msprobe")}


@dataclass(frozen=True)
class RunFile:
    """A checked run configuration file."""

    path: Path
    """Absolute path of the file."""
    sha256: str
    """sha256 of the bytes that were parsed (recorded in run.json)."""
    run: dict[str, Any] = field(default_factory=dict)
    """The [run] settings, keyed as RUN_KEYS, relative paths resolved against the file's directory."""
    thresholds: dict[str, Any] = field(default_factory=dict)
    regress: dict[str, Any] = field(default_factory=dict)
    serving: dict[str, dict] = field(default_factory=dict)
    """[serving.NAME] tables with their paths resolved (precision.serving.setting_paths); the serving stage checks
    the settings themselves."""


def read_run_file(path: str | Path) -> RunFile:
    """Read and check a run configuration file. Raises PrecisionError (exit 2) naming the file and the problem: an
    unreadable file, invalid TOML, an unknown table or key (with the known ones), a value of the wrong type."""
    from precision.config import read_toml
    from precision.serving.setting_paths import resolve_serving_tables

    path = Path(path).expanduser().resolve()
    data, raw = read_toml(path)
    for name, value in data.items():
        if name not in TABLES:
            raise PrecisionError(f"{path}: unknown {'table [' + name + ']' if isinstance(value, dict) else 'key ' + repr(name) + ' outside any table'}; "
                                 f"known tables: {', '.join('[' + t + ']' for t in TABLES[:-1])}, [serving.NAME] "
                                 f"(run settings go under [run]; known [run] keys: {', '.join(RUN_KEYS)})")
        if not isinstance(value, dict):
            raise PrecisionError(f"{path}: {name} must be a table ([{name}]), not {type(value).__name__}")
    serving = data.get("serving", {})
    for name, table in serving.items():
        if not isinstance(table, dict):
            raise PrecisionError(f"{path}: serving.{name} must be a table ([serving.{name}] with its settings)")
        _require_json(table, f"{path}: [serving.{name}]")  # recorded in run.json: refused now, not when it is written
    _check_settings_table(data, "thresholds", path)
    _check_settings_table(data, "regress", path)
    return RunFile(path=path, sha256=hashlib.sha256(raw).hexdigest(), run=_checked_run_table(data.get("run", {}), path),
                   thresholds=data.get("thresholds", {}), regress=data.get("regress", {}),
                   serving=resolve_serving_tables(serving, path.parent))


def _check_settings_table(data: dict, table: str, path: Path) -> None:
    """[thresholds] and [regress] are checked when the file is read, so that the message names the file."""
    from precision.analysis.regress import RegressTolerance
    from precision.analysis.verdict import Thresholds

    try:
        {"thresholds": Thresholds, "regress": RegressTolerance}[table].from_mapping(data.get(table, {}))
    except PrecisionError as exc:
        raise PrecisionError(f"{path}: {exc}") from exc


def _checked_run_table(table: dict, path: Path) -> dict:
    from precision.serving.setting_paths import resolve_setting_paths

    unknown = sorted(set(table) - set(RUN_KEYS))
    if unknown:
        raise PrecisionError(f"{path}: unknown [run] key(s) {', '.join(unknown)}; known: {', '.join(RUN_KEYS)}")
    settings = {}
    for key, value in table.items():
        kind = RUN_KEYS[key]
        where = f"{path}: [run] {key} = {value!r}"
        if not _has_kind(value, kind):
            raise PrecisionError(f"{where}: must be {kind}")
        if key in CHOICES and value not in CHOICES[key]:
            raise PrecisionError(f"{where}: use one of {', '.join(CHOICES[key])}")
        if kind == _INTEGER and value < 1:
            raise PrecisionError(f"{where}: must be at least 1")
        if kind == _TABLE:
            _require_json(value, where)
            value = resolve_setting_paths(value, path.parent)
        if kind == _PATH or (kind == _REFERENCE and (path.parent / value).exists()):
            value = str((path.parent / Path(value).expanduser()).resolve())  # an absolute path stays itself
        if kind == _LAYERS and isinstance(value, list):
            value = ",".join(str(layer) for layer in value)
        if kind == _STRINGS:
            value = list(value)
        settings[key] = value
    if "additional_config" in settings.get("engine_args", {}) and "additional_config" in settings:
        raise PrecisionError(f"{path}: additional_config is given twice ([run] additional_config and [run.engine_args] additional_config); keep one")
    return settings


def _has_kind(value: Any, kind: str) -> bool:
    if kind == _INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _BOOLEAN:
        return isinstance(value, bool)
    if kind == _TABLE:
        return isinstance(value, dict)
    if kind == _STRINGS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == _LAYERS:
        return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                          and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    return isinstance(value, str) and value != ""


def _require_json(value: Any, where: str) -> None:
    """Engine settings are recorded in JSON documents: a TOML date or a NaN would only fail when the manifest is written."""
    if isinstance(value, dict):
        for item in value.values():
            _require_json(item, where)
    elif isinstance(value, list):
        for item in value:
            _require_json(item, where)
    elif isinstance(value, float) and not math.isfinite(value):
        raise PrecisionError(f"{where}: holds {value}, which JSON cannot record; use a finite number")
    elif not isinstance(value, (str, int, float, bool)):
        raise PrecisionError(f"{where}: holds {value!r} ({type(value).__name__}); engine settings are strings, numbers, "
                             "booleans, lists and tables")


def merge_settings(from_file: dict, given: dict) -> dict:
    """The settings the run uses: the flags the user gave over the file's. Engine arguments merge key by key (a
    flag's --engine-arg K=V replaces only K); every other flag replaces the file's value."""
    merged = {**from_file, **{k: v for k, v in given.items() if k != "engine_args"}}
    engine_args = {**from_file.get("engine_args", {})}
    if "additional_config" in from_file:
        engine_args["additional_config"] = from_file["additional_config"]
    engine_args.update(given.get("engine_args", {}))
    merged.pop("additional_config", None)
    if engine_args:
        merged["engine_args"] = engine_args
    return merged


def build_run_config(settings: dict, *, thresholds: dict | None = None, serving: dict | None = None, config_file: RunFile | None = None,
                     force: bool = False, resume: bool = False, show_progress: bool = True, command: str | None = None):
    """A RunConfig from settings keyed as RUN_KEYS (the file's merged with the flags; additional_config inside
    engine_args); absent keys take RunConfig's defaults, ``prompts`` the shipped prompt sets and ``out``
    runs/run-<UTC time>. Raises PrecisionError for an unknown key, a setting of the wrong type or out of range."""
    from precision.analysis.envelope import DEFAULT_MEMBERS
    from precision.analysis.verdict import Thresholds
    from precision.api import PROMPT_SETS
    from precision.capture.sites import CaptureSelection
    from precision.pipeline import RunConfig

    unknown = sorted(set(settings) - set(RUN_KEYS))
    if unknown:
        raise PrecisionError(f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(RUN_KEYS)}")
    for key, choices in CHOICES.items():
        if key in settings and settings[key] not in choices:
            raise PrecisionError(f"{key} {settings[key]!r}: use one of {', '.join(choices)}")
    options: dict[str, Any] = {}
    for key in ("reference", "target", "max_new_tokens", "trust_remote_code", "replay", "layer_streamed", "repeats", "metric_convention",
                "engine_args"):
        if key in settings:
            options[key] = settings[key]
    for key in ("model", "target_model"):
        if settings.get(key):
            options[key] = Path(settings[key])
    if "truth" in settings:
        options["truth"] = None if str(settings["truth"]).lower() == "none" else settings["truth"]
    if "envelope" in settings:
        options["envelope"] = DEFAULT_MEMBERS if settings["envelope"] == "default" else ()
    if "target_variants" in settings:
        options["target_variants"] = tuple(settings["target_variants"])
    out = settings.get("out") or Path("runs") / datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")
    config_record = {"path": str(config_file.path), "sha256": config_file.sha256} if config_file else None
    return RunConfig(prompts=Path(settings.get("prompts") or PROMPT_SETS), out=Path(out),
                     selection=CaptureSelection.parse(settings.get("positions") or "all", settings.get("layers") or "all"),
                     thresholds=Thresholds.from_mapping(thresholds or {}), serving=dict(serving or {}), config_file=config_record,
                     force=force, resume=resume, show_progress=show_progress, command=command, **options)


def load_run_config(path: str | Path | None = None, settings: dict | None = None, *, thresholds: dict | None = None, **invocation):
    """The RunConfig a run configuration file describes, with ``settings`` (keyed as RUN_KEYS) and ``thresholds``
    over the file's; ``invocation``: force, resume, show_progress, command. Without ``path``, the settings alone.
    Raises PrecisionError as ``read_run_file`` and ``build_run_config`` do."""
    file = read_run_file(path) if path is not None else None
    merged = merge_settings(file.run if file else {}, settings or {})
    return build_run_config(merged, thresholds={**(file.thresholds if file else {}), **(thresholds or {})},
                            serving=file.serving if file else {}, config_file=file, **invocation)
