"""Domain-separated BLAKE3 digests, byte-compatible with the fib-quant crate.

Every digest is written ``blake3:`` followed by 64 lower-case hex digits (the 32-byte
BLAKE3 hash). The hashed bytes are always framed as::

    <schema tag, UTF-8> 0x00 <payload>

The tag names what the payload is, so equal payloads of different kinds never share a
digest. Tags must not contain 0x00, which makes the frame unambiguous.

Schemes
-------
``json_digest(schema, obj)``
    payload = ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False)`` encoded as
    UTF-8: no whitespace, dict keys in insertion order (not sorted), non-ASCII text raw.
    For strings, integers, booleans, null, arrays and objects this is exactly serde_json's
    compact output (``serde_json::to_vec``) with keys in struct order, which is how the crate
    hashes, e.g. a KV shape under ``fib_quant_kv_tensor_shape_v1``. Floats are not portable
    (Python writes ``1e+16``, serde_json ``1e16``) and NaN/Infinity are refused.

``bytes_digest(schema, data)``
    payload = the raw bytes.

``tensor_digest(dtype, shape, data)``
    tag ``fibquant_tensor_v1``; payload = the compact JSON header
    ``{"dtype":"<dtype>","shape":[d0,d1,...]}``, one 0x00 byte, then the tensor's bytes in
    C order, little-endian (as safetensors stores them). The header cannot contain 0x00, so
    dtype, shape and data are covered unambiguously. Pass the safetensors dtype string
    (``"F16"``, ``"BF16"``, ``"F32"``, ...); the string is hashed as given.

``file_digest(tensor_digests)``
    ``json_digest("fibquant_file_v1", [[name, digest], ...])`` with the pairs sorted by
    name (Unicode code point order, which equals UTF-8 byte order), so the result does not
    depend on the order of tensors in the safetensors header.

Example::

    >>> bytes_digest("demo", b"")[:7]
    'blake3:'
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import blake3
import numpy as np

from fibquant_cli.errors import InvalidInputError

DIGEST_PREFIX = "blake3:"
DIGEST_HEX_LEN = 64

# Every schema tag fibquant hashes under, in one table: what the payload is, and where.
TENSOR_SCHEMA = "fibquant_tensor_v1"          # one tensor: dtype, shape, bytes (tensor_digest)
FILE_SCHEMA = "fibquant_file_v1"              # a dump: its sorted (name, tensor digest) pairs
KV_SHAPE_SCHEMA = "fib_quant_kv_tensor_shape_v1"  # a manifest entry's shape (the crate's)
PROFILE_SCHEMA = "fibquant_profile_v1"        # a quantizer profile's JSON (profile_digest)
CODEBOOK_SCHEMA = "fibquant_codebook_v1"      # codebook bytes: <f8 in the cache, <f4 in files
ROTATION_SCHEMA = "fibquant_rotation_v1"      # a rotation's <f4 bytes, as stored in files
CONTAINER_SCHEMA = "fibquant_container_v1"    # a compressed file's document (UTF-8 JSON text)
BLOCK_SCHEMA = "fibquant_block_v1"            # one fixed-size byte block of a stored array
BASIS_SCHEMA = "fibquant_basis_v1"            # a model-level PCA basis file (formats/basis.py)

# Bytes handed to one hasher.update call; large tensors are hashed in slices of this size
# so a non-contiguous or byte-swapped array is never copied whole.
_CHUNK_BYTES = 1 << 24

# Element sizes of the safetensors dtypes with whole-byte elements; used to check that the
# data length agrees with dtype and shape. Unknown dtype strings skip that check.
_ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
_HEX_DIGITS = frozenset("0123456789abcdef")


def _hasher(schema: str) -> Any:
    if not isinstance(schema, str) or not schema or "\x00" in schema:
        raise ValueError(f"digest schema tag must be non-empty and NUL-free, got {schema!r}")
    hasher = blake3.blake3()
    hasher.update(schema.encode("utf-8"))
    hasher.update(b"\x00")
    return hasher


def _finish(hasher: Any) -> str:
    return DIGEST_PREFIX + hasher.hexdigest()


def compact_json(obj: Any) -> bytes:
    """Return the compact UTF-8 JSON that ``json_digest`` hashes (keys in insertion order)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def json_digest(schema: str, obj: Any) -> str:
    """Digest of ``obj`` as compact JSON under the domain tag ``schema``.

    Args:
        schema: domain tag, e.g. ``"fib_quant_kv_tensor_shape_v1"``.
        obj: JSON-serialisable value; dict key order is significant.

    Example:
        >>> json_digest("demo", {"a": 1}) == json_digest("demo", {"a": 1})
        True
    """
    hasher = _hasher(schema)
    hasher.update(compact_json(obj))
    return _finish(hasher)


