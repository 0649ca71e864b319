"""Strict reading of a manifest's JSON: exact key sets, exact types, one-line errors naming the
place (``entries[1].shape.head_dim``) and the value found, quoted at a bounded length."""

from __future__ import annotations

import json
from typing import Any

from fibquant_cli.errors import FibQuantError, InvalidInputError


class JsonObject(dict):
    """A JSON object that remembers keys that appeared more than once."""

    duplicates: tuple[str, ...] = ()


def object_pairs(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj = JsonObject()
    seen: list[str] = []
    for key, value in pairs:
        if key in obj and key not in seen:
            seen.append(key)
        obj[key] = value
    obj.duplicates = tuple(seen)
    return obj


def reject_constant(name: str) -> Any:
    raise InvalidInputError(f"invalid JSON: {name} is not a JSON value")


def describe(value: Any) -> str:
    """One-line description of a JSON value for error messages."""
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if value is None:
        return "null"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return "string " + (text if len(text) <= 60 else text[:57] + '..."')
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def quote(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def fail(where: str, reason: str) -> InvalidInputError:
    return InvalidInputError(f"{where}: {reason}")


def expect_object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise fail(where, f"expected an object, found {describe(value)}")
    return value


def check_keys(
    obj: dict, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> None:
    duplicates = getattr(obj, "duplicates", ())
    if duplicates:
        raise fail(where, f"duplicate key {quote(duplicates[0])}")
    allowed = required + optional
    for key in obj:
        if key not in allowed:
            raise fail(where, f"unknown key {quote(key)} (allowed: {', '.join(allowed)})")
    for key in required:
        if key not in obj:
            raise fail(where, f"missing key {quote(key)}")


def expect_int(value: Any, where: str) -> int:
    if type(value) is not int:
        raise fail(where, f"expected an integer, found {describe(value)}")
    return value


def expect_choice(value: Any, where: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise fail(where, f"expected a string, found {describe(value)}")
    if value not in allowed:
        raise fail(where, f"{quote(value)} is not one of {', '.join(allowed)}")
    return value


def expect_names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise fail(where, f"expected a non-empty array of tensor names, found {describe(value)}")
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name:
            found = describe(name)
            raise fail(f"{where}[{index}]", f"expected a non-empty string, found {found}")
    return tuple(value)


def located(err: FibQuantError, where: str) -> FibQuantError:
    return type(err)(f"{where}: {err.reason}", path=err.path, tensor=err.tensor)
