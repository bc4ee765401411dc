"""Hand-made test documents made complete: a test writes only the fields its rule reads, and ``complete`` fills
every other required field of the typed document with a neutral value (0, empty, null), so the document passes
the same contract as a real one."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from precision.contract import Comparison


def _neutral(tp: Any) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return complete({}, tp)
    if origin in (Union, types.UnionType):
        return None if type(None) in get_args(tp) else _neutral(get_args(tp)[0])
    if origin is Literal:
        return get_args(tp)[0]
    return {list: [], tuple: [], dict: {}}.get(origin, {float: 0.0, int: 0, str: "", bool: False}.get(tp))


def _fill(tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return complete(value, tp)
    if origin in (Union, types.UnionType):
        options = [o for o in get_args(tp) if o is not type(None)]
        return _fill(options[0], value) if len(options) == 1 else value
    if origin in (list, tuple) and isinstance(value, list):
        (item,) = get_args(tp)[:1] or (Any,)
        return [_fill(item, v) for v in value]
    if origin is dict and isinstance(value, dict):
        _, value_type = get_args(tp)
        return {k: _fill(value_type, v) for k, v in value.items()}
    return value


def complete(partial: dict, tp: type = Comparison) -> dict:
    """``partial`` with every missing required field of ``tp`` (recursively) set to a neutral value."""
    hints = get_type_hints(tp)
    out = dict(partial)
    for f in dataclasses.fields(tp):
        if f.name == "extra" and getattr(tp, "OPEN_KEYS", False):
            continue
        if f.name in out:
            out[f.name] = _fill(hints[f.name], out[f.name])
        elif not f.metadata.get("optional_key"):
            out[f.name] = _neutral(hints[f.name])
    return out
