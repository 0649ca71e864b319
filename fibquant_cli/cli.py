"""The Typer app: thin commands that check flags, call one service function, print a result.

Errors are mapped to exit codes here, inside the app, so tests see what users see.
"""

from __future__ import annotations

import functools
import sys
from typing import Annotated, Optional

import typer

from . import report
from .errors import FibQuantError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compress transformer KV-cache safetensors dumps with FibQuant vector quantization.",
)
_state = {"debug": False}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="Seed of rotation and codebook.")]


def handle_errors(func):
    """Turn FibQuantError into a one-line message and its class's exit code (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except FibQuantError as err:
            if _state["debug"]:
                raise
            report.stderr.print(f"[red]fibquant: error:[/red] {err}", markup=True, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            report.stderr.print("fibquant: interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:  # a bug: say so in one line, keep the traceback for --debug
            if _state["debug"]:
                raise
            report.stderr.print(
                f"fibquant: internal error: {type(err).__name__}: {err} (rerun with --debug)",
                markup=False, soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


@app.command()
@handle_errors
def codebook(
    head_dim: Annotated[int, typer.Option("--head-dim", help="Vector length d.")] = 64,
    block_dim: Annotated[int, typer.Option("--block-dim", help="Block length k.")] = 2,
    size: Annotated[int, typer.Option("--size", help="Codebook size N.")] = 64,
    seed: SeedOpt = 0,
    eval_vectors: Annotated[int, typer.Option(
        "--eval-vectors", min=1000, help="Fresh unit vectors for D_unit.")] = 100_000,
    as_json: JsonOpt = False,
) -> None:
    """Build or load a codebook and measure its distortion against scalar and Shannon."""
    from .core.params import Profile
    from .service import codebook_report

    rep = codebook_report(Profile(head_dim, block_dim, size, seed), eval_vectors)
    if as_json:
        report.print_json(rep.to_json())
    else:
        report.stdout.print(report.codebook_table(rep))


def main() -> None:
    app(prog_name="fibquant")
