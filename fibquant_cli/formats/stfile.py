"""Low-level safetensors reader and writer: memory-mapped reads, atomic streaming writes.

Byte layout of a safetensors file (all integers little-endian)::

    offset 0      u64  N               header length in bytes
    offset 8      N    header          UTF-8 JSON object, may be padded with trailing spaces
    offset 8 + N  ...  data buffer     tensor bytes, C order, little-endian

The header maps each tensor name to ``{"dtype": "F16", "shape": [..], "data_offsets": [begin,
end]}`` (offsets relative to the data buffer) and may hold one ``"__metadata__"`` entry, a
str -> str map.  The reader fails closed: every structural rule below is checked once, in
`read_header`, and each violation raises a one-line `InvalidInputError` naming the file, the
tensor and the bad value.

* header length: 1 .. `MAX_HEADER_BYTES` and no longer than the file (a longer header is a
  `ResourceError`; the reference implementation refuses such files too);
* the header is a UTF-8 JSON object without duplicate keys; each tensor entry has exactly the
  keys ``dtype``, ``shape``, ``data_offsets``;
* ``dtype`` is a known safetensors dtype; ``shape`` a list of non-negative ints; ``data_offsets``
  two ints with ``begin <= end <= len(data buffer)``; ``end - begin`` equals the shape's byte size;
* the tensors cover the data buffer exactly: no overlaps, no holes, no trailing bytes.

Dtype policy.  `NUMPY_DTYPES` lists the dtypes read and written as numpy arrays (BF16 via
``ml_dtypes.bfloat16``).  The other dtypes of the reference format (`RAW_ONLY_DTYPES`: F8, F6,
F4, C64) are validated and carried bit-exactly as bytes (`read_raw`, `RawTensor`) but
`read_tensor` refuses them.  A dtype outside both tables is a structural error.

Writing.  `StreamWriter` writes the header up front, then the tensor bytes in header order, to a
temporary file in the destination directory; on success it fsyncs and `os.replace`s it over the
destination, on any exception it removes the temporary file.  `write_file` is the one-shot form.
The header JSON is compact and padded with spaces to a multiple of 8 bytes, as the reference
implementation does; unlike it, tensors are stored in the order given, not sorted.
"""

from __future__ import annotations

import errno
import json
import math
import operator
import os
import secrets
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from fibquant_cli.errors import InvalidInputError, ResourceError, UsageError

__all__ = [
    "MAX_HEADER_BYTES",
    "NUMPY_DTYPES",
    "RAW_ONLY_DTYPES",
    "Header",
    "RawTensor",
    "StreamWriter",
    "TensorInfo",
    "numpy_dtype_for",
    "read_header",
    "read_raw",
    "read_tensor",
    "st_dtype_for",
    "write_file",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024
# Byte sizes are exact up to here; beyond, a hostile shape is only reported as "more than".
_MAX_TENSOR_BYTES = 2**64
METADATA_KEY = "__metadata__"
ENTRY_KEYS = ("data_offsets", "dtype", "shape")
_LEN_PREFIX = struct.Struct("<Q")

NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
}
# Bits per element of the reference dtypes that have no numpy mapping here.
RAW_ONLY_DTYPES: dict[str, int] = {
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "C64": 64,
}
_BITS: dict[str, int] = {k: 8 * v.itemsize for k, v in NUMPY_DTYPES.items()} | RAW_ONLY_DTYPES
_ST_FOR_NUMPY: dict[np.dtype, str] = {v: k for k, v in NUMPY_DTYPES.items()}