def bytes_digest(schema: str, data: bytes | bytearray | memoryview) -> str:
    """Digest of raw bytes under the domain tag ``schema``."""
    hasher = _hasher(schema)
    view = memoryview(data).cast("B")
    for start in range(0, len(view), _CHUNK_BYTES):
        hasher.update(view[start:start + _CHUNK_BYTES])
    return _finish(hasher)


def block_digests(data: Any, block_bytes: int) -> list[str]:
    """``bytes_digest(BLOCK_SCHEMA, ...)`` of each ``block_bytes`` piece of ``data`` (the last
    may be shorter): what random access checks before it decodes a block."""
    view = memoryview(data).cast("B")
    return [bytes_digest(BLOCK_SCHEMA, view[start:start + block_bytes])
            for start in range(0, len(view), block_bytes)]


def _check_shape(shape: Any) -> list[int]:
    dims = list(shape)
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 0:
            raise ValueError(f"tensor shape must hold non-negative integers, got {dims!r}")
    return [int(dim) for dim in dims]


def _little_endian_chunks(arr: np.ndarray):
    """Yield C-order, little-endian, contiguous pieces of ``arr`` of about _CHUNK_BYTES."""
    target = arr.dtype.newbyteorder("<")
    if arr.dtype == target and arr.flags.c_contiguous:
        flat = arr.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, _CHUNK_BYTES):
            yield flat[start:start + _CHUNK_BYTES]
        return
    yield from _converted_chunks(arr, target)


