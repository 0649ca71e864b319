"""The safetensors format: validated header parsing, positioned reads, canonical headers.

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

In memory.  `header_for_arrays` describes numpy arrays held in memory as the header of a
safetensors file whose data buffer is those arrays' bytes (`MemoryData`, no copy): every read
below serves them, so a dump handed over as arrays (``fibquant_cli.api``) is read by the same
code as a file.

Writing.  This module lays out (`plan_layout`) and serializes (`header_bytes`) a header: compact
JSON padded with spaces to a multiple of 8 bytes, tensors in the order given, as the reference
implementation does except that it sorts them. `storage.stwriter` writes the files.
"""

from __future__ import annotations

import bisect
import io
import json
import math
import operator
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fibquant_cli.errors import InvalidInputError, ResourceError, UsageError
from fibquant_cli.formats import untrusted
from fibquant_cli.formats.dtypes import (
    DTYPE_BITS,
    NUMPY_DTYPES,
    RAW_ONLY_DTYPES,
    little_endian,
    numpy_dtype_for,
    st_dtype_for,
)
from fibquant_cli.formats.untrusted import (
    MAX_INT_DIGITS,
    DuplicateKey,
    LongInteger,
    input_path,
    label,
    no_duplicates,
    parse_json_int,
)

__all__ = [
    "MAX_HEADER_BYTES",
    "NUMPY_DTYPES",
    "RAW_ONLY_DTYPES",
    "Header",
    "RawTensor",
    "TensorInfo",
    "numpy_dtype_for",
    "header_for_arrays",
    "read_header",
    "read_raw",
    "read_tensor",
    "st_dtype_for",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024
# Byte sizes are exact up to here; beyond, a hostile shape is only reported as "more than".
_MAX_TENSOR_BYTES = 2**64
METADATA_KEY = "__metadata__"
ENTRY_KEYS = ("data_offsets", "dtype", "shape")
_LEN_PREFIX = struct.Struct("<Q")

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
    """A parsed, validated header; `tensors` keeps the file's order.

    ``data`` is None for a file; for arrays held in memory (`header_for_arrays`) it serves
    the data buffer, and ``path`` only names them in errors.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int
    file_size: int
    data: MemoryData | None = None

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
    n_bits = DTYPE_BITS[dtype]
    for dim in shape:
        n_bits *= dim
        if limit is not None and n_bits > 8 * limit:
            return None
    if n_bits % 8:
        raise InvalidInputError(f"shape {list(shape)} of dtype {dtype} is not a whole number of bytes")
    return n_bits // 8


def _parse_entry(name: str, entry: Any, data_n_bytes: int, where: dict) -> TensorInfo:
    if not isinstance(entry, dict):
        raise InvalidInputError(f"entry must be a JSON object, found {label(entry)}", **where)
    if sorted(entry) != list(ENTRY_KEYS):
        found = [label(k, 20) for k in sorted(entry)]
        raise InvalidInputError(f"entry keys must be {list(ENTRY_KEYS)}, found {found}", **where)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InvalidInputError(f"unknown dtype {label(dtype)}", **where)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidInputError(f"shape must be a list of non-negative ints, found {label(shape)}", **where)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        found = label(offsets)
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
            f"shape {label(shape)} of dtype {dtype} needs {need} bytes, "
            f"but data_offsets [{begin}, {end}] span {end - begin}",
            **where,
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_coverage(tensors: dict[str, TensorInfo], data_n_bytes: int, path: str) -> None:
    """Safetensors requires the entries to tile the data buffer: no overlaps, holes or tail."""
    cursor, previous = 0, None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        where = {"path": path, "tensor": label(info.name)}
        if info.begin < cursor:
            raise InvalidInputError(
                f"data_offsets [{info.begin}, {info.end}] overlap tensor '{label(previous.name)}' "
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
        raise InvalidInputError(f"{METADATA_KEY} must be a str -> str map, found {label(value)}", path=path)
    for key, item in value.items():
        if not isinstance(item, str):
            raise InvalidInputError(
                f"{METADATA_KEY} must be a str -> str map, key '{label(key)}' has {label(item)}", path=path
            )
    return dict(value)


def _open_input(path: Path):
    return untrusted.open_regular(path)  # looked up here: tests count the bytes it reads


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of the safetensors file at `path`.

    Example::

        header = read_header("kv.safetensors")
        for info in header.tensors.values():
            print(info.name, info.dtype, info.shape)
    """
    path = input_path(path)
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
        obj = json.loads(text, object_pairs_hook=no_duplicates, parse_int=parse_json_int)
    except LongInteger as err:
        raise InvalidInputError(f"header has an integer of {err.args[0]} digits (at most "
                                f"{MAX_INT_DIGITS})", path=where) from None
    except DuplicateKey as err:
        raise InvalidInputError(f"header has duplicate key '{label(err.args[0])}'", path=where) from None
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
        name: _parse_entry(name, entry, data_n_bytes, {"path": where, "tensor": label(name)})
        for name, entry in obj.items()
        if name != METADATA_KEY
    }
    _check_coverage(tensors, data_n_bytes, where)
    return Header(path, tensors, metadata, data_start, file_size)


