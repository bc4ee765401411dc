"""One JSON codec for every typed document, and the JSON Schema generated from the same types.

The documents are frozen dataclasses (precision.contract.documents and its parts). ``decode`` turns parsed JSON
into them, checking every field's type and refusing unknown keys with the path of the offending value;
``encode`` turns them back into JSON-ready values; ``schema_of`` writes the JSON Schema (draft 2020-12) of a type.

Non-finite floats: JSON has no NaN or Infinity, so every document writes them as the strings "NaN", "Infinity"
and "-Infinity" (NON_FINITE_STRINGS), and a float field accepts a number or one of those strings.

Field conventions:
- a field with ``optional_key()`` may be absent from the JSON (its value is then ABSENT, which ``encode`` leaves out);
- a dataclass with ``OPEN_KEYS = True`` keeps keys it does not name in its ``extra`` field (engine- and
  platform-dependent records such as the environment), and writes them back unchanged;
- a field's ``metadata["doc"]`` is its description in the schema (the metric definitions, for metric fields).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from precision.errors import PrecisionError

NON_FINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ContractError(PrecisionError):
    """A document does not match its published schema."""


class _Absent:
    """The value of an optional key the document does not have (distinct from JSON null)."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Any = _Absent()


def optional_key(doc: str | None = None) -> Any:
    """A field that may be absent from the JSON: read as ABSENT when it is, and then left out when written. Used
    for sections that exist only in some runs (a prompt's logits) and for keys added to a schema version after
    documents of that version were written (older files lack them)."""
    return dataclasses.field(default=ABSENT, metadata={"optional_key": True, **({"doc": doc} if doc else {})})


def described(doc: str, **kwargs: Any) -> Any:
    return dataclasses.field(metadata={"doc": doc}, **kwargs)


def encode_float(value: float) -> float | str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def encode(value: Any) -> Any:
    """JSON-ready form of a typed document (or any part of one)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.name == "extra" and getattr(type(value), "OPEN_KEYS", False):
                out.update({k: encode(v) for k, v in item.items()})
            elif item is not ABSENT:
                out[f.name] = encode(item)
        return out
    if isinstance(value, float):
        return encode_float(value)
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def to_plain(value: Any) -> Any:
    """A typed document as plain Python dicts and lists, floats left as floats (NaN included): what the analysis
    and report code read. Open records' extra keys are merged back; absent optional keys stay absent."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.name == "extra" and getattr(type(value), "OPEN_KEYS", False):
                out.update(item)
            elif item is not ABSENT:
                out[f.name] = to_plain(item)
        return out
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=False)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _got(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.40}"


def decode(tp: Any, data: Any, path: str = "$") -> Any:
    """``data`` (parsed JSON) as type ``tp``; ContractError names the path of the first value that does not fit."""
    if tp is Any:
        return data
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, data, path)
    origin = get_origin(tp)
    if _is_union(tp):
        options = get_args(tp)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return decode(option, data, path)
            except ContractError as exc:
                errors.append(str(exc))
        raise ContractError(errors[0] if len(errors) == 1 else f"{path}: {_type_name(data)} fits none of {_describe(tp)}")
    if origin is Literal:
        if data not in get_args(tp):
            raise ContractError(f"{path}: {data!r} is not one of {list(get_args(tp))}")
        return data
    if origin in (list, tuple):
        if not isinstance(data, (list, tuple)):
            raise ContractError(f"{path}: expected a list, got {_type_name(data)}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [decode(item, v, f"{path}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise ContractError(f"{path}: expected an object, got {_type_name(data)}")
        _, value_type = get_args(tp) or (str, Any)
        return {k: decode(value_type, v, f"{path}.{k}") for k, v in data.items()}
    if tp is float:
        if isinstance(data, str) and data in NON_FINITE_STRINGS:
            return NON_FINITE_STRINGS[data]
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return float(data)
        raise ContractError(f"{path}: expected a number, got {_got(data)}")
    if tp is int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
        raise ContractError(f"{path}: expected an integer, got {_got(data)}")
    if tp in (bool, str):
        if isinstance(data, tp):
            return data
        raise ContractError(f"{path}: expected a {'boolean' if tp is bool else 'string'}, got {_got(data)}")
    if tp is type(None):
        if data is None:
            return None
        raise ContractError(f"{path}: expected null, got {_type_name(data)}")
    raise TypeError(f"no JSON codec for {tp!r}")


def _decode_dataclass(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ContractError(f"{path}: expected an object ({cls.__name__}), got {_type_name(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    open_keys = getattr(cls, "OPEN_KEYS", False)
    named = [name for name in fields if not (open_keys and name == "extra")]  # field order: the first problem is reported
    unknown = [k for k in data if k not in fields or (open_keys and k == "extra")]
    if unknown and not open_keys:
        raise ContractError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in {cls.__name__}")
    values: dict[str, Any] = {}
    for name in named:
        f = fields[name]
        if name in data:
            values[name] = decode(hints[name], data[name], f"{path}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ContractError(f"{path}: {cls.__name__} lacks the required key {name!r}")
    if open_keys:
        values["extra"] = {k: data[k] for k in unknown}
    return cls(**values)


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


FLOAT_DEF = "float"
_FLOAT_SCHEMA = {"description": "A number; NaN and Infinity are written as the strings \"NaN\", \"Infinity\", \"-Infinity\".",
                 "anyOf": [{"type": "number"}, {"enum": list(NON_FINITE_STRINGS)}]}


def schema_of(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of ``tp``; dataclasses go into ``defs`` (by class name) and are referenced."""
    if tp is Any:
        return {}
    if dataclasses.is_dataclass(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder first: types may refer to themselves
            defs[name] = _dataclass_schema(tp, defs)
        return {"$ref": f"#/$defs/{name}"}
    origin = get_origin(tp)
    if _is_union(tp):
        return {"anyOf": [schema_of(option, defs) for option in get_args(tp)]}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (list, tuple):
        (item,) = get_args(tp)[:1] or (Any,)
        return {"type": "array", "items": schema_of(item, defs)}
    if origin is dict:
        _, value_type = get_args(tp) or (str, Any)
        return {"type": "object", "additionalProperties": schema_of(value_type, defs)}
    if tp is float:
        defs.setdefault(FLOAT_DEF, _FLOAT_SCHEMA)
        return {"$ref": f"#/$defs/{FLOAT_DEF}"}
    simple = {int: "integer", bool: "boolean", str: "string", type(None): "null"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"no JSON Schema for {tp!r}")


def _dataclass_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = _hints(cls)
    open_keys = getattr(cls, "OPEN_KEYS", False)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        if open_keys and f.name == "extra":
            continue
        prop = schema_of(hints[f.name], defs)
        if "doc" in f.metadata:
            prop = {"description": f.metadata["doc"], **prop}
        properties[f.name] = prop
        if not f.metadata.get("optional_key"):
            required.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required,
                              "additionalProperties": bool(open_keys)}
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses invent a signature docstring when none is written
        schema = {"description": doc, **schema}
    return schema


def document_types(tp: Any) -> typing.Iterator[type]:
    """Every dataclass reachable from ``tp`` (for tests that check each has a description)."""
    defs: dict[str, Any] = {}
    schema_of(tp, defs)
    seen = set()
    stack = [tp]
    while stack:
        current = stack.pop()
        if dataclasses.is_dataclass(current) and current not in seen:
            seen.add(current)
            yield current
            stack.extend(_hints(current).values())
        else:
            stack.extend(get_args(current))
