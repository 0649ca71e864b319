"""The one way fibquant publishes an output: check, temporary file, fsync, rename, fsync folder.

Every file fibquant writes (compressed files, restored dumps and their manifests, plots,
codebook cache entries) goes through ``publishing``:

1. ``check_output`` refuses a path that is not a new name in an existing folder or an existing
   regular file (folders, symlinks -- dangling ones too --, devices, FIFOs, sockets), a path
   that is one of the inputs, and an existing file unless ``force``;
2. the caller writes each output to a temporary file beside it, named
   ``.fibquant-<pid>-<random>.tmp`` (short, so a legal output name never makes an illegal
   temporary one; the pid lets a later run remove what a killed run left);
3. on success each temporary file is fsynced, the checks are repeated (another process may
   have created an output meanwhile), each is renamed over its output, and each folder is
   fsynced so the rename itself survives a crash;
4. on any exception -- ``KeyboardInterrupt`` and ``Interrupted`` (SIGTERM, SIGHUP: see
   ``install_signal_handlers``) included -- the temporary files are removed and no output is
   touched. Several outputs (a dump and its manifest) are published together or not at all
   (up to the renames themselves, which follow one another).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from fibquant_cli.errors import FibQuantError, Interrupted, OutputExistsError, UsageError, output_failure

TEMP_PREFIX = ".fibquant-"
_TEMP_NAME = re.compile(r"^\.fibquant-(\d+)-[0-9a-f]{12}\.tmp$")


def check_output(path: str | os.PathLike, *, force: bool,
                 inputs: Mapping[str | os.PathLike, str] | None = None) -> Path:
    """``path`` as a Path, if fibquant may write it; otherwise a one-line ``UsageError``.

    ``inputs`` maps the files the command reads to what they are ("input file", "manifest
    file"), so the error says which one the output would destroy.
    """
    text = os.fspath(path)
    path = Path(text)
    where = {"path": text}
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise UsageError("output path is a directory", **where)
    if not path.parent.is_dir():
        raise UsageError(f"output directory {path.parent} does not exist", **where)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise UsageError(f"cannot inspect output: {err.strerror}", **where) from None
    for source, what in (inputs or {}).items():
        if _same_file(path, Path(source)):
            raise UsageError(f"output is the {what}", **where)
    if st is None:
        return path
    if stat.S_ISDIR(st.st_mode):
        raise UsageError("output path is a directory", **where)
    if stat.S_ISLNK(st.st_mode):
        raise UsageError("output path is a symbolic link; fibquant does not write through or "
                         "replace links", **where)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError("output path exists and is not a regular file (a device, FIFO or "
                         "socket); fibquant only replaces regular files", **where)
    if not force:
        raise OutputExistsError(**where)
    return path


def output_path(path: str | os.PathLike) -> Path:
    """An output path as a Path, refusing a name that ends with a separator before ``Path``
    drops it (``-o newdir/`` names a folder, never a file ``newdir``)."""
    text = os.fspath(path)
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise UsageError("output path ends with a separator, so it names a directory; "
                         "give a file name", path=text)
    return Path(text)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def temp_path_for(output: Path) -> Path:
    """A fresh temporary name in ``output``'s folder (so the final rename is atomic)."""
    return output.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.tmp")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files of fibquant runs that no longer exist; returns them."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_NAME.match(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(folder / name)
                removed.append(folder / name)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextmanager
def publishing(outputs: Sequence[str | os.PathLike], *, force: bool,
               inputs: Mapping[str | os.PathLike, str] | None = None) -> Iterator[list[Path]]:
    """Yield one temporary path per output; on a clean exit publish them all (see module)."""
    targets = [check_output(o, force=force, inputs=inputs) for o in outputs]
    for folder in {t.parent for t in targets}:
        remove_stale_temporaries(folder)
    temps = [temp_path_for(t) for t in targets]
    try:
        try:
            yield temps
        except FibQuantError as err:  # name the output, never its temporary
            named = {str(tmp): str(target) for tmp, target in zip(temps, targets)}
            if err.path not in named:
                raise
            raise type(err)(err.reason, path=named[err.path], tensor=err.tensor,
                            field=err.field, options=err.options) from None
        for target in targets:  # late conflicts: someone created an output meanwhile
            check_output(target, force=force, inputs=inputs)
        try:
            for tmp in temps:
                fsync_file(tmp)
            for tmp, target in zip(temps, targets):
                os.replace(tmp, target)
        except OSError as err:
            raise output_failure(err, targets[0]) from None
        for folder in dict.fromkeys(t.parent for t in targets):
            fsync_folder(folder)
    finally:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: Path) -> None:
    """Persist a rename; not every platform lets a folder be opened, hence best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into ``Interrupted`` so ``publishing`` cleans up as for ^C.

    Called by the CLI only (a library must not take over a host program's signals).
    """
    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), raise_interrupted)