def _lookup(header: Header, name: str) -> TensorInfo:
    where = {"path": str(header.path), "tensor": label(name)}
    if name not in header.tensors:
        raise InvalidInputError(f"no such tensor (file has {len(header.tensors)})", **where)
    if header.data is not None:
        return header.tensors[name]
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
    where = {"path": str(header.path), "tensor": label(name)}
    try:
        dtype = numpy_dtype_for(info.dtype)
    except InvalidInputError as err:
        raise err.at(**where) from None
    index = () if index is None else index
    if not (isinstance(index, tuple) and all(isinstance(s, slice) for s in index)):
        raise UsageError(f"index must be a tuple of slices, found {label(index)}", **where)
    if len(index) > len(info.shape):
        raise UsageError(f"index has {len(index)} axes, tensor has {len(info.shape)}", **where)

    lo, hi, rebased = (0, 1, index) if not index else _narrow_leading(info.shape, index)
    region_shape = info.shape if not index else (hi - lo,) + info.shape[1:]
    row_n_bytes = dtype.itemsize * math.prod(info.shape[1:])
    if math.prod(region_shape) == 0:
        return np.empty(region_shape, dtype)[rebased].copy()
    region = np.empty(region_shape, dtype=little_endian(info.dtype))
    _read_into(header, info.begin + lo * row_n_bytes, region, name)
    if not index and region.dtype == dtype:
        return region
    return np.array(region[rebased], dtype=dtype, copy=True)


def _read_into(header: Header, offset: int, out: np.ndarray, name: str) -> None:
    """Fill the C-contiguous array ``out`` from data-buffer byte ``offset`` with one read.

    A positioned read into a fresh array: a memory map costs ~0.2 ms to set up, which
    dominated decompress on dumps of many small tensors.
    """
    with _open_data(header) as f:
        f.seek(header.data_start + offset)
        got = f.readinto(out.reshape(-1).view(np.uint8))  # bf16 has no buffer protocol
    if got != out.nbytes:
        raise InvalidInputError("file shrank while reading", path=str(header.path),
                                tensor=label(name))


def read_bytes(header: Header, name: str, lo: int, hi: int) -> np.ndarray:
    """Bytes [lo, hi) of tensor `name`'s stored bytes, as a new uint8 array (one read)."""
    info = _lookup(header, name)
    if not 0 <= lo <= hi <= info.n_bytes:
        raise UsageError(f"byte range [{lo}, {hi}) is outside the {info.n_bytes}-byte tensor",
                         path=str(header.path), tensor=label(name))
    out = np.empty(hi - lo, dtype=np.uint8)
    if hi > lo:
        _read_into(header, info.begin + lo, out, name)
    return out


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
        arr = raw[info.begin - b0:info.end - b0].view(little_endian(info.dtype)).reshape(info.shape)
        dtype = numpy_dtype_for(info.dtype)
        out[info.name] = arr if arr.dtype == dtype else arr.astype(dtype)
    return out


def iter_raw(header: Header, name: str, chunk_bytes: int = 8 << 20):
    """Yield the stored bytes of tensor `name` in pieces of at most `chunk_bytes` (a copy of a
    large tensor then never holds it whole)."""
    info = _lookup(header, name)
    with _open_data(header) as f:
        f.seek(header.data_start + info.begin)
        left = info.n_bytes
        while left:
            data = f.read(min(left, chunk_bytes))
            if not data:
                raise InvalidInputError("file shrank while reading", path=str(header.path),
                                        tensor=label(name))
            left -= len(data)
            yield data


