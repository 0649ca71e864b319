"""Reading untrusted input: regular files only, strict JSON, bounded renderings of values.

Every file fibquant reads comes from a user: it is opened only if it is a regular file (a FIFO
would block forever, a device never end), parsed as JSON without duplicate keys and without
integers longer than any size needs, and its values are quoted in errors at a bounded length.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from fibquant_cli.errors import InvalidInputError


def label(value: Any, limit: int = 60) -> str:
    """A one-line, bounded rendering of a value taken from an untrusted header."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DuplicateKey(Exception):
    pass


# JSON integers longer than this are refused while parsing: no size, offset or count needs
# more (2**64 has 20 digits), and Python refuses to convert more than 4300 digits anyway.
MAX_INT_DIGITS = 40


class LongInteger(ValueError):
    """A JSON integer with more than ``MAX_INT_DIGITS`` digits (``args[0]``: its length)."""


def parse_json_int(text: str) -> int:
    """``json.loads``'s ``parse_int`` for untrusted JSON: refuses absurdly long integers."""
    if len(text) > MAX_INT_DIGITS:
        raise LongInteger(len(text.lstrip("-")))
    return int(text)


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def input_path(path: str | os.PathLike) -> Path:
    """An input path as a Path, refusing a name that ends with a separator before ``Path``
    drops it (``kv.safetensors/`` names a folder, never the file ``kv.safetensors``)."""
    text = os.fspath(path)
    if isinstance(text, str) and (text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep))):
        raise InvalidInputError(f"the path ends with {text[-1]!r}, so it names a directory; "
                                "expected a file", path=text)
    return Path(text)


def open_regular(path: str | os.PathLike, what: str = "a safetensors file"):
    """Open an input for binary reading, only if it is a regular file.

    Opened without blocking, then checked: a FIFO would block forever and a device never end.
    """
    path = input_path(path)
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InvalidInputError("no such file", path=where) from None
    except OSError as err:
        raise InvalidInputError(f"cannot read: {err.strerror}", path=where) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InvalidInputError(f"is a directory, expected {what}", path=where)
        if not stat.S_ISREG(mode):
            raise InvalidInputError(f"not a regular file (a FIFO, device or socket), expected "
                                    f"{what}", path=where)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
