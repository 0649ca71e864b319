"""Errors as users see them: one line on stderr, the class's exit code, flags not parameters.

Library errors (``fibquant_cli.errors``) name options by parameter name; ``flag`` renders them.
Typer's own usage errors become one line too (``OneLineErrors``). Tracebacks only with
``--debug`` (``state["debug"]``).
"""

from __future__ import annotations

import functools
import sys

import typer
from typer.core import TyperGroup

from fibquant_cli.cli import console
from fibquant_cli.errors import FibQuantError, Interrupted

state = {"debug": False}


def flag(option: str) -> str:
    """The command-line flag of a library option name: ``key_block_dim`` -> ``--key-block-dim``."""
    return "--" + option.replace("_", "-")


class OneLineErrors(TyperGroup):
    """Usage errors (unknown flags, bad values, missing arguments) as one line, exit 2.

    Click's exceptions are matched by what they carry (``format_message``, ``exit_code``):
    Typer vendors its own copy of click, so their classes depend on the Typer version.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        except Exception as err:
            if not (hasattr(err, "format_message") and hasattr(err, "exit_code")):
                if type(err).__name__ != "Abort":
                    raise
                console.stderr().print("fibquant: aborted")
                code = 1
            elif type(err).__name__ == "NoArgsIsHelpError":
                print(err.ctx.get_help())
                code = err.exit_code
            else:
                ctx = getattr(err, "ctx", None)
                path = ctx.command_path if ctx is not None else "fibquant"
                console.print_error(f"{path}: {err.format_message()} (see '{path} --help')")
                code = err.exit_code
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def handle_errors(func):
    """Turn FibQuantError into a one-line message and its class's exit code (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FibQuantError as err:
            if state["debug"]:
                raise
            console.print_error(err.render(flag))
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            console.stderr().print("fibquant: interrupted")
            raise typer.Exit(130) from None
        except Interrupted as sig:
            console.stderr().print(f"fibquant: stopped by signal {sig.signum}")
            raise typer.Exit(128 + sig.signum) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:  # a bug: say so in one line, keep the traceback for --debug
            if state["debug"]:
                raise
            console.print_error(f"internal error: {type(err).__name__}: {err} (rerun with --debug)")
            raise typer.Exit(1) from None

    return wrapper
