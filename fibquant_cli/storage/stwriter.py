"""Write safetensors files tensor by tensor with bounded memory, published atomically.

``StreamWriter`` writes the header up front, then the tensor bytes in header order (chunks
along axis 0). By default it publishes through ``storage.publish``: the bytes go to a
temporary file beside the output, which replaces the output only when every tensor is complete.
With ``publish=False`` it writes straight to ``path`` (which must not exist): for callers that
publish several outputs together inside their own ``publishing`` block. ``write_file`` is the
one-shot form. The header is canonical (``stfile.header_bytes``): compact JSON padded with
spaces to a multiple of 8 bytes; tensors are stored in the order given, not sorted.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fibquant_cli.errors import InvalidInputError, output_failure
from fibquant_cli.formats.dtypes import NUMPY_DTYPES, little_endian, st_dtype_for, st_dtype_of_numpy
from fibquant_cli.formats.stfile import RawTensor, TensorInfo, header_bytes, label, plan_layout
from fibquant_cli.storage.publish import publishing

# Bytes written between two background syncs (see StreamWriter._start_writeback).
WRITEBACK_BYTES = 4 << 20


class StreamWriter:
    """Write a safetensors file tensor by tensor, in chunks along axis 0, with bounded memory.

    Chunks of each tensor must arrive in header order; a tensor is complete when its declared
    byte count has been written (zero-size tensors need no call).  The file appears at `path`
    only when the with-block exits cleanly and every tensor is complete.

    Example::

        with StreamWriter("out.safetensors", [("k", "F16", (8, 64))]) as out:
            for rows in np.split(keys, 4):
                out.write("k", rows)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Sequence[tuple[str, str, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
        *,
        force: bool = False,
        publish: bool = True,
    ):
        self.path = Path(path)
        self.layout = plan_layout(specs, str(self.path))
        self._header = header_bytes(self.layout, metadata, str(self.path))
        self._publishing = publishing([self.path], force=force) if publish else None
        self._positions = {info.name: i for i, info in enumerate(self.layout)}
        self._written = [0] * len(self.layout)
        self._current = 0
        self._unsynced = 0
        self._file = None
        self._syncing: threading.Thread | None = None
        self._sync_error: OSError | None = None

    def __enter__(self) -> StreamWriter:
        target = self.path
        if self._publishing is not None:
            (target,) = self._publishing.__enter__()
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                         0o666)
            self._file = os.fdopen(fd, "wb")
            self._file.write(self._header)
        except OSError as err:
            self._close()
            raise output_failure(err, self.path) from None
        except BaseException:
            self._close()
            raise
        return self

    def write(self, name: str, chunk: np.ndarray | bytes | bytearray | memoryview) -> None:
        """Append `chunk` (rows along axis 0, or raw bytes) to tensor `name`."""
        if self._file is None:
            raise RuntimeError("StreamWriter.write called outside its with-block")
        info = self._advance(name)
        where = {"path": str(self.path), "tensor": label(name)}
        data = self._chunk_bytes(info, chunk, where)
        i = self._positions[name]
        if self._written[i] + data.nbytes > info.n_bytes:
            raise InvalidInputError(
                f"chunk of {data.nbytes} bytes overflows the tensor: {self._written[i]} of "
                f"{info.n_bytes} bytes already written",
                **where,
            )
        try:
            self._file.write(data)
            self._unsynced += data.nbytes
            if self._unsynced >= WRITEBACK_BYTES:
                self._start_writeback()
        except OSError as err:
            raise output_failure(err, self.path) from None
        self._written[i] += data.nbytes

    def _start_writeback(self) -> None:
        """Sync what is written so far in a background thread while the caller goes on
        (decoding the next tensors), so the final fsync finds the pages on disk already.

        Hints do not do it here: after ``posix_fadvise(DONTNEED)`` or ``sync_file_range``
        the final fsync of 19 MB on ext4 still took 26-31 ms, as without them, a fifth of a
        decompress. At most one sync runs at a time; the final fsync (``storage.publish``)
        still makes the file durable, and a sync's error fails the write as its own would.
        """
        self._file.flush()
        self._unsynced = 0
        if self._syncing is not None and self._syncing.is_alive():
            return
        self._syncing = threading.Thread(target=self._datasync, args=(self._file.fileno(),),
                                         name="fibquant-sync", daemon=True)
        self._syncing.start()

    def _datasync(self, fd: int) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
        except OSError as err:
            self._sync_error = err

    def _join_sync(self) -> None:
        """Wait for a background sync (before the file closes: its descriptor must stay open)."""
        if self._syncing is not None:
            self._syncing.join()
            self._syncing = None

    def replace_metadata(self, metadata: Mapping[str, str] | None) -> None:
        """Rewrite the header's metadata in place; the new header must have the same length.

        Lets a writer put digests of the data into the header after streaming the data: write
        placeholders of the final length first (e.g. a digest of zeros), then the real values.
        """
        if self._file is None:
            raise RuntimeError("StreamWriter.replace_metadata called outside its with-block")
        header = header_bytes(self.layout, metadata, str(self.path))
        if len(header) != len(self._header):
            raise ValueError(f"new header is {len(header)} bytes, the placeholder {len(self._header)}")
        try:
            self._file.flush()
            end = self._file.tell()
            self._file.seek(0)
            self._file.write(header)
            self._file.seek(end)
        except OSError as err:
            raise output_failure(err, self.path) from None
        self._header = header

    def _advance(self, name: str) -> TensorInfo:
        """Move past completed tensors to `name`; refuse to skip an incomplete one."""
        if name not in self._positions:
            raise InvalidInputError("not declared in the header", path=str(self.path), tensor=label(name))
        target = self._positions[name]
        if target < self._current:
            raise InvalidInputError(
                f"out of order: already moved on to '{label(self.layout[self._current].name)}'",
                path=str(self.path), tensor=label(name),
            )
        while self._current < target:
            info = self.layout[self._current]
            if self._written[self._current] != info.n_bytes:
                raise InvalidInputError(
                    f"out of order: '{label(info.name)}' is incomplete "
                    f"({self._written[self._current]} of {info.n_bytes} bytes written)",
                    path=str(self.path), tensor=label(name),
                )
            self._current += 1
        return self.layout[target]

    @staticmethod
    def _chunk_bytes(info: TensorInfo, chunk: Any, where: dict) -> memoryview:
        if isinstance(chunk, (bytes, bytearray, memoryview)):
            return memoryview(chunk).cast("B")
        if not isinstance(chunk, np.ndarray):
            found = type(chunk).__name__
            raise InvalidInputError(f"chunk must be a numpy array or bytes, found {found}", **where)
        if info.dtype not in NUMPY_DTYPES or st_dtype_of_numpy(chunk.dtype) != info.dtype:
            reason = f"chunk dtype {chunk.dtype} does not match declared {info.dtype}"
            raise InvalidInputError(reason, **where)
        if chunk.shape[1:] != info.shape[1:] or chunk.ndim != len(info.shape):
            raise InvalidInputError(
                f"chunk shape {list(chunk.shape)} does not fit declared shape {list(info.shape)} "
                "(chunks split axis 0 only)",
                **where,
            )
        flat = np.ascontiguousarray(chunk, dtype=little_endian(info.dtype)).reshape(-1)
        return memoryview(flat.view(np.uint8))

    def __exit__(self, exc_type, exc, tb) -> bool:
        error = exc
        if error is None:
            try:
                self._check_complete()
                self._file.flush()
                self._join_sync()
                if self._sync_error is not None:
                    raise self._sync_error
            except OSError as err:
                error = output_failure(err, self.path)
            except BaseException as err:  # noqa: BLE001 -- re-raised below, after cleanup
                error = err
        self._close()
        if self._publishing is not None:  # publishes, or (given an error) removes the temporary
            self._publishing.__exit__(type(error) if error else None, error,
                                      error.__traceback__ if error else None)
        elif error is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if error is not None and error is not exc:
            raise error
        return False

    def _check_complete(self) -> None:
        for info, n_written in zip(self.layout, self._written):
            if n_written != info.n_bytes:
                raise InvalidInputError(
                    f"incomplete: {n_written} of {info.n_bytes} bytes written",
                    path=str(self.path), tensor=label(info.name),
                )

    def _close(self) -> None:
        self._join_sync()
        if self._file is not None:
            self._file.close()
            self._file = None


def write_file(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray | RawTensor],
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = False,
) -> None:
    """Atomically write `tensors` (in the given order) to a safetensors file at `path`.

    Values are numpy arrays of a `NUMPY_DTYPES` dtype, or `RawTensor` for bytes of any dtype.

    Example::

        write_file("kv.safetensors", {"layer.0.key": keys}, {"model": "llama"}, force=True)
    """
    specs = []
    for name, value in tensors.items():
        if isinstance(value, RawTensor):
            specs.append((name, value.dtype, value.shape))
        elif isinstance(value, np.ndarray):
            try:
                specs.append((name, st_dtype_for(value.dtype), value.shape))
            except InvalidInputError as err:
                raise err.at(path=str(path), tensor=label(name)) from None
        else:
            raise InvalidInputError(
                f"expected a numpy array or RawTensor, found {type(value).__name__}",
                path=str(path), tensor=label(name),
            )
    with StreamWriter(path, specs, metadata, force=force) as out:
        for name, value in tensors.items():
            out.write(name, value.data if isinstance(value, RawTensor) else value)
