"""A plugin's parameters: a pydantic model, a dataclass, or none, behind one interface.

The SDK does not depend on pydantic: a plugin environment may not have it (or have another major
version). A plugin therefore declares its parameters as a pydantic model *if its environment has
pydantic*, or as a standard-library dataclass, or not at all; the node only ever calls
:func:`validate`, :func:`schema` and :func:`dump` (through ``PluginInfo``), so every form checks
values the same way, reports errors the same way (:class:`ParamsError`) and describes itself with a
JSON schema (which the node uses to check a rule's parameters for a plugin in another environment).

Dataclass fields are checked like pydantic's lax mode, for the types parameters have in practice:
``int``, ``float``, ``str``, ``bool``, ``Literal``, ``Enum``, ``Path``, ``Optional``/``Union``,
``list``/``tuple``/``dict`` of those, and nested dataclasses. A field of another type takes the
value as given. ``__post_init__`` may check more and raise ``ValueError``. A field's
``metadata={"description": "..."}`` goes into the schema.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import typing
from pathlib import Path
from typing import Any, Union, cast

__all__ = ["NoParams", "ParamsError", "check_params_type", "dump", "schema", "validate"]

#: One problem: where (a path of keys and indexes), what, and pydantic's name for its kind.
ErrorDict = dict[str, Any]


class ParamsError(ValueError):
    """A plugin's parameters are not valid; ``errors()`` lists each problem (pydantic's shape: loc, msg, type, input)."""

    def __init__(self, errors: list[ErrorDict]) -> None:
        self._errors = errors
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '(parameters)'}: {e['msg']}" for e in errors]
        super().__init__("invalid parameters: " + "; ".join(parts))

    def errors(self) -> list[ErrorDict]:
        return list(self._errors)


@dataclasses.dataclass(frozen=True)
class NoParams:
    """A plugin without parameters: any parameter given is an error."""


# -- which form ------------------------------------------------------------------


def _pydantic_major(cls: Any) -> int:
    """2 or 1 for a pydantic model class (v1 also as ``pydantic.v1``), 0 for anything else."""
    if not isinstance(cls, type):
        return 0
    try:
        import pydantic
    except ImportError:
        return 0
    if issubclass(cls, pydantic.BaseModel):
        return 2 if hasattr(cls, "model_validate") else 1
    try:
        from pydantic import v1
    except ImportError:
        return 0
    return 1 if issubclass(cls, v1.BaseModel) else 0


def check_params_type(cls: Any, plugin: str) -> type:
    """``cls`` if it is a form of parameters the SDK handles (None means NoParams), else a TypeError saying so."""
    if cls is None:
        return NoParams
    if _pydantic_major(cls) or (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return cast(type, cls)
    raise TypeError(f"plugin {plugin!r}: its parameters must be a dataclass, a pydantic model or None (got {cls!r})")


# -- the three operations -----------------------------------------------------------


def validate(cls: type, data: dict[str, Any] | None) -> Any:
    """``data`` (a rule's ``params``) as an instance of ``cls``; raises :class:`ParamsError` listing every problem."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ParamsError([_err((), "parameters must be a table of names and values", "dict_type", data)])
    major = _pydantic_major(cls)
    if major:
        try:
            return cls.model_validate(data) if major == 2 else cls.parse_obj(data)  # type: ignore[attr-defined]
        except ValueError as e:  # pydantic's ValidationError (v1 and v2) is a ValueError
            if not hasattr(e, "errors"):
                raise ParamsError([_err((), str(e), "value_error", data)]) from None
            found = [
                _err(
                    tuple(x.get("loc", ())),
                    str(x.get("msg", "")).replace("Value error, ", "", 1),
                    str(x.get("type", "")),
                    x.get("input"),
                )
                for x in e.errors()
            ]
            raise ParamsError(found) from None
    errors: list[ErrorDict] = []
    value = _dataclass(cls, data, (), errors)
    if errors:
        raise ParamsError(errors)
    return value


def schema(cls: type) -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of ``cls``: what ``dicom-node plugins`` shows and the node checks against."""
    major = _pydantic_major(cls)
    if major == 2:
        return cls.model_json_schema()  # type: ignore[attr-defined,no-any-return]
    if major == 1:
        return json.loads(cls.schema_json())  # type: ignore[attr-defined,no-any-return]
    return _dataclass_schema(cls)


def dump(cls: type, obj: Any) -> dict[str, Any]:
    """``obj`` (an instance of ``cls``) as JSON-able values, defaults included: what the outputs record."""
    major = _pydantic_major(type(obj)) or _pydantic_major(cls)
    if major == 2:
        return obj.model_dump(mode="json")  # type: ignore[no-any-return]
    if major == 1:
        return json.loads(obj.json())  # type: ignore[no-any-return]
    return _plain(obj)  # type: ignore[no-any-return]


# -- dataclasses ---------------------------------------------------------------------


def _err(loc: tuple[Any, ...], msg: str, kind: str, value: Any) -> ErrorDict:
    return {"loc": loc, "msg": msg, "type": kind, "input": value}


def _hints(cls: type) -> dict[str, Any]:
    """The fields' types, resolved one by one when they cannot be all at once.

    On Python 3.9 ``get_type_hints`` cannot evaluate ``str | None`` (written with ``from __future__ import
    annotations``); such a field is read as the Union it means. A type that cannot be resolved at all is
    ``Any``: an odd annotation must not make the plugin unusable.
    """
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001
        pass
    module = sys.modules.get(cls.__module__)
    namespace = dict(vars(module)) if module is not None else {}
    return {f.name: _resolve(f.type, namespace) for f in dataclasses.fields(cls)}


def _resolve(annotation: Any, namespace: dict[str, Any]) -> Any:
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, namespace)  # noqa: S307 (what typing.get_type_hints does with annotations)
    except TypeError:
        parts = _top_level(annotation, "|")
        if len(parts) > 1:
            return Union[tuple(_resolve(p, namespace) for p in parts)]  # noqa: UP007 (for Python 3.9)
    except Exception:  # noqa: BLE001
        pass
    return Any


def _top_level(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


_MISSING = dataclasses.MISSING


def _dataclass(cls: type, data: Any, loc: tuple[Any, ...], errors: list[ErrorDict]) -> Any:
    if not isinstance(data, dict):
        errors.append(_err(loc, "Input should be a table of names and values", "dict_type", data))
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    values: dict[str, Any] = {}
    before = len(errors)
    for key in data:
        if key not in fields:
            errors.append(_err((*loc, key), "Extra inputs are not permitted", "extra_forbidden", data[key]))
    for name, f in fields.items():
        if name in data:
            values[name] = _coerce(hints.get(name, Any), data[name], (*loc, name), errors)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            errors.append(_err((*loc, name), "Field required", "missing", data))
    if len(errors) > before:
        return None
    try:
        return cls(**values)
    except (ValueError, TypeError, AssertionError) as e:  # what __post_init__ says
        errors.append(_err(loc, str(e) or type(e).__name__, "value_error", data))
        return None


def _is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Union:
        return True
    union_type = getattr(__import__("types"), "UnionType", None)  # X | Y on Python 3.10+
    return union_type is not None and origin is union_type


def _coerce(tp: Any, value: Any, loc: tuple[Any, ...], errors: list[ErrorDict]) -> Any:
    """``value`` as ``tp``, pydantic-lax style; appends to ``errors`` (and returns None) when it is not one."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            trial: list[ErrorDict] = []
            got = _coerce(option, value, loc, trial)
            if not trial:
                return got
        names = " or ".join("None" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
        errors.append(_err(loc, f"Input should be {names}", "union_type", value))
        return None
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        allowed = ", ".join(repr(a) for a in args)
        errors.append(_err(loc, f"Input should be {allowed}", "literal_error", value))
        return None
    if origin in (list, tuple, set, frozenset) or origin is _abc("Sequence"):
        return _sequence(tp, origin, args, value, loc, errors)
    if origin is dict or origin is _abc("Mapping"):
        if not isinstance(value, dict):
            errors.append(_err(loc, "Input should be a valid dictionary", "dict_type", value))
            return None
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(vt, v, (*loc, k), errors) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append(_err(loc, "Input should be a valid boolean", "bool_type", value))
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        errors.append(_err(loc, "Input should be a valid integer", "int_type", value))
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        errors.append(_err(loc, "Input should be a valid number", "float_type", value))
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        errors.append(_err(loc, "Input should be a valid string", "string_type", value))
        return None
    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, (str, Path)):
            return tp(value)
        errors.append(_err(loc, "Input should be a path (a string)", "path_type", value))
        return None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            errors.append(_err(loc, f"Input should be {allowed}", "enum", value))
            return None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, loc, errors)
    return value  # a type this module does not check: the plugin gets the value as given


