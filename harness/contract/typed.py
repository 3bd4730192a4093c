"""Typed settings: a plain mapping checked against a dataclass's annotations, with one-line errors.

Every setting a user can give (a suite's ``train``/``eval``/``datasets`` sections, a family's
``Config``) is a dataclass whose fields carry types and defaults. :func:`build` turns a mapping (from
YAML, the command line or a stored ``config.json``) into an instance, checking on the way

    * that every key is a field (an unknown key names the closest field);
    * that every value has the field's type: ``bool``, ``int``, ``float`` (an ``int`` is accepted),
      ``str``, ``Optional[...]``, ``Literal[...]`` choices, ``tuple``/``list`` of an element type,
      ``dict``, and nested dataclasses;
    * and whatever the dataclass's ``__post_init__`` checks (ranges, combinations), where a
      ``ValueError`` names the problem.

Each failure is a :class:`~trilemma.contract.errors.TrilemmaError` that names where the value came
from, the key and what is allowed, so that the command line prints one line and nothing runs.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal, Mapping, Union

from trilemma.contract.errors import TrilemmaError

_NONE = type(None)


def build(cls: type, values: Mapping[str, Any] | None, where: str, prefix: str = ""):
    """An instance of dataclass ``cls`` from ``values`` (missing keys take their defaults).

    ``where`` names the source (a file, "command line", "model 'ddpm'"); ``prefix`` is the dotted
    path of ``cls`` inside it, used in messages (``"train."``).
    """
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if not isinstance(key, str) or key not in fields:
            raise TrilemmaError(f"{where}: unknown key '{prefix}{key}'{_suggest(key, fields)}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = check(hints[name], value, f"{prefix}{name}", where)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TrilemmaError(f"{where}: '{prefix}{missing[0]}' is required")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise TrilemmaError(f"{where}: {_prefixed(str(e), prefix)}") from None


def check(tp: Any, value: Any, key: str, where: str) -> Any:
    """``value`` as type ``tp`` (a tuple from a list, a float from an int), or a TrilemmaError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is Union:  # Optional[X] is Union[X, None]
        if value is None and _NONE in args:
            return None
        options = [a for a in args if a is not _NONE]
        same_kind = [a for a in options if _kind(a) == _kind(value)]
        if len(same_kind) == 1:  # the one option of the value's kind: its own, more precise, error
            return check(same_kind[0], value, key, where)
        for option in options:
            try:
                return check(option, value, key, where)
            except TrilemmaError:
                pass
        raise TrilemmaError(f"{where}: '{key}' must be {describe(tp)}, got {_show(value)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):  # True is not 1 here
            return value
        raise TrilemmaError(f"{where}: '{key}' must be one of {', '.join(map(repr, args))}, got {_show(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise TrilemmaError(f"{where}: '{key}' must be a mapping of settings, got {_show(value)}")
        return build(tp, value, where, f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (tuple, list) or origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)):  # list[X], tuple[X, ...]
                items = [check(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value)]
            elif args:  # a fixed-length tuple[X, Y]
                if len(value) != len(args):
                    raise TrilemmaError(f"{where}: '{key}' must have {len(args)} items, got {len(value)}")
                items = [check(a, v, f"{key}[{i}]", where) for i, (a, v) in enumerate(zip(args, value))]
            else:  # a bare tuple or list
                items = list(value)
            return tuple(items) if (tp is tuple or origin is tuple) else items
    elif tp is dict or origin is dict:
        if isinstance(value, Mapping):
            if len(args) == 2:
                return {check(args[0], k, f"{key} key", where): check(args[1], v, f"{key}.{k}", where)
                        for k, v in value.items()}
            return dict(value)
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:  # an annotation this checker does not know: accept, the dataclass may check it
        return value
    raise TrilemmaError(f"{where}: '{key}' must be {describe(tp)}, got {_show(value)}")


def _kind(x: Any) -> str:
    """"mapping", "sequence", "scalar" or "none", of a type annotation or of a value."""
    if isinstance(x, type) or typing.get_origin(x) is not None:
        origin = typing.get_origin(x) or x
        if dataclasses.is_dataclass(x) or origin in (dict, Mapping):
            return "mapping"
        if origin in (list, tuple):
            return "sequence"
        if origin is Literal:
            return "scalar"
        return "none" if x is _NONE else "scalar"
    if isinstance(x, Mapping):
        return "mapping"
    if isinstance(x, (list, tuple)):
        return "sequence"
    return "none" if x is None else "scalar"


def describe(tp: Any) -> str:
    """A type as the error messages write it: "an integer", "one of 'a', 'b'", "a list of integers"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        parts = [describe(a) for a in args if a is not _NONE]
        text = " or ".join(parts)
        return text + (" or null" if _NONE in args else "")
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping"}
    if tp in names:
        return names[tp]
    if tp in (tuple, list) or origin in (tuple, list):
        if args and args[0] is not Ellipsis:
            return f"a list of {_plural(describe(args[0]))}"
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping of settings"
    return getattr(tp, "__name__", str(tp))


def _plural(text: str) -> str:
    return {"an integer": "integers", "a number": "numbers", "a string": "strings",
            "true or false": "booleans"}.get(text, text)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(key: Any, fields: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(key), list(fields), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} (allowed: {', '.join(fields)})" if not close else hint


def _prefixed(message: str, prefix: str) -> str:
    """A ``__post_init__`` message "'lr' must be > 0" as "'train.lr' must be > 0"."""
    if prefix and message.startswith("'"):
        return "'" + prefix + message[1:]
    return message


# --- checks for __post_init__ ---------------------------------------------------------------------

SAFE_NAME = "letters, digits, '_', '-' and '.', starting with a letter or digit (no '/' or '..')"


def require(condition: bool, key: str, allowed: str, value: Any) -> None:
    """Raise the ``ValueError`` that :func:`build` turns into a one-line error naming ``key``."""
    if not condition:
        raise ValueError(f"'{key}' must be {allowed}, got {_show(value)}")


def is_safe_name(name: Any) -> bool:
    """A name usable as one folder: no path separators, no '..', no leading dot or dash."""
    import re

    return isinstance(name, str) and bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", name)) \
        and ".." not in name