def _label(value: Any, limit: int = 60) -> str:
    """A one-line, bounded rendering of a value taken from an untrusted header."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def numpy_dtype_for(st_dtype: str) -> np.dtype:
    """Return the numpy dtype of safetensors dtype `st_dtype` (e.g. ``"BF16"``).

    Raises `InvalidInputError` for raw-only and unknown dtypes.
    """
    if st_dtype in NUMPY_DTYPES:
        return NUMPY_DTYPES[st_dtype]
    if st_dtype in RAW_ONLY_DTYPES:
        raise InvalidInputError(f"dtype {st_dtype} has no numpy equivalent; read it with read_raw")
    raise InvalidInputError(f"unknown dtype {_label(st_dtype)}")


def st_dtype_for(np_dtype: Any) -> str:
    """Return the safetensors dtype string of a numpy dtype (any byte order)."""
    dtype = np.dtype(np_dtype)
    if _native(dtype) not in _ST_FOR_NUMPY:
        raise InvalidInputError(f"numpy dtype {dtype} has no safetensors equivalent")
    return _ST_FOR_NUMPY[_native(dtype)]


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype


def _le(st_dtype: str) -> np.dtype:
    """The little-endian (on-disk) numpy dtype of `st_dtype`."""
    dtype = NUMPY_DTYPES[st_dtype]
    return dtype.newbyteorder("<") if dtype.byteorder != "|" else dtype


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: `begin`/`end` are byte offsets relative to the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def n_bytes(self) -> int:
        return self.end - self.begin

    @property
    def numpy_dtype(self) -> np.dtype:
        return numpy_dtype_for(self.dtype)


@dataclass(frozen=True)
class Header:
    """A parsed, validated header; `tensors` keeps the file's order."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int
    file_size: int

    @property
    def data_n_bytes(self) -> int:
        return self.file_size - self.data_start


