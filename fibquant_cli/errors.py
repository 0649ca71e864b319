"""One exception tree for fibquant; each class carries the CLI exit code it maps to.

Exit codes by class (documented in the README):

* 2 ``UsageError``      -- bad flags or arguments, output path conflicts.
* 3 ``InvalidInputError`` -- malformed safetensors / JSON, contract violations, NaN/Inf, shapes.
* 4 ``IntegrityError``  -- a compressed file whose digests or structure do not verify.
* 5 ``ResourceError``   -- a request beyond the memory / size bounds.

Messages are one line: where (file, tensor), then what was expected and what was found.
"""

from __future__ import annotations


class FibQuantError(Exception):
    """Root of every error fibquant raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        self.reason = message
        self.path = path
        self.tensor = tensor
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.path:
            parts.append(str(self.path))
        if self.tensor:
            parts.append(f"tensor '{self.tensor}'")
        parts.append(self.reason)
        return ": ".join(parts)

    def at(self, *, path: str | None = None, tensor: str | None = None) -> "FibQuantError":
        """Return the same error with a file and/or tensor location filled in (if not set)."""
        err = type(self)(
            self.reason,
            path=self.path or (str(path) if path is not None else None),
            tensor=self.tensor or tensor,
        )
        return err


class UsageError(FibQuantError):
    """The request itself is wrong: flags, option combinations, output paths."""

    exit_code = 2


class InvalidInputError(FibQuantError):
    """An input file or value that breaks the rules (format, contract, finiteness)."""

    exit_code = 3


class ProfileError(InvalidInputError):
    """A quantizer profile that cannot be built (d, k, N out of range)."""


class IntegrityError(FibQuantError):
    """A compressed file or cache entry whose digests or structure do not verify."""

    exit_code = 4


class ResourceError(FibQuantError):
    """A request that would exceed a memory or size bound."""

    exit_code = 5