def _abc(name: str) -> Any:
    import collections.abc

    return getattr(collections.abc, name)


def _sequence(
    tp: Any, origin: Any, args: tuple[Any, ...], value: Any, loc: tuple[Any, ...], errors: list[ErrorDict]
) -> Any:
    if not isinstance(value, (list, tuple)):
        errors.append(_err(loc, "Input should be a valid list", "list_type", value))
        return None
    is_tuple = origin is tuple
    if is_tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            errors.append(_err(loc, f"Input should have {len(args)} items, not {len(value)}", "tuple_length", value))
            return None
        return tuple(_coerce(t, v, (*loc, i), errors) for i, (t, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [_coerce(item, v, (*loc, i), errors) for i, v in enumerate(value)]
    if is_tuple:
        return tuple(items)
    if origin in (set, frozenset):
        return origin(items)
    return items


def _type_schema(tp: Any) -> dict[str, Any]:
    if tp is Any or tp is object:
        return {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return {"anyOf": [{"type": "null"} if a is type(None) else _type_schema(a) for a in args]}
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        out: dict[str, Any] = {"enum": list(args)}
        simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
        if len(kinds) == 1 and next(iter(kinds)) in simple:
            out["type"] = simple[next(iter(kinds))]
        return out
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        return {
            "type": "array",
            "prefixItems": [_type_schema(a) for a in args],
            "minItems": len(args),
            "maxItems": len(args),
        }
    if origin in (list, tuple, set, frozenset, _abc("Sequence")):
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin in (dict, _abc("Mapping")):
        return {"type": "object", "additionalProperties": _type_schema(args[1]) if len(args) == 2 else {}}
    simple_types = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple_types:
        return {"type": simple_types[tp]}
    if isinstance(tp, type) and issubclass(tp, Path):
        return {"type": "string", "format": "path"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_schema(tp)
    return {}


def _dataclass_schema(cls: type) -> dict[str, Any]:
    hints = _hints(cls)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        p = {"title": f.name.replace("_", " ").title(), **_type_schema(hints.get(f.name, Any))}
        if f.metadata.get("description"):
            p["description"] = str(f.metadata["description"])
        if f.default is not _MISSING:
            p["default"] = _plain(f.default)
        elif f.default_factory is not _MISSING:
            p["default"] = _plain(f.default_factory())
        else:
            required.append(f.name)
        props[f.name] = p
    out: dict[str, Any] = {"title": cls.__name__, "type": "object", "properties": props, "additionalProperties": False}
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(f"{cls.__name__}("):  # not the signature dataclasses make up
        out["description"] = doc
    if required:
        out["required"] = required
    return out


def _plain(value: Any) -> Any:
    """``value`` as JSON types: dataclasses as objects, tuples as lists, enums by value, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):  # a numpy scalar
        return value.item()
    return str(value)
