"""safetensors dtypes and their numpy equivalents.

`NUMPY_DTYPES` lists the dtypes read and written as numpy arrays (BF16 via
``ml_dtypes.bfloat16``, imported on first use). The other dtypes of the reference format
(`RAW_ONLY_DTYPES`: F8, F6, F4, C64) are validated and carried bit-exactly as bytes but have
no numpy form here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fibquant_cli.errors import InvalidInputError


class _NumpyDtypes(Mapping):
    """safetensors dtype -> numpy dtype; BF16 comes from ml_dtypes, imported on first use only
    (it costs more start-up time than the rest of the tool together)."""

    _EAGER = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16,
              "I16": np.int16, "F16": np.float16, "U32": np.uint32, "I32": np.int32,
              "F32": np.float32, "U64": np.uint64, "I64": np.int64, "F64": np.float64}
    _NAMES = ("BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64",
              "I64", "F64")

    def __getitem__(self, key: str) -> np.dtype:
        if key == "BF16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(self._EAGER[key])

    def __iter__(self):
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)

    def __contains__(self, key) -> bool:
        return key in self._NAMES


NUMPY_DTYPES: Mapping[str, np.dtype] = _NumpyDtypes()
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
DTYPE_BITS: dict[str, int] = {"BOOL": 8, "U8": 8, "I8": 8, "U16": 16, "I16": 16, "F16": 16,
                         "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64,
                         "F64": 64} | RAW_ONLY_DTYPES
_ST_FOR_NUMPY: dict[np.dtype, str] = {np.dtype(v): k for k, v in _NumpyDtypes._EAGER.items()}


def numpy_dtype_for(st_dtype: str) -> np.dtype:
    """Return the numpy dtype of safetensors dtype `st_dtype` (e.g. ``"BF16"``).

    Raises `InvalidInputError` for raw-only and unknown dtypes.
    """
    if st_dtype in NUMPY_DTYPES:
        return NUMPY_DTYPES[st_dtype]
    if st_dtype in RAW_ONLY_DTYPES:
        raise InvalidInputError(f"dtype {st_dtype} has no numpy equivalent; read it with read_raw")
    shown = st_dtype if isinstance(st_dtype, str) and st_dtype.isprintable() else repr(st_dtype)
    raise InvalidInputError(f"unknown dtype {shown[:60]}")


def st_dtype_for(np_dtype: Any) -> str:
    """Return the safetensors dtype string of a numpy dtype (any byte order)."""
    dtype = np.dtype(np_dtype)
    found = st_dtype_of_numpy(dtype)
    if found is None:
        raise InvalidInputError(f"numpy dtype {dtype} has no safetensors equivalent")
    return found


def st_dtype_of_numpy(dtype: np.dtype) -> str | None:
    """The safetensors dtype string of a numpy dtype (any byte order), or None."""
    if dtype.name == "bfloat16":
        return "BF16"
    native = dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype
    return _ST_FOR_NUMPY.get(native)


def little_endian(st_dtype: str) -> np.dtype:
    """The little-endian (on-disk) numpy dtype of `st_dtype`."""
    dtype = NUMPY_DTYPES[st_dtype]
    return dtype.newbyteorder("<") if dtype.byteorder != "|" else dtype
