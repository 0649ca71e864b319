"""The progress sink operations report to; the CLI draws it on stderr."""

from __future__ import annotations


class Progress:
    """Progress sink: the library default does nothing."""

    def start(self, total: int, label: str) -> None:
        """A new phase of ``total`` steps begins."""

    def advance(self, label: str) -> None:
        """One step of the current phase is done."""

    def note(self, text: str) -> None:
        """Tell the user something before a long step (a codebook training)."""
