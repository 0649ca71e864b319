"""stdout and stderr for the CLI: rich consoles made on first use (rich costs start-up time),
the one-line error, and JSON output."""

from __future__ import annotations

import functools
import json
import os
import sys


def _console(**kwargs):
    """Wide tables when piped (rich would squeeze them to 80 columns); COLUMNS still wins."""
    from rich.console import Console

    console = Console(highlight=False, **kwargs)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=140, **kwargs)
    return console


@functools.cache
def stdout():
    return _console()


@functools.cache
def stderr():
    return _console(stderr=True)


def print_error(message: str) -> None:
    """``fibquant: error: ...`` on one line of stderr; the message is never read as markup."""
    sys.stderr.write("fibquant: error: " + " ".join(message.split()) + "\n")


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def show(rep, as_json: bool, table) -> None:
    """A command's result: its ``to_json()`` with ``--json``, else ``table(rep)`` on stdout
    (``table`` from cli.tables, imported by the caller only when a table is wanted)."""
    if as_json:
        print_json(rep.to_json())
    else:
        stdout().print(table(rep))