@dataclass(frozen=True)
class RawTensor:
    """Tensor bytes of any safetensors dtype, for bit-exact pass-through."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))


# ---------------------------------------------------------------------------------------------
# Reading


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tensor_n_bytes(dtype: str, shape: Sequence[int]) -> int:
    """Byte size of a tensor of safetensors dtype `dtype` and `shape` (any dtype, F8 too)."""
    return _shape_n_bytes(dtype, tuple(shape))


def _shape_n_bytes(dtype: str, shape: tuple[int, ...], limit: int | None = None) -> int | None:
    """Byte size of `shape` elements of `dtype`, or None once it exceeds `limit` bytes.

    The early exit keeps hostile shapes (many huge dims) from building enormous integers.
    """
    if 0 in shape:
        return 0
    n_bits = _BITS[dtype]
    for dim in shape:
        n_bits *= dim
        if limit is not None and n_bits > 8 * limit:
            return None
    if n_bits % 8:
        raise InvalidInputError(f"shape {list(shape)} of dtype {dtype} is not a whole number of bytes")
    return n_bits // 8


def _parse_entry(name: str, entry: Any, data_n_bytes: int, where: dict) -> TensorInfo:
    if not isinstance(entry, dict):
        raise InvalidInputError(f"entry must be a JSON object, found {_label(entry)}", **where)
    if sorted(entry) != list(ENTRY_KEYS):
        found = [_label(k, 20) for k in sorted(entry)]
        raise InvalidInputError(f"entry keys must be {list(ENTRY_KEYS)}, found {found}", **where)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _BITS:
        raise InvalidInputError(f"unknown dtype {_label(dtype)}", **where)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidInputError(f"shape must be a list of non-negative ints, found {_label(shape)}", **where)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        found = _label(offsets)
        raise InvalidInputError(f"data_offsets must be two non-negative ints, found {found}", **where)
    begin, end = offsets
    if begin > end:
        raise InvalidInputError(f"data_offsets [{begin}, {end}]: begin exceeds end", **where)
    if end > data_n_bytes:
        raise InvalidInputError(
            f"data_offsets end {end} lies beyond the {data_n_bytes}-byte data buffer (truncated file?)",
            **where,
        )
    try:
        n_bytes = _shape_n_bytes(dtype, tuple(shape), limit=_MAX_TENSOR_BYTES)
    except InvalidInputError as err:
        raise err.at(**where) from None
    if n_bytes != end - begin:
        need = f"more than {_MAX_TENSOR_BYTES}" if n_bytes is None else str(n_bytes)
        raise InvalidInputError(
            f"shape {_label(shape)} of dtype {dtype} needs {need} bytes, "
            f"but data_offsets [{begin}, {end}] span {end - begin}",
            **where,
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_coverage(tensors: dict[str, TensorInfo], data_n_bytes: int, path: str) -> None:
    """Safetensors requires the entries to tile the data buffer: no overlaps, holes or tail."""
    cursor, previous = 0, None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        where = {"path": path, "tensor": _label(info.name)}
        if info.begin < cursor:
            raise InvalidInputError(
                f"data_offsets [{info.begin}, {info.end}] overlap tensor '{_label(previous.name)}' "
                f"[{previous.begin}, {previous.end}]",
                **where,
            )
        if info.begin > cursor:
            raise InvalidInputError(
                f"hole of {info.begin - cursor} bytes in the data buffer at offset {cursor} "
                "before this tensor",
                **where,
            )
        cursor, previous = info.end, info
    if cursor != data_n_bytes:
        raise InvalidInputError(
            f"{data_n_bytes - cursor} unclaimed bytes after the last tensor "
            f"(tensors end at {cursor}, data buffer is {data_n_bytes} bytes)",
            path=path,
        )


def _parse_metadata(value: Any, path: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{METADATA_KEY} must be a str -> str map, found {_label(value)}", path=path)
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidInputError(
                f"{METADATA_KEY} must be a str -> str map, key '{_label(key)}' has {_label(item)}", path=path
            )
    return dict(value)


def _open_input(path: Path):
    where = str(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise InvalidInputError("is a directory, expected a safetensors file", path=where)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInputError("not a regular file", path=where)
        return open(path, "rb")
    except FileNotFoundError:
        raise InvalidInputError("no such file", path=where) from None
    except OSError as err:
        raise InvalidInputError(f"cannot read: {err.strerror}", path=where) from None


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of the safetensors file at `path`.

    Example::

        header = read_header("kv.safetensors")
        for info in header.tensors.values():
            print(info.name, info.dtype, info.shape)
    """
    path = Path(path)
    where = str(path)
    with _open_input(path) as f:
        file_size = os.fstat(f.fileno()).st_size
        if file_size < _LEN_PREFIX.size:
            raise InvalidInputError(
                f"file is {file_size} bytes, too short for the 8-byte header length", path=where
            )
        (n_header,) = _LEN_PREFIX.unpack(f.read(_LEN_PREFIX.size))
        if n_header == 0:
            raise InvalidInputError("header length 0", path=where)
        if n_header > file_size - _LEN_PREFIX.size:
            raise InvalidInputError(
                f"absurd header length {n_header}: only {file_size - _LEN_PREFIX.size} bytes follow "
                "the length prefix (truncated or not a safetensors file)",
                path=where,
            )
        if n_header > MAX_HEADER_BYTES:
            raise ResourceError(
                f"absurd header length {n_header}: above the {MAX_HEADER_BYTES}-byte cap", path=where
            )
        raw = f.read(n_header)
    if len(raw) != n_header:
        raise InvalidInputError(f"file shrank while reading the {n_header}-byte header", path=where)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"header is not valid UTF-8 (byte {err.start})", path=where) from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise InvalidInputError(f"header has duplicate key '{_label(err.args[0])}'", path=where) from None
    except json.JSONDecodeError as err:
        reason = f"header is not valid JSON: {err.msg.removesuffix(' at')} at byte {err.pos}"
        raise InvalidInputError(reason, path=where) from None
    except RecursionError:
        raise InvalidInputError("header JSON is nested too deeply", path=where) from None
    if not isinstance(obj, dict):
        raise InvalidInputError(f"header must be a JSON object, found {type(obj).__name__}", path=where)

    data_start = _LEN_PREFIX.size + n_header
    data_n_bytes = file_size - data_start
    metadata = _parse_metadata(obj.get(METADATA_KEY), where)
    tensors = {
        name: _parse_entry(name, entry, data_n_bytes, {"path": where, "tensor": _label(name)})
        for name, entry in obj.items()
        if name != METADATA_KEY
    }
    _check_coverage(tensors, data_n_bytes, where)
    return Header(path, tensors, metadata, data_start, file_size)


