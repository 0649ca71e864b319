"""The command line: the Typer app (``app``), its entry point (``main``), tables and plots."""

from fibquant_cli.cli.app import app, main

__all__ = ["app", "main"]