def _contiguous_bytes(arr: np.ndarray, target: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(arr, dtype=target).reshape(-1).view(np.uint8)


def _converted_chunks(arr: np.ndarray, target: np.dtype):
    if arr.ndim == 0:
        yield _contiguous_bytes(arr.reshape(1), target)
        return
    row_bytes = arr[0].nbytes if arr.shape[0] else 0
    if arr.ndim == 1 or row_bytes == 0 or row_bytes <= _CHUNK_BYTES:
        rows = max(1, _CHUNK_BYTES // max(1, row_bytes))
        for start in range(0, arr.shape[0], rows):
            yield _contiguous_bytes(arr[start:start + rows], target)
        return
    for row in arr:
        yield from _converted_chunks(row, target)


@functools.lru_cache(maxsize=1024)
def _tensor_prefix(dtype: str, dims: tuple[int, ...]) -> bytes:
    """The compact JSON of dtype and shape, then NUL: the same for every layer of a dump."""
    return compact_json({"dtype": dtype, "shape": list(dims)}) + b"\x00"


def tensor_digest_of_chunks(dtype: str, shape: tuple[int, ...], chunks) -> str:
    """``tensor_digest`` of raw C-order bytes given as an iterable of bytes-like pieces.

    Lets a copy hash what it streams, without holding the tensor whole. Raises
    InvalidInputError when the pieces do not add up to the size of ``dtype`` and ``shape``.
    """
    if not isinstance(dtype, str) or not dtype:
        raise ValueError(f"tensor dtype must be a non-empty string, got {dtype!r}")
    dims = _check_shape(shape)
    hasher = _hasher(TENSOR_SCHEMA)
    hasher.update(_tensor_prefix(dtype, tuple(dims)))
    n_bytes = 0
    for piece in chunks:
        view = memoryview(piece).cast("B")
        hasher.update(view)
        n_bytes += len(view)
    item_bytes = _ITEM_BYTES.get(dtype.upper())
    if item_bytes is not None and n_bytes != math.prod(dims) * item_bytes:
        raise InvalidInputError(
            f"tensor data is {n_bytes} bytes, expected {math.prod(dims) * item_bytes} "
            f"for {dtype} {dims}"
        )
    return _finish(hasher)


def tensor_digest(dtype: str, shape: tuple[int, ...], data: Any) -> str:
    """Digest of one tensor: dtype string, shape and raw little-endian bytes.

    Args:
        dtype: safetensors dtype string (``"F16"``, ``"BF16"``, ``"F32"``, ...).
        shape: tensor dimensions.
        data: bytes-like in C order, or a numpy array (any strides or byte order; it is
            hashed as its C-order little-endian bytes without a whole-array copy).

    Raises:
        InvalidInputError: the data length does not match ``dtype`` and ``shape``.

    Example:
        >>> tensor_digest("F32", (2,), np.zeros(2, np.float32))[:7]
        'blake3:'
    """
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise ValueError("cannot digest an object array")
        pieces = _little_endian_chunks(data)
    else:
        view = memoryview(data).cast("B")
        pieces = (view[start:start + _CHUNK_BYTES] for start in range(0, len(view), _CHUNK_BYTES))
    return tensor_digest_of_chunks(dtype, shape, pieces)


def file_digest(tensor_digests: Mapping[str, str]) -> str:
    """Digest of a whole dump from its per-tensor digests, independent of their order.

    Raises:
        InvalidInputError: one of the digests is not a well-formed ``blake3:`` string.
    """
    pairs = []
    for name in sorted(tensor_digests):
        value = tensor_digests[name]
        try:
            parse_digest(value)
        except InvalidInputError as err:
            raise err.at(tensor=name) from None
        pairs.append([name, value])
    return json_digest(FILE_SCHEMA, pairs)


def parse_digest(text: Any) -> bytes:
    """Return the 32 raw bytes of a ``blake3:<64 lower-case hex>`` digest string.

    Raises:
        InvalidInputError: anything else (wrong prefix, length, case or characters).
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"digest must be a string, found {type(text).__name__}")
    hex_part = text[len(DIGEST_PREFIX):]
    if (
        not text.startswith(DIGEST_PREFIX)
        or len(hex_part) != DIGEST_HEX_LEN
        or not set(hex_part) <= _HEX_DIGITS
    ):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidInputError(
            f"digest {shown!r} is not 'blake3:' followed by 64 lower-case hex digits"
        )
    return bytes.fromhex(hex_part)


def format_digest(raw: bytes) -> str:
    """Inverse of ``parse_digest``: 32 raw bytes to ``blake3:<hex>``."""
    if len(raw) != 32:
        raise ValueError(f"a BLAKE3 digest is 32 bytes, got {len(raw)}")
    return DIGEST_PREFIX + bytes(raw).hex()


def profile_digest(profile: Any) -> str:
    """Digest of a quantizer profile (keys the codebook cache; recorded in every file)."""
    return json_digest(PROFILE_SCHEMA, profile.to_json())


def codebook_digest(codebook: np.ndarray, dtype: str = "<f4") -> str:
    """Digest of a codebook's bytes as ``dtype`` (``<f4`` in files, ``<f8`` in the cache)."""
    return bytes_digest(CODEBOOK_SCHEMA, np.ascontiguousarray(codebook, dtype=dtype).tobytes())


def rotation_digest(rotation: np.ndarray) -> str:
    """Digest of a rotation's bytes as stored in files (``<f4``)."""
    return bytes_digest(ROTATION_SCHEMA, np.ascontiguousarray(rotation, dtype="<f4").tobytes())