def _lookup(header: Header, name: str) -> TensorInfo:
    where = {"path": str(header.path), "tensor": _label(name)}
    if name not in header.tensors:
        raise InvalidInputError(f"no such tensor (file has {len(header.tensors)})", **where)
    try:
        size = os.stat(header.path).st_size
    except OSError as err:
        raise InvalidInputError(f"cannot read: {err.strerror}", **where) from None
    # A file truncated under a live memory map raises SIGBUS, so catch the common case first.
    if size != header.file_size:
        raise InvalidInputError(
            f"file changed size since its header was read ({header.file_size} -> {size} bytes)", **where
        )
    return header.tensors[name]


def _narrow_leading(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, int, tuple[slice, ...]]:
    """Rows [lo, hi) of axis 0 that `index` touches, and `index` rebased onto those rows."""
    rows = range(*index[0].indices(shape[0]))
    if len(rows) == 0:
        return 0, 0, (slice(0, 0),) + index[1:]
    lo, hi = min(rows[0], rows[-1]), max(rows[0], rows[-1]) + 1
    stop = rows.stop - lo if rows.stop - lo >= 0 else None  # negative steps run down to row lo
    return lo, hi, (slice(rows.start - lo, stop, rows.step),) + index[1:]


def read_tensor(header: Header, name: str, *, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Return tensor `name` (or ``tensor[index]``) as a new in-memory array.

    Only the rows of axis 0 that `index` selects are mapped, so reading a slice of the leading
    axes touches only those bytes.

    Example::

        header = read_header("kv.safetensors")
        keys = read_tensor(header, "layer.0.key", index=(slice(0, 4),))
    """
    info = _lookup(header, name)
    where = {"path": str(header.path), "tensor": _label(name)}
    try:
        dtype = numpy_dtype_for(info.dtype)
    except InvalidInputError as err:
        raise err.at(**where) from None
    index = () if index is None else index
    if not (isinstance(index, tuple) and all(isinstance(s, slice) for s in index)):
        raise UsageError(f"index must be a tuple of slices, found {_label(index)}", **where)
    if len(index) > len(info.shape):
        raise UsageError(f"index has {len(index)} axes, tensor has {len(info.shape)}", **where)

    lo, hi, rebased = (0, 1, index) if not index else _narrow_leading(info.shape, index)
    region_shape = info.shape if not index else (hi - lo,) + info.shape[1:]
    row_n_bytes = dtype.itemsize * math.prod(info.shape[1:])
    if math.prod(region_shape) == 0:
        return np.empty(region_shape, dtype)[rebased].copy()
    region = np.empty(region_shape, dtype=_le(info.dtype))
    _read_into(header, info.begin + lo * row_n_bytes, region, name)
    if not index and region.dtype == dtype:
        return region
    return np.array(region[rebased], dtype=dtype, copy=True)


def _read_into(header: Header, offset: int, out: np.ndarray, name: str) -> None:
    """Fill the C-contiguous array ``out`` from data-buffer byte ``offset`` with one read.

    A positioned read into a fresh array: a memory map costs ~0.2 ms to set up, which
    dominated decompress on dumps of many small tensors.
    """
    with _open_input(header.path) as f:
        f.seek(header.data_start + offset)
        got = f.readinto(out.reshape(-1).view(np.uint8))  # bf16 has no buffer protocol
    if got != out.nbytes:
        raise InvalidInputError("file shrank while reading", path=str(header.path),
                                tensor=_label(name))


def read_tensors(header: Header, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Tensors `names` as new arrays, like read_tensor, with one read when they are adjacent.

    A compressed layer's arrays (codes, norms, mean, ...) sit next to each other: one read
    instead of one per array saves the per-read costs that dominate small layers.
    """
    infos = sorted((_lookup(header, name) for name in names), key=lambda info: info.begin)
    if not infos:
        return {}
    b0, b1 = infos[0].begin, infos[-1].end
    if sum(info.n_bytes for info in infos) != b1 - b0 or not all(
            info.dtype in NUMPY_DTYPES for info in infos):
        return {info.name: read_tensor(header, info.name) for info in infos}
    raw = np.empty(b1 - b0, dtype=np.uint8)
    _read_into(header, b0, raw, infos[0].name)
    out = {}
    for info in infos:
        arr = raw[info.begin - b0:info.end - b0].view(_le(info.dtype)).reshape(info.shape)
        dtype = numpy_dtype_for(info.dtype)
        out[info.name] = arr if arr.dtype == dtype else arr.astype(dtype)
    return out


def iter_raw(header: Header, name: str, chunk_bytes: int = 8 << 20):
    """Yield the stored bytes of tensor `name` in pieces of at most `chunk_bytes` (a copy of a
    large tensor then never holds it whole)."""
    info = _lookup(header, name)
    with _open_input(header.path) as f:
        f.seek(header.data_start + info.begin)
        left = info.n_bytes
        while left:
            data = f.read(min(left, chunk_bytes))
            if not data:
                raise InvalidInputError("file shrank while reading", path=str(header.path),
                                        tensor=_label(name))
            left -= len(data)
            yield data


def read_raw(header: Header, name: str) -> bytes:
    """Return the exact stored bytes of tensor `name` (any dtype)."""
    info = _lookup(header, name)
    with _open_input(header.path) as f:
        f.seek(header.data_start + info.begin)
        data = f.read(info.n_bytes)
    if len(data) != info.n_bytes:
        raise InvalidInputError("file shrank while reading", path=str(header.path), tensor=_label(name))
    return data


# ---------------------------------------------------------------------------------------------
# Writing


def _plan(specs: Sequence[tuple[str, str, Sequence[int]]], path: str) -> list[TensorInfo]:
    """Validate (name, dtype, shape) specs and lay them out back to back."""
    layout, seen, cursor = [], set(), 0
    for spec in specs:
        name, dtype, shape = spec
        where = {"path": path, "tensor": _label(name)}
        if not isinstance(name, str) or name == METADATA_KEY:
            raise InvalidInputError(f"invalid tensor name {_label(name)}", path=path)
        if name in seen:
            raise InvalidInputError("duplicate tensor name", **where)
        if dtype not in _BITS:
            raise InvalidInputError(f"unknown dtype {_label(dtype)}", **where)
        if not (isinstance(shape, Sequence) and all(_is_dim(d) for d in shape)):
            found = _label(shape)
            raise InvalidInputError(f"shape must be a sequence of non-negative ints, found {found}", **where)
        shape = tuple(operator.index(d) for d in shape)
        try:
            n_bytes = _shape_n_bytes(dtype, shape)
        except InvalidInputError as err:
            raise err.at(**where) from None
        seen.add(name)
        layout.append(TensorInfo(name, dtype, shape, cursor, cursor + n_bytes))
        cursor += n_bytes
    return layout


def _is_dim(value: Any) -> bool:
    """A non-negative int, numpy integers included, bools excluded."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        return operator.index(value) >= 0
    except TypeError:
        return False


# Bytes written between two write-back hints (see StreamWriter.write).
WRITEBACK_BYTES = 4 << 20


def header_bytes(layout: list[TensorInfo], metadata: Mapping[str, str] | None, path: str) -> bytes:
    """The canonical header (length prefix, compact JSON, space padding) of a layout."""
    obj: dict[str, Any] = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not (isinstance(key, str) and isinstance(value, str)):
                raise InvalidInputError(
                    f"metadata must map str to str, found {_label(key)}: {_label(value)}", path=path
                )
        obj[METADATA_KEY] = dict(metadata)
    for info in layout:
        offsets = [info.begin, info.end]
        obj[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": offsets}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return _LEN_PREFIX.pack(len(text)) + text


def _check_output(path: Path, force: bool) -> None:
    if path.is_dir():
        raise UsageError("output path is a directory", path=str(path))
    if not path.parent.is_dir():
        raise UsageError(f"output directory {path.parent} does not exist", path=str(path))
    if not force and os.path.lexists(path):
        raise UsageError("output exists (use --force to overwrite)", path=str(path))


def _os_failure(err: OSError, path: Path) -> Exception:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ResourceError(f"cannot write output: {err.strerror}", path=str(path))
    return UsageError(f"cannot write output: {err.strerror}", path=str(path))


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
    ):
        self.path = Path(path)
        self.force = force
        self.layout = _plan(specs, str(self.path))
        self._header = header_bytes(self.layout, metadata, str(self.path))
        _check_output(self.path, force)
        self._positions = {info.name: i for i, info in enumerate(self.layout)}
        self._written = [0] * len(self.layout)
        self._current = 0
        self._unsynced = 0
        self._file = None
        self._tmp: Path | None = None

    def __enter__(self) -> StreamWriter:
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except OSError as err:
            raise _os_failure(err, self.path) from None
        self._tmp, self._file = tmp, os.fdopen(fd, "wb")
        try:
            self._file.write(self._header)
        except OSError as err:
            self._discard()
            raise _os_failure(err, self.path) from None
        return self

    def write(self, name: str, chunk: np.ndarray | bytes | bytearray | memoryview) -> None:
        """Append `chunk` (rows along axis 0, or raw bytes) to tensor `name`."""
        if self._file is None:
            raise RuntimeError("StreamWriter.write called outside its with-block")
        info = self._advance(name)
        where = {"path": str(self.path), "tensor": _label(name)}
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
            raise _os_failure(err, self.path) from None
        self._written[i] += data.nbytes

    def _start_writeback(self) -> None:
        """Start the kernel's write-back now, in the background, so the final fsync finds
        most pages on disk already instead of waiting for all of them."""
        self._file.flush()
        self._unsynced = 0
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # only a hint: a file system without it just syncs later

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
            raise _os_failure(err, self.path) from None
        self._header = header

    def _advance(self, name: str) -> TensorInfo:
        """Move past completed tensors to `name`; refuse to skip an incomplete one."""
        if name not in self._positions:
            raise InvalidInputError("not declared in the header", path=str(self.path), tensor=_label(name))
        target = self._positions[name]
        if target < self._current:
            raise InvalidInputError(
                f"out of order: already moved on to '{_label(self.layout[self._current].name)}'",
                path=str(self.path), tensor=_label(name),
            )
        while self._current < target:
            info = self.layout[self._current]
            if self._written[self._current] != info.n_bytes:
                raise InvalidInputError(
                    f"out of order: '{_label(info.name)}' is incomplete "
                    f"({self._written[self._current]} of {info.n_bytes} bytes written)",
                    path=str(self.path), tensor=_label(name),
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
        if info.dtype not in NUMPY_DTYPES or _ST_FOR_NUMPY.get(_native(chunk.dtype)) != info.dtype:
            reason = f"chunk dtype {chunk.dtype} does not match declared {info.dtype}"
            raise InvalidInputError(reason, **where)
        if chunk.shape[1:] != info.shape[1:] or chunk.ndim != len(info.shape):
            raise InvalidInputError(
                f"chunk shape {list(chunk.shape)} does not fit declared shape {list(info.shape)} "
                "(chunks split axis 0 only)",
                **where,
            )
        flat = np.ascontiguousarray(chunk, dtype=_le(info.dtype)).reshape(-1)
        return memoryview(flat.view(np.uint8))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._discard()
            return False
        try:
            self._commit()
        except BaseException:
            self._discard()
            raise
        return False

    def _commit(self) -> None:
        for info, n_written in zip(self.layout, self._written):
            if n_written != info.n_bytes:
                raise InvalidInputError(
                    f"incomplete: {n_written} of {info.n_bytes} bytes written",
                    path=str(self.path), tensor=_label(info.name),
                )
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if not self.force and os.path.lexists(self.path):
                raise UsageError("output exists (use --force to overwrite)", path=str(self.path))
            os.replace(self._tmp, self.path)
        except OSError as err:
            raise _os_failure(err, self.path) from None
        self._tmp = self._file = None
        _fsync_dir(self.path.parent)

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
        self._tmp = self._file = None


def _fsync_dir(directory: Path) -> None:
    """Persist the rename; not every platform lets a directory be opened, hence best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
                raise err.at(path=str(path), tensor=_label(name)) from None
        else:
            raise InvalidInputError(
                f"expected a numpy array or RawTensor, found {type(value).__name__}",
                path=str(path), tensor=_label(name),
            )
    with StreamWriter(path, specs, metadata, force=force) as out:
        for name, value in tensors.items():
            out.write(name, value.data if isinstance(value, RawTensor) else value)