def read_raw(header: Header, name: str) -> bytes:
    """Return the exact stored bytes of tensor `name` (any dtype)."""
    info = _lookup(header, name)
    with _open_data(header) as f:
        f.seek(header.data_start + info.begin)
        data = f.read(info.n_bytes)
    if len(data) != info.n_bytes:
        raise InvalidInputError("file shrank while reading", path=str(header.path), tensor=label(name))
    return data


def _open_data(header: Header):
    """A binary reader over the data (the file, or the arrays of an in-memory header)."""
    return header.data.open() if header.data is not None else _open_input(header.path)


# ---------------------------------------------------------------------------------------------
# In memory


class MemoryData:
    """The data buffer of arrays held in memory: their bytes back to back, as in a file.

    Nothing is copied up front; ``open()`` returns a reader whose ``seek``/``read``/``readinto``
    copy out of the arrays' own buffers, so the file readers above serve them unchanged.
    """

    def __init__(self, layout: Sequence[TensorInfo], buffers: Sequence[memoryview]):
        self.starts = [info.begin for info in layout]
        self.buffers = list(buffers)
        self.size = layout[-1].end if layout else 0

    def open(self) -> _MemoryReader:
        return _MemoryReader(self)


class _MemoryReader(io.RawIOBase):
    def __init__(self, data: MemoryData):
        super().__init__()
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.data.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, out) -> int:
        out = memoryview(out).cast("B")
        data, done = self.data, 0
        k = max(0, bisect.bisect_right(data.starts, self.pos) - 1)
        while done < len(out) and k < len(data.buffers):
            start, buf = data.starts[k], data.buffers[k]
            lo = self.pos - start
            if lo < len(buf):
                n = min(len(buf) - lo, len(out) - done)
                out[done:done + n] = buf[lo:lo + n]
                done += n
                self.pos += n
            k += 1
        return done


def header_for_arrays(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None,
                      where: str) -> Header:
    """The header of a safetensors file holding ``tensors`` (in their order), served from
    memory; ``where`` names them in errors. Arrays must be C-contiguous with a native or
    little-endian numpy dtype of `NUMPY_DTYPES`."""
    specs, buffers = [], []
    for name, arr in tensors.items():
        if not (isinstance(arr, np.ndarray) and arr.flags.c_contiguous):
            raise UsageError("expected a C-contiguous numpy array", path=where, tensor=label(name))
        try:
            specs.append((name, st_dtype_for(arr.dtype), arr.shape))
        except InvalidInputError as err:
            raise err.at(path=where, tensor=label(name)) from None
        data = arr if arr.dtype.byteorder != ">" else arr.astype(arr.dtype.newbyteorder("<"))
        buffers.append(memoryview(data.reshape(-1).view(np.uint8)))
    layout = plan_layout(specs, where)
    return Header(Path(where), {info.name: info for info in layout},
                  None if metadata is None else dict(metadata), 0,
                  layout[-1].end if layout else 0, MemoryData(layout, buffers))


# ---------------------------------------------------------------------------------------------
# Writing


def plan_layout(specs: Sequence[tuple[str, str, Sequence[int]]], path: str) -> list[TensorInfo]:
    """Validate (name, dtype, shape) specs and lay them out back to back."""
    layout, seen, cursor = [], set(), 0
    for spec in specs:
        name, dtype, shape = spec
        where = {"path": path, "tensor": label(name)}
        if not isinstance(name, str) or name == METADATA_KEY:
            raise InvalidInputError(f"invalid tensor name {label(name)}", path=path)
        if name in seen:
            raise InvalidInputError("duplicate tensor name", **where)
        if dtype not in DTYPE_BITS:
            raise InvalidInputError(f"unknown dtype {label(dtype)}", **where)
        if not (isinstance(shape, Sequence) and all(_is_dim(d) for d in shape)):
            found = label(shape)
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


def header_bytes(layout: list[TensorInfo], metadata: Mapping[str, str] | None, path: str) -> bytes:
    """The canonical header (length prefix, compact JSON, space padding) of a layout."""
    obj: dict[str, Any] = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not (isinstance(key, str) and isinstance(value, str)):
                raise InvalidInputError(
                    f"metadata must map str to str, found {label(key)}: {label(value)}", path=path
                )
        obj[METADATA_KEY] = dict(metadata)
    for info in layout:
        offsets = [info.begin, info.end]
        obj[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": offsets}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return _LEN_PREFIX.pack(len(text)) + text
