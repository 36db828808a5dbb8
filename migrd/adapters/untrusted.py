"""Reading data migrd did not just write itself: peers' snapshots, journals, manifests, admin
requests. Every reader goes through `loads` (JSON with bounded nesting) and `build` (a frozen
dataclass from the parsed value, every field's type checked), so malformed input of any shape
becomes the reader's own documented error naming the file or peer, never a TypeError or a
RecursionError out of the middle of the agent.

Unknown keys are ignored: a newer migrd may add fields, and an older reader must still read
what it knows. A known key of the wrong type is an error, and so is, in one of several kinds of
object, a key of another kind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal

from migrd.errors import MigrdError

#: Deeper than anything migrd writes (a manifest is 4 levels), shallow enough that no reader
#: recurses near Python's limit.
MAX_DEPTH = 32


def loads(data: str | bytes, error: type[MigrdError], origin: str) -> Any:
    """json.loads that raises `error` ("origin: ...") for anything but valid JSON nested at
    most MAX_DEPTH deep."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise error(f"{origin}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, invalid UTF-8, an integer of too many digits
        raise error(f"{origin}: not valid JSON ({e})") from None
    if depth(value) > MAX_DEPTH:
        raise error(f"{origin}: JSON nested more than {MAX_DEPTH} levels deep")
    return value


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            d += 1
            deepest = max(deepest, d)
            stack.extend((item, d) for item in v)
    return deepest


class _Shape(Exception):
    """Internal: where in the value and what is wrong; `build` turns it into the caller's error."""


def build(tp: Any, value: Any, error: type[MigrdError], origin: str) -> Any:
    """`value` (parsed JSON) as type `tp`: a dataclass (from an object; unknown keys ignored,
    missing keys without a default refused), int, float (finite), str, bool, Any, Literal,
    X | None, a union of dataclasses told apart by a `kind: Literal["..."]` field each,
    tuple[X, ...], tuple[X, Y], list[X], dict[str, X]. Raises `error` naming the key path."""
    try:
        return _build(tp, value, "")
    except _Shape as e:
        raise error(f"{origin}: {e}") from None


def _what(path: str) -> str:
    return f"key '{path}'" if path else "the top level"


def _build(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _build(inner[0], value, path)
        return _build_tagged(inner, value, path)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # is_dataclass is true of instances too
        if not isinstance(value, dict):
            raise _Shape(f"{_what(path)}: expected an object, got {_kind(value)}")
        hints = typing.get_type_hints(tp)
        out = {}
        for f in dataclasses.fields(tp):
            sub = f"{path}.{f.name}" if path else f.name
            if f.name in value:
                out[f.name] = _build(hints[f.name], value[f.name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Shape(f"{_what(sub)} is missing")
        return tp(**out)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise _Shape(f"{_what(path)}: expected one of {', '.join(map(repr, args))}, got {short(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise _Shape(f"{_what(path)}: expected a list, got {_kind(value)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Shape(f"{_what(path)}: expected {len(args)} items, got {len(value)}")
            return tuple(_build(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        items = [_build(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _Shape(f"{_what(path)}: expected an object, got {_kind(value)}")
        return {k: _build(args[1], v, f"{path}.{k}" if path else k) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _Shape(f"{_what(path)}: expected true or false, got {short(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Shape(f"{_what(path)}: expected an integer, got {short(value)}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise _Shape(f"{_what(path)}: expected a finite number, got {short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Shape(f"{_what(path)}: expected a string, got {short(value)}")
        return value
    raise TypeError(f"unsupported type {tp}")  # a migrd bug, not bad input


def _tag(tp: Any) -> str:
    """The one value of a tagged union member's `kind: Literal[...]` field."""
    hint = typing.get_type_hints(tp).get("kind") if dataclasses.is_dataclass(tp) else None
    if typing.get_origin(hint) is not Literal or len(typing.get_args(hint)) != 1:
        raise TypeError(f"unsupported union member {tp}: no kind field")  # a migrd bug, not bad input
    return typing.get_args(hint)[0]


def _build_tagged(members: list[Any], value: Any, path: str) -> Any:
    """One of several dataclasses, the one its `kind` names. A key that belongs to another
    member and not to this one is refused: such an object is none of them, and guessing which
    one was meant would act on a mixture."""
    by_kind = {_tag(m): m for m in members}
    if not isinstance(value, dict):
        raise _Shape(f"{_what(path)}: expected an object, got {_kind(value)}")
    kind_path = f"{path}.kind" if path else "kind"
    if "kind" not in value:
        raise _Shape(f"{_what(kind_path)} is missing")
    kind = value["kind"]
    if not isinstance(kind, str) or kind not in by_kind:
        raise _Shape(f"{_what(kind_path)}: expected one of {', '.join(map(repr, by_kind))}, got {short(kind)}")
    tp = by_kind[kind]
    own = {f.name for f in dataclasses.fields(tp)}
    foreign = sorted(({f.name for m in members for f in dataclasses.fields(m)} - own) & value.keys())
    if foreign:
        key = f"{path}.{foreign[0]}" if path else foreign[0]
        raise _Shape(f"{_what(key)} does not belong to kind {kind!r}")
    return _build(tp, value, path)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def short(value: Any) -> str:
    if isinstance(value, int) and value.bit_length() > 64:
        return "a very large integer"  # repr of a huge int can itself fail (int_max_str_digits)
    if value is None or isinstance(value, bool):
        return json.dumps(value)  # null, true, false: as the sender wrote them
    text = repr(value) if isinstance(value, (str, int, float)) else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."
