"""Argument values -> the API's value types: engine arguments, TOML config tables, NAME=VALUE overrides and the
capture selection. Only parsing and checking; nothing here captures, compares or writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from precision.errors import PrecisionError

_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/+-]*$")


def engine_args(pairs: list[str], additional_config: str | None) -> dict:
    args: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PrecisionError(f"--engine-arg {pair!r}: write it as key=value, e.g. --engine-arg max_num_seqs=1")
        try:
            args[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            # A bare word (bfloat16, fp8, auto) is a string; anything else that is not JSON is a typo that
            # vLLM would only reject after the whole CPU side was captured (max_model_len=2O48).
            if not _BARE_WORD.match(value):
                raise PrecisionError(f"--engine-arg {pair!r}: {value!r} is neither JSON nor a plain word; write numbers as numbers "
                                     f"(max_model_len=2048) and other strings in JSON quotes ({key.strip()}='\"...\"')") from None
            args[key.strip()] = value
    if additional_config:
        try:
            args["additional_config"] = json.loads(additional_config)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PrecisionError(f"--additional-config is not valid JSON ({exc}); pass an object like '{{\"enable_reduce_sample\": false}}'") from exc
        if not isinstance(args["additional_config"], dict):
            raise PrecisionError("--additional-config must be a JSON object, like '{\"enable_reduce_sample\": false}'")
    return args


def selection(args):
    from precision import CaptureSelection

    return CaptureSelection.parse(args.positions or "all", args.layers or "all")


def given_run_settings(args) -> dict:
    """The options of ``run`` the user actually gave, keyed as the [run] table of a run configuration file
    (precision.run_file.RUN_KEYS): these override the file's; an option not given leaves the file's value."""
    settings = {key: getattr(args, key) for key in ("prompts", "model", "out", "reference", "target", "truth", "max_new_tokens",
                                                    "positions", "layers", "target_model", "envelope", "repeats", "metric_convention",
                                                    "junit") if getattr(args, key) is not None}
    for flag, key, value in (("trust_remote_code", "trust_remote_code", True), ("layer_streamed", "layer_streamed", True),
                             ("no_replay", "replay", False)):
        if getattr(args, flag):
            settings[key] = value
    if args.target_variant:
        settings["target_variants"] = list(args.target_variant)
    engine = engine_args(args.engine_arg, args.additional_config)
    if engine:
        settings["engine_args"] = engine
    return settings


def config_table(path: str | None, table: str) -> dict:
    from precision import read_toml

    if path is None:
        return {}
    return read_toml(path)[0].get(table, {})


def overrides(pairs: list[str] | None, flag: str) -> dict:
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        try:
            values[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise PrecisionError(f"{flag} {pair!r}: write it as name=number, e.g. {flag} r_logits_fail=1.3")
    return values


def thresholds(path: str | None, pairs: list[str] | None = None):
    """Verdict thresholds: command line over the config file's [thresholds] table over the defaults."""
    from precision import Thresholds

    return Thresholds.from_mapping({**config_table(path, "thresholds"), **overrides(pairs, "--threshold")})


def tolerance(path: str | None, pairs: list[str] | None):
    """Regression tolerances: command line over the config file's [regress] table over the defaults."""
    from precision import RegressTolerance

    return RegressTolerance.from_mapping({**config_table(path, "regress"), **overrides(pairs, "--tolerance")})


def optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None
