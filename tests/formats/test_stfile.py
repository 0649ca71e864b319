"""Tests for fibquant_cli.formats.stfile: interop with the reference bindings, hostile files, atomicity."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from fibquant_cli.errors import InvalidInputError, ResourceError, UsageError
from fibquant_cli.formats.dtypes import NUMPY_DTYPES, numpy_dtype_for, st_dtype_for
from fibquant_cli.formats.stfile import (
    MAX_HEADER_BYTES,
    RawTensor,
    TensorInfo,
    read_header,
    read_raw,
    read_tensor,
    read_tensors,
)
from fibquant_cli.storage.stwriter import StreamWriter, write_file


def _random(rng: np.random.Generator, st_dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Arbitrary bit patterns (NaNs included) so comparisons are bit-exact."""
    dtype = NUMPY_DTYPES[st_dtype]
    n_bytes = dtype.itemsize * int(np.prod(shape))
    if st_dtype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    return np.frombuffer(rng.bytes(n_bytes), dtype=dtype).reshape(shape).copy()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _hostile(tmp_path: Path, header, data: bytes = b"", *, n_header: int | None = None) -> Path:
    """A file whose header is `header` (dict -> JSON, or raw bytes), length prefix overridable."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if n_header is None else n_header) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# ---------------------------------------------------------------------------------------------
# Round trips and interop


@pytest.mark.parametrize("st_dtype", ["BF16", "F16", "F32", "I64"])
def test_our_writer_loads_in_reference(tmp_path, st_dtype):
    rng = np.random.default_rng(0)
    tensors = {"b": _random(rng, st_dtype, (3, 5)), "a": _random(rng, st_dtype, (4,))}
    path = tmp_path / "x.safetensors"
    write_file(path, tensors, {"k": "v"})
    loaded = safetensors.numpy.load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, array in tensors.items():
        assert _same(np.asarray(loaded[name]), array)


def test_reference_writer_reads_in_ours(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        name: _random(rng, name, (2, 3))
        for name in ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"]
        + ["BOOL"]
    }
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "np"})
    header = read_header(path)
    assert header.metadata == {"format": "np"}
    assert header.tensors.keys() == tensors.keys()
    for name, array in tensors.items():
        assert header.tensors[name].dtype == name
        assert _same(read_tensor(header, name), array)


def test_read_tensors_equals_read_tensor(tmp_path):
    """One read for adjacent tensors, a read each otherwise: the same arrays either way."""
    rng = np.random.default_rng(2)
    tensors = {name: _random(rng, name, (3, 5)) for name in ["F16", "BF16", "F32", "U8", "I64"]}
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file(tensors, path)
    header = read_header(path)
    order = sorted(header.tensors, key=lambda n: header.tensors[n].begin)
    for names in (order[1:4], [order[0], order[2]], order, []):
        got = read_tensors(header, names)
        assert set(got) == set(names)
        for name in names:
            assert got[name].dtype == read_tensor(header, name).dtype
            assert _same(got[name], tensors[name])
            got[name][...] = 0  # a fresh, writable array (the file is not touched)
    assert _same(read_tensor(header, order[0]), tensors[order[0]])


def test_golden_bytes_match_reference(tmp_path):
    array = np.arange(3, dtype=np.float32)
    path = tmp_path / "x.safetensors"
    write_file(path, {"x": array}, {"a": "b"})
    assert path.read_bytes() == safetensors.numpy.save({"x": array}, metadata={"a": "b"})


def test_header_is_space_padded_to_multiple_of_8(tmp_path):
    path = tmp_path / "x.safetensors"
    write_file(path, {"abc": np.zeros((1,), np.uint8)})
    (n_header,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n_header % 8 == 0
    assert read_header(path).data_start == 8 + n_header
    assert path.read_bytes()[8 : 8 + n_header].rstrip(b" ").endswith(b"}")


def test_order_and_metadata_preserved(tmp_path):
    names = ["z", "a", "m", "b"]
    path = tmp_path / "x.safetensors"
    write_file(path, {n: np.full((2,), i, np.int32) for i, n in enumerate(names)}, {"z": "1", "a": "2"})
    header = read_header(path)
    assert list(header.tensors) == names
    assert [t.begin for t in header.tensors.values()] == [0, 8, 16, 24]
    assert header.metadata == {"z": "1", "a": "2"}
    assert read_header(_write_plain(tmp_path)).metadata is None


def _write_plain(tmp_path: Path) -> Path:
    path = tmp_path / "plain.safetensors"
    write_file(path, {"x": np.zeros(1, np.float32)})
    return path


def test_empty_metadata_and_no_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    write_file(path, {}, {})
    header = read_header(path)
    assert header.tensors == {} and header.metadata == {}


def test_tensor_info_and_dtype_helpers(tmp_path):
    path = tmp_path / "x.safetensors"
    write_file(path, {"x": np.zeros((2, 3), ml_dtypes.bfloat16)})
    info = read_header(path).tensors["x"]
    assert info == TensorInfo("x", "BF16", (2, 3), 0, 12)
    assert info.n_bytes == 12 and info.numpy_dtype == np.dtype(ml_dtypes.bfloat16)
    for name, dtype in NUMPY_DTYPES.items():
        assert st_dtype_for(dtype) == name and numpy_dtype_for(name) == dtype
    assert st_dtype_for(np.dtype(">f4")) == "F32"
    with pytest.raises(InvalidInputError, match="complex128 has no safetensors equivalent"):
        st_dtype_for(np.complex128)
    with pytest.raises(InvalidInputError, match="unknown dtype Q4"):
        numpy_dtype_for("Q4")


def test_big_endian_array_is_stored_little_endian(tmp_path):
    path = tmp_path / "x.safetensors"
    array = np.arange(4, dtype=">i4")
    write_file(path, {"x": array})
    assert _same(read_tensor(read_header(path), "x"), array.astype("<i4"))


def test_raw_pass_through_of_non_numpy_dtype(tmp_path):
    src = tmp_path / "f8.safetensors"
    safetensors.numpy.save_file({"q": np.arange(6, dtype=ml_dtypes.float8_e4m3fn).reshape(2, 3)}, src)
    header = read_header(src)
    assert header.tensors["q"].dtype == "F8_E4M3"
    raw = read_raw(header, "q")
    with pytest.raises(InvalidInputError, match="F8_E4M3 has no numpy equivalent; read it with read_raw"):
        read_tensor(header, "q")
    dst = tmp_path / "copy.safetensors"
    write_file(dst, {"q": RawTensor("F8_E4M3", (2, 3), raw)})
    assert dst.read_bytes() == src.read_bytes()


def test_raw_tensor_with_wrong_length_leaves_nothing(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(InvalidInputError, match="incomplete: 5 of 6 bytes"):
        write_file(path, {"q": RawTensor("F16", (3,), b"\x00" * 5)})
    assert list(tmp_path.iterdir()) == []


def test_read_raw_is_exact(tmp_path):
    array = np.arange(6, dtype=np.float16)
    path = tmp_path / "x.safetensors"
    write_file(path, {"a": np.zeros(3, np.uint8), "x": array})
    assert read_raw(read_header(path), "x") == array.tobytes()


# ---------------------------------------------------------------------------------------------
# Slicing


@pytest.mark.parametrize(
    "index",
    [
        (slice(1, 3),),
        (slice(None, None, 2),),
        (slice(None, None, -1),),
        (slice(4, 0, -3),),
        (slice(3, 3),),
        (slice(-2, None), slice(1, 3)),
        (slice(1, 4), slice(None), slice(2, 5, 2)),
        (),
    ],
)
def test_slices_equal_numpy_slicing(tmp_path, index):
    array = np.arange(5 * 4 * 6, dtype=np.float32).reshape(5, 4, 6)
    path = tmp_path / "x.safetensors"
    write_file(path, {"pad": np.ones(3, np.int8), "x": array})
    got = read_tensor(read_header(path), "x", index=index)
    assert _same(got, array[index])
    assert not isinstance(got, np.memmap) and got.flags.owndata


def test_leading_slice_of_huge_tensor_reads_only_its_rows(tmp_path):
    """An 8 GiB sparse tensor: reading two rows must not touch (or allocate) the rest."""
    rows, cols = 2**21, 1024
    header = json.dumps({"big": _entry(shape=(rows, cols), offsets=(0, rows * cols * 4))}).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.seek(8 + len(header) + 7 * cols * 4)
        f.write(np.arange(cols, dtype=np.float32).tobytes())
        f.truncate(8 + len(header) + rows * cols * 4)
    got = read_tensor(read_header(path), "big", index=(slice(6, 8), slice(None, 4)))
    assert _same(got, np.array([[0, 0, 0, 0], [0, 1, 2, 3]], np.float32))


def test_scalar_and_empty_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {"s": np.array(7, np.int16), "e": np.zeros((0, 3), np.float32), "t": np.ones((2, 0))}
    write_file(path, tensors)
    header = read_header(path)
    for name, array in tensors.items():
        assert _same(read_tensor(header, name), array)
    assert _same(read_tensor(header, "e", index=(slice(0, 5),)), tensors["e"][0:5])


def test_bad_index_and_unknown_tensor(tmp_path):
    header = read_header(_write_plain(tmp_path))
    with pytest.raises(UsageError, match="index has 2 axes, tensor has 1"):
        read_tensor(header, "x", index=(slice(None), slice(None)))
    with pytest.raises(UsageError, match="index must be a tuple of slices"):
        read_tensor(header, "x", index=(0,))
    with pytest.raises(InvalidInputError, match="tensor 'nope': no such tensor"):
        read_tensor(header, "nope")


def test_file_changed_after_header(tmp_path):
    path = _write_plain(tmp_path)
    header = read_header(path)
    with open(path, "ab") as f:
        f.write(b"\x00")
    with pytest.raises(InvalidInputError, match="file changed size since its header was read"):
        read_tensor(header, "x")


# ---------------------------------------------------------------------------------------------
# Hostile files: every structural rule, with the exact reason and the file name


def _fails(path: Path, reason: str, error=InvalidInputError, tensor: str | None = None):
    with pytest.raises(error) as info:
        read_header(path)
    message = str(info.value)
    assert reason in message and path.name in message and "\n" not in message, message
    if tensor is not None:
        assert f"tensor '{tensor}'" in message, message
    return message


def test_missing_file_and_directory(tmp_path):
    _fails(tmp_path / "nope.safetensors", "no such file")
    directory = tmp_path / "dir.safetensors"
    directory.mkdir()
    _fails(directory, "is a directory")


@pytest.mark.parametrize("size", [0, 1, 7])
def test_shorter_than_length_prefix(tmp_path, size):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    _fails(path, f"file is {size} bytes, too short for the 8-byte header length")


def test_header_length_zero(tmp_path):
    _fails(_hostile(tmp_path, b"", n_header=0), "header length 0")


@pytest.mark.parametrize("n_header", [3, 2**63, 2**64 - 1])
def test_header_length_beyond_file(tmp_path, n_header):
    path = _hostile(tmp_path, b"{}", n_header=n_header)
    _fails(path, f"absurd header length {n_header}: only 2 bytes follow")


def test_header_length_above_cap(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(MAX_HEADER_BYTES + 64)  # sparse: costs no disk or time
    message = _fails(path, f"absurd header length {MAX_HEADER_BYTES + 1}: above the", error=ResourceError)
    assert f"{MAX_HEADER_BYTES}-byte cap" in message


@pytest.mark.parametrize(
    "header, reason",
    [
        (b"\xff\xfe{}", "header is not valid UTF-8 (byte 0)"),
        (b'{"a": ', "header is not valid JSON: Expecting value"),
        (b"[1, 2]", "header must be a JSON object, found list"),
        (b'"x"', "header must be a JSON object, found str"),
        (b"[" * 100_000 + b"]" * 100_000, "header JSON is nested too deeply"),
        (b'{"__metadata__": {}, "__metadata__": {}}', "header has duplicate key '__metadata__'"),
    ],
)
def test_header_not_a_json_object(tmp_path, header, reason):
    _fails(_hostile(tmp_path, header), reason)


def test_duplicate_tensor_name(tmp_path):
    raw = b'{"x": %s, "x": %s}' % (json.dumps(_entry()).encode(), json.dumps(_entry()).encode())
    _fails(_hostile(tmp_path, raw, b"\x00" * 8), "header has duplicate key 'x'")


@pytest.mark.parametrize(
    "entry, reason",
    [
        ("F32", "entry must be a JSON object, found F32"),
        (
            {"dtype": "F32", "shape": [2]},
            "entry keys must be ['data_offsets', 'dtype', 'shape'], found ['dtype', 'shape']",
        ),
        (dict(_entry(), extra=1), "found ['data_offsets', 'dtype', 'extra', 'shape']"),
        (_entry(dtype="Q4"), "unknown dtype Q4"),
        (_entry(dtype=3), "unknown dtype 3"),
        (dict(_entry(), shape=2), "shape must be a list of non-negative ints, found 2"),
        (dict(_entry(), shape=[-2]), "shape must be a list of non-negative ints, found [-2]"),
        (dict(_entry(), shape=[2.0]), "shape must be a list of non-negative ints, found [2.0]"),
        (dict(_entry(), shape=[True, 2]), "shape must be a list of non-negative ints, found [True, 2]"),
        (dict(_entry(), data_offsets=[0]), "data_offsets must be two non-negative ints, found [0]"),
        (dict(_entry(), data_offsets=[0, 8, 9]), "data_offsets must be two non-negative ints, found [0, 8"),
        (dict(_entry(), data_offsets=["0", 8]), "data_offsets must be two non-negative ints, found ['0', 8]"),
        (dict(_entry(), data_offsets=[-1, 8]), "data_offsets must be two non-negative ints, found [-1, 8]"),
        (_entry(offsets=(8, 0)), "data_offsets [8, 0]: begin exceeds end"),
        (_entry(offsets=(0, 9)), "data_offsets end 9 lies beyond the 8-byte data buffer (truncated file?)"),
        (_entry(shape=(3,)), "shape [3] of dtype F32 needs 12 bytes, but data_offsets [0, 8] span 8"),
        (_entry(shape=(2**30, 2**30)), "needs 4611686018427387904 bytes, but data_offsets [0, 8] span 8"),
        (_entry(shape=(2**62, 2**2)), f"needs more than {2**64} bytes"),  # 2**64 elements: wraps a u64
        (_entry(shape=[2**63] * 10_000), f"needs more than {2**64} bytes"),
        (_entry(shape=[0] + [2**63] * 1000), "needs 0 bytes, but data_offsets [0, 8] span 8"),
        (_entry(dtype="F4", shape=(3,), offsets=(0, 2)), "shape [3] of dtype F4 is not a whole number"),
    ],
)
def test_bad_tensor_entry(tmp_path, entry, reason):
    _fails(_hostile(tmp_path, {"t.0": entry}, b"\x00" * 8), reason, tensor="t.0")


def test_truncated_data_buffer(tmp_path):
    header = {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(8, 16))}
    path = _hostile(tmp_path, header, b"\x00" * 12)
    _fails(path, "data_offsets end 16 lies beyond the 12-byte", tensor="b")


def test_overlapping_tensors(tmp_path):
    header = {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}
    path = _hostile(tmp_path, header, b"\x00" * 12)
    _fails(path, "data_offsets [4, 12] overlap tensor 'a' [0, 8]", tensor="b")


def test_aliased_tensors(tmp_path):
    header = {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(0, 8))}
    _fails(_hostile(tmp_path, header, b"\x00" * 8), "overlap tensor", tensor="b")


def test_hole_between_tensors(tmp_path):
    header = {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}
    path = _hostile(tmp_path, header, b"\x00" * 20)
    _fails(path, "hole of 4 bytes in the data buffer at offset 8", tensor="b")


def test_trailing_bytes(tmp_path):
    _fails(_hostile(tmp_path, {"a": _entry()}, b"\x00" * 9), "1 unclaimed bytes after the last tensor")
    _fails(_hostile(tmp_path, {}, b"\x00"), "1 unclaimed bytes after the last tensor")


@pytest.mark.parametrize(
    "metadata, reason",
    [
        ([], "__metadata__ must be a str -> str map, found []"),
        ({"k": 1}, "__metadata__ must be a str -> str map, key 'k' has 1"),
        ({"k": {"n": "v"}}, "key 'k' has {'n': 'v'}"),
    ],
)
def test_bad_metadata(tmp_path, metadata, reason):
    _fails(_hostile(tmp_path, {"__metadata__": metadata, "a": _entry()}, b"\x00" * 8), reason)


def test_hostile_names_stay_on_one_line(tmp_path):
    header = {"evil\nname" + "x" * 500: _entry(dtype="Q4")}
    message = _fails(_hostile(tmp_path, header, b"\x00" * 8), "unknown dtype Q4")
    assert len(message) < 300


def test_zero_size_tensors_may_share_offsets(tmp_path):
    header = {
        "a": _entry(offsets=(0, 8)),
        "e": _entry(shape=(0,), offsets=(8, 8)),
        "b": _entry(offsets=(8, 16)),
    }
    header_obj = read_header(_hostile(tmp_path, header, b"\x00" * 16))
    assert list(header_obj.tensors) == ["a", "e", "b"]


# ---------------------------------------------------------------------------------------------
# Writing: atomicity and stream discipline


def test_refuses_existing_output_without_force(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(UsageError, match=r"out.safetensors: output exists \(use force to overwrite\)"):
        write_file(path, {"x": np.zeros(2)})
    assert path.read_bytes() == b"precious"
    write_file(path, {"x": np.zeros(2)}, force=True)
    assert _same(read_tensor(read_header(path), "x"), np.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_output_path_problems(tmp_path):
    with pytest.raises(UsageError, match="output directory .* does not exist"):
        write_file(tmp_path / "no" / "x.safetensors", {})
    with pytest.raises(UsageError, match="output path is a directory"):
        write_file(tmp_path, {}, force=True)


def test_exception_mid_stream_leaves_nothing(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(KeyError):
        with StreamWriter(path, [("a", "F32", (4, 2))]) as out:
            out.write("a", np.zeros((2, 2), np.float32))
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_exception_mid_stream_keeps_existing_output(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with StreamWriter(path, [("a", "F32", (4,))], force=True) as out:
            out.write("a", np.zeros(2, np.float32))
            raise RuntimeError
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_stream_writer_chunks_match_write_file(tmp_path):
    rng = np.random.default_rng(2)
    keys, values = _random(rng, "F16", (6, 3)), _random(rng, "BF16", (5,))
    streamed = tmp_path / "streamed.safetensors"
    specs = [("k", "F16", keys.shape), ("z", "I8", (0,)), ("v", "BF16", values.shape)]
    with StreamWriter(streamed, specs, {"m": "1"}) as out:
        for rows in np.array_split(keys, 3):
            out.write("k", rows)
        out.write("v", values[:2])
        out.write("v", values[2:].tobytes())
    whole = tmp_path / "whole.safetensors"
    write_file(whole, {"k": keys, "z": np.zeros(0, np.int8), "v": values}, {"m": "1"})
    assert streamed.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize(
    "writes, reason",
    [
        ([("a", np.zeros((3, 2), np.float32))], "tensor 'a': incomplete: 24 of 32 bytes written"),
        ([("a", np.zeros((5, 2), np.float32))], "chunk of 40 bytes overflows the tensor: 0 of 32"),
        ([("b", np.zeros(1, np.int64))], "tensor 'b': out of order: 'a' is incomplete (0 of 32 bytes"),
        (
            [("a", np.zeros((4, 2), np.float32)), ("b", np.zeros(1, np.int64)),
             ("a", np.zeros((0, 2), np.float32))],
            "tensor 'a': out of order: already moved on to 'b'",
        ),
        ([("c", np.zeros(1))], "tensor 'c': not declared in the header"),
        ([("a", np.zeros((4, 2), np.float64))], "chunk dtype float64 does not match declared F32"),
        ([("a", np.zeros((2, 4), np.float32))], "chunk shape [2, 4] does not fit declared shape [4, 2]"),
        ([("a", [1.0])], "chunk must be a numpy array or bytes, found list"),
    ],
)
def test_stream_writer_rejects_bad_writes(tmp_path, writes, reason):
    path = tmp_path / "out.safetensors"
    with pytest.raises(InvalidInputError) as info:
        with StreamWriter(path, [("a", "F32", (4, 2)), ("b", "I64", (1,))]) as out:
            for name, chunk in writes:
                out.write(name, chunk)
            if not reason.startswith("tensor 'a': incomplete"):
                out.write("b", np.zeros(1, np.int64))
    assert reason in str(info.value) and "out.safetensors" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "specs, reason",
    [
        ([("a", "F32", (1,)), ("a", "F32", (1,))], "tensor 'a': duplicate tensor name"),
        ([("__metadata__", "F32", (1,))], "invalid tensor name __metadata__"),
        ([("a", "Q4", (1,))], "unknown dtype Q4"),
        ([("a", "F32", (-1,))], "shape must be a sequence of non-negative ints, found (-1,)"),
        ([("a", "F32", (1.5,))], "shape must be a sequence of non-negative ints"),
    ],
)
def test_stream_writer_rejects_bad_specs(tmp_path, specs, reason):
    with pytest.raises(InvalidInputError) as info:
        StreamWriter(tmp_path / "out.safetensors", specs)
    assert reason in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_write_file_rejects_bad_values(tmp_path):
    with pytest.raises(InvalidInputError, match="tensor 'x': expected a numpy array or RawTensor, found"):
        write_file(tmp_path / "o.safetensors", {"x": [1, 2]})
    with pytest.raises(InvalidInputError, match="tensor 'x': numpy dtype complex64 has no safetensors"):
        write_file(tmp_path / "o.safetensors", {"x": np.zeros(1, np.complex64)})
    with pytest.raises(InvalidInputError, match="metadata must map str to str, found k: 1"):
        write_file(tmp_path / "o.safetensors", {}, {"k": 1})
    assert list(tmp_path.iterdir()) == []


def test_written_file_is_not_private(tmp_path):
    path = _write_plain(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# Property: our writer -> reference reader and our reader, for any shape and dtype

_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None)
@given(
    specs=st.lists(st.tuples(st.sampled_from(sorted(NUMPY_DTYPES)), _shapes), min_size=0, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(specs, seed):
    rng = np.random.default_rng(seed)
    tensors = {f"t{i}": _random(rng, dtype, shape) for i, (dtype, shape) in enumerate(specs)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.safetensors"
        write_file(path, tensors)
        header = read_header(path)
        reference = safetensors.numpy.load_file(path)
        assert list(header.tensors) == list(tensors)
        for name, array in tensors.items():
            assert _same(read_tensor(header, name), array)
            assert _same(np.asarray(reference[name]), array)
            if array.ndim:
                assert _same(read_tensor(header, name, index=(slice(1, None, 2),)), array[1::2])


def test_stream_writer_replace_metadata_in_place(tmp_path):
    import safetensors.numpy as stn

    from fibquant_cli.formats.stfile import read_header
    from fibquant_cli.storage.stwriter import StreamWriter

    out = tmp_path / "m.safetensors"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with StreamWriter(out, [("x", "F32", (3, 4))], {"d": "0" * 8}) as w:
        w.write("x", x)
        with pytest.raises(ValueError, match="same length|placeholder"):
            w.replace_metadata({"d": "0" * 40})
        w.replace_metadata({"d": "abcdef12"})
    assert read_header(out).metadata == {"d": "abcdef12"}
    np.testing.assert_array_equal(stn.load_file(out)["x"], x)


def _write_four(path, arrays):
    with StreamWriter(path, [(n, "F32", a.shape) for n, a in arrays.items()]) as w:
        for name, arr in arrays.items():
            for rows in (arr[:20], arr[20:]):
                w.write(name, rows)


def test_background_syncs_change_nothing(tmp_path, monkeypatch):
    """StreamWriter syncs in a background thread every WRITEBACK_BYTES while writing goes on;
    every byte still lands, in order."""
    from fibquant_cli.storage import stwriter

    monkeypatch.setattr(stwriter, "WRITEBACK_BYTES", 1000)
    real, calls = getattr(os, "fdatasync", os.fsync), []

    def counted(fd):
        calls.append(fd)
        real(fd)
    monkeypatch.setattr(os, "fdatasync", counted, raising=False)
    rng = np.random.default_rng(3)
    arrays = {f"t{i}": rng.standard_normal((50, 16)).astype(np.float32) for i in range(4)}
    path = tmp_path / "w.safetensors"
    _write_four(path, arrays)
    loaded = safetensors.numpy.load_file(path)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(loaded[name], arr)
    assert calls  # synced on the way, not only at the end


def test_a_failed_background_sync_fails_the_write(tmp_path, monkeypatch):
    """An I/O error in a background sync is the write's error: one line, no output left."""
    from fibquant_cli.storage import stwriter

    monkeypatch.setattr(stwriter, "WRITEBACK_BYTES", 1000)

    def broken(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", broken, raising=False)
    arrays = {f"t{i}": np.ones((50, 16), np.float32) for i in range(4)}
    path = tmp_path / "w.safetensors"
    with pytest.raises(UsageError, match="cannot write output: Input/output error"):
        _write_four(path, arrays)
    assert list(tmp_path.iterdir()) == []
