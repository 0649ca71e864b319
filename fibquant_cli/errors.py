"""One exception tree for fibquant; each class carries the CLI exit code it maps to.

Exit codes by class (documented in the README):

* 2 ``UsageError``        -- the request is wrong: options, option combinations, output paths.
* 3 ``InvalidInputError`` -- malformed safetensors / JSON, contract violations, NaN/Inf, shapes.
* 4 ``IntegrityError``    -- a compressed file whose digests or structure do not verify.
* 5 ``ResourceError``     -- a request beyond the memory / size bounds.

Every error carries where it happened -- ``path`` (a file), ``tensor``, ``field`` (a place
inside a document, e.g. ``entries[1].keep_first``) -- and ``reason``. Messages are one line:
where, then what was expected and what was found.

Library code names options by their Python parameter names (``jobs``, ``block_dim``), never by
command-line flags: a ``UsageError`` reason may hold ``{option}`` placeholders listed in
``options``. ``str(err)`` fills them with the parameter names; the CLI fills them with its flags
(``err.render(flag)``) and adds the flag advice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class FibQuantError(Exception):
    """Root of every error fibquant raises on purpose."""

    exit_code = 1

    def __init__(self, reason: str, *, path: str | None = None, tensor: str | None = None,
                 field: str | None = None, options: Sequence[str] = ()):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.field = field
        self.options = tuple(options)
        super().__init__(self.render())

    def render(self, name_option: Callable[[str], str] = str) -> str:
        """The one-line message, with ``{option}`` placeholders named by ``name_option``."""
        parts = []
        if self.path:
            parts.append(self.path)
        if self.tensor:
            parts.append(f"tensor '{self.tensor}'")
        if self.field:
            parts.append(self.field)
        reason = self.reason
        if self.options:
            reason = reason.format(**{o: name_option(o) for o in self.options})
        parts.append(reason)
        return ": ".join(parts)

    def at(self, *, path: str | None = None, tensor: str | None = None,
           field: str | None = None) -> FibQuantError:
        """The same error with a file, tensor and/or field filled in (where not yet set)."""
        return type(self)(self.reason, path=self.path or (None if path is None else str(path)),
                          tensor=self.tensor or tensor, field=self.field or field,
                          options=self.options)


    def moved(self, path: str) -> FibQuantError:
        """The same error at ``path`` in place of its own: for a file the user never named
        (a command's temporary file), which the message should not send them to."""
        return type(self)(self.reason, path=path, tensor=self.tensor, field=self.field,
                          options=self.options)


class UsageError(FibQuantError):
    """The request itself is wrong: options, option combinations, output paths."""

    exit_code = 2


class OutputExistsError(UsageError):
    """An output exists and overwriting was not asked for (the CLI adds: use --force)."""

    def __init__(self, reason: str = "output exists (use {force} to overwrite)", **where):
        where.setdefault("options", ("force",))
        super().__init__(reason, **where)


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


def output_failure(err: OSError, path) -> FibQuantError:
    """An OS error while writing an output: out of space is a resource bound, the rest usage."""
    import errno

    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ResourceError(f"cannot write output: {err.strerror}", path=str(path))
    return UsageError(f"cannot write output: {err.strerror or err}", path=str(path))


class Interrupted(BaseException):  # noqa: N818 -- like KeyboardInterrupt, not an error
    """SIGTERM or SIGHUP arrived: unwinds like KeyboardInterrupt, so outputs are cleaned up."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"signal {signum}")
