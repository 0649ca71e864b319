"""Progress bars on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

from fibquant_cli.cli import console
from fibquant_cli.ops.progress import Progress


class RichProgress(Progress):
    """A rich progress bar as the operations' progress sink."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("{task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                       console=console.stderr(), transient=True,
                       disable=not console.stderr().is_terminal)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def start(self, total: int, label: str) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(label, total=total)

    def advance(self, label: str) -> None:
        if self.task is not None:
            self.bar.update(self.task, advance=1)

    def note(self, text: str) -> None:
        """One line on stderr, terminal or not (a long wait should never be silent)."""
        self.bar.console.print(f"fibquant: {text}", markup=False, highlight=False)
