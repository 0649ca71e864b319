"""Tests for fibquant_cli.core.bitpack: LSB-first fixed-width packing of unsigned indices.

Every expected byte string is either typed out by hand (with the derivation in a comment) or
produced by ``reference_pack`` below, a plain per-bit loop that follows the layout rule
"bit b of index i is stream bit p = i*w + b = byte p // 8, bit p % 8" literally.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibquant_cli.core import bitpack
from fibquant_cli.core.bitpack import pack, packed_n_bytes, unpack, unpack_range
from fibquant_cli.errors import IntegrityError, InvalidInputError

ALL_WIDTHS = list(range(1, 33))
PROPERTY_WIDTHS = list(range(1, 21)) + [32]


def reference_pack(values, width: int) -> bytes:
    """The layout rule, one bit at a time."""
    out = bytearray((len(values) * width + 7) // 8)
    for i, value in enumerate(values):
        for b in range(width):
            if (int(value) >> b) & 1:
                p = i * width + b
                out[p // 8] |= 1 << (p % 8)
    return bytes(out)


def reference_unpack(data: bytes, count: int, width: int) -> list[int]:
    values = []
    for i in range(count):
        v = 0
        for b in range(width):
            p = i * width + b
            v |= ((data[p // 8] >> (p % 8)) & 1) << b
        values.append(v)
    return values


def numpy_reference_pack(values: np.ndarray, width: int) -> np.ndarray:
    """An independent vectorized reference (bit matrix + packbits), for inputs too big to loop."""
    v = values.astype(np.uint64).reshape(-1)
    bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little")


def random_indices(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    return rng.integers(0, 1 << width, size=n, dtype=np.uint64).astype(
        np.uint32 if width <= 32 else np.uint64
    )


# --------------------------------------------------------------------------- golden examples

GOLDEN = [
    # width 3, [5, 2, 7]: 5 = 101b -> stream bits 0..2 = 1,0,1; 2 = 010b -> bits 3..5 = 0,1,0;
    # 7 = 111b -> bits 6..8 = 1,1,1. Byte 0 holds bits 0..7: reading bit 7 down to bit 0 gives
    # 1 1 0 1 0 1 0 1 = 0xD5. Byte 1 holds bit 8 (= 1) in its bit 0, the rest is padding: 0x01.
    (3, [5, 2, 7], bytes([0xD5, 0x01])),
    # width 12, [0xABC, 0x123]: 24 bits, the stream read as a little-endian integer is
    # 0xABC | 0x123 << 12 = 0x123ABC, i.e. bytes BC 3A 12.
    (12, [0xABC, 0x123], bytes([0xBC, 0x3A, 0x12])),
    # width 5, [31, 0, 1]: 31 | 0 << 5 | 1 << 10 = 0x041F over 15 bits -> bytes 1F 04.
    (5, [31, 0, 1], bytes([0x1F, 0x04])),
    # width 1, [1,0,1,1,0,0,0,0,1]: byte 0 = bits 0..7 = 1,0,1,1,0,0,0,0 -> 0b00001101 = 0x0D;
    # byte 1 bit 0 = 1 -> 0x01.
    (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], bytes([0x0D, 0x01])),
    # width 4, [1, 2, 3]: low nibble first -> 0x21, then 0x03 (high nibble is padding).
    (4, [1, 2, 3], bytes([0x21, 0x03])),
    # widths 8 / 16 / 32 are plain little-endian integers.
    (8, [0x00, 0x7F, 0xFF], bytes([0x00, 0x7F, 0xFF])),
    (16, [0xBEEF, 0x0102], bytes([0xEF, 0xBE, 0x02, 0x01])),
    (32, [0x01020304, 0xFFFFFFFF], bytes([0x04, 0x03, 0x02, 0x01, 0xFF, 0xFF, 0xFF, 0xFF])),
    # width 7, [0x7F] * 8 fills exactly 7 bytes with ones.
    (7, [0x7F] * 8, bytes([0xFF] * 7)),
    # empty input -> no bytes.
    (9, [], b""),
]


@pytest.mark.parametrize("width, values, expected", GOLDEN)
def test_golden_examples(width, values, expected):
    assert reference_pack(values, width) == expected  # the reference agrees with the hand work
    packed = pack(np.array(values, dtype=np.uint64), width)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.tobytes() == expected
    got = unpack(expected, len(values), width)
    assert got.dtype == np.uint32
    assert got.tolist() == values


def test_module_docstring_example():
    assert pack([5, 2, 7], 3).tobytes() == bytes([0xD5, 0x01])
    assert "0xD5" in bitpack.__doc__


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "count, width, expected", [(0, 5, 0), (1, 1, 1), (8, 1, 1), (9, 1, 2), (3, 3, 2), (8, 3, 3),
                               (1, 32, 4), (5, 12, 8), (10**9, 20, 2_500_000_000)]
)
def test_packed_n_bytes(count, width, expected):
    assert packed_n_bytes(count, width) == expected


@pytest.mark.parametrize("width", [0, 33, -1, 64, True, 3.0, "4", None])
def test_bad_width_rejected_everywhere(width):
    with pytest.raises(InvalidInputError):
        packed_n_bytes(4, width)
    with pytest.raises(InvalidInputError):
        pack([1, 0], width)
    with pytest.raises(InvalidInputError):
        unpack(b"\x00", 1, width)
    with pytest.raises(InvalidInputError):
        unpack_range(b"\x00", 0, 1, width)


@pytest.mark.parametrize("count", [-1, 2.0, None, False])
def test_bad_count_rejected(count):
    with pytest.raises(InvalidInputError):
        packed_n_bytes(count, 4)
    with pytest.raises(InvalidInputError):
        unpack(b"", count, 4)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("width", PROPERTY_WIDTHS)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_round_trip_property(width, data):
    values = data.draw(st.lists(st.integers(0, (1 << width) - 1), max_size=70), label="values")
    dtype = data.draw(
        st.sampled_from([d for d in (np.uint8, np.uint16, np.uint32, np.uint64, np.int64)
                         if np.iinfo(d).max >= (1 << width) - 1]),
        label="dtype",
    )
    arr = np.array(values, dtype=dtype)
    packed = pack(arr, width)
    assert packed.tobytes() == reference_pack(values, width)
    assert packed.size == packed_n_bytes(len(values), width)
    out = unpack(packed.tobytes(), len(values), width)
    assert out.dtype == np.uint32
    assert out.tolist() == values


@pytest.mark.parametrize("width", PROPERTY_WIDTHS)
@settings(max_examples=8, deadline=None)
@given(n=st.integers(0, 2000), seed=st.integers(0, 2**32 - 1))
def test_round_trip_property_long(width, n, seed):
    x = random_indices(np.random.default_rng(seed), n, width)
    packed = pack(x, width)
    np.testing.assert_array_equal(packed, numpy_reference_pack(x, width))
    np.testing.assert_array_equal(unpack(packed, n, width), x)


@pytest.mark.parametrize("width", ALL_WIDTHS)
def test_pack_matches_per_bit_reference_random(width):
    rng = np.random.default_rng(1000 + width)
    for n in (1, 7, 8, 9, 33, 64, 65, 131, 257):
        x = random_indices(rng, n, width)
        packed = pack(x, width).tobytes()
        assert packed == reference_pack(x.tolist(), width)
        assert reference_unpack(packed, n, width) == x.tolist()
        assert unpack(packed, n, width).tolist() == x.tolist()


@pytest.mark.parametrize("width", ALL_WIDTHS)
def test_extreme_values(width):
    top = (1 << width) - 1
    for values in ([top] * 37, [0] * 37, [top, 0] * 20, [1 << (width - 1)] * 19):
        packed = pack(np.array(values, dtype=np.uint64), width)
        assert packed.tobytes() == reference_pack(values, width)
        assert unpack(packed, len(values), width).tolist() == values


def test_shapes_dtypes_and_containers():
    x = np.arange(24, dtype=np.uint16).reshape(2, 3, 4) % 16
    expected = pack(x.reshape(-1), 4)
    np.testing.assert_array_equal(pack(x, 4), expected)
    # a Fortran-ordered array is still flattened in C order
    np.testing.assert_array_equal(pack(np.asfortranarray(x), 4), expected)
    # a non-contiguous view and a python list
    big = np.arange(100, dtype=np.uint32) % 8
    np.testing.assert_array_equal(pack(big[::3], 3), pack(big[::3].copy(), 3))
    assert pack([3, 1], 2).tobytes() == bytes([0b0111])
    # signed ints in range are accepted; big-endian input gives the same little-endian stream
    np.testing.assert_array_equal(pack(x.astype(np.int32), 4), expected)
    np.testing.assert_array_equal(pack(x.astype(">u4"), 16), pack(x.astype("<u4"), 16))
    # unpack accepts bytes, bytearray, memoryview and uint8 arrays alike
    raw = expected.tobytes()
    for data in (raw, bytearray(raw), memoryview(raw), expected, expected.reshape(3, 4)):
        assert unpack(data, 24, 4).tolist() == x.reshape(-1).tolist()
    with pytest.raises(InvalidInputError):
        unpack(memoryview(bytearray(24))[::2], 24, 4)  # not contiguous
    # pack returns a fresh array, never a view of the input
    u8 = np.arange(10, dtype=np.uint8)
    p = pack(u8, 8)
    p[0] = 99
    assert u8[0] == 0


def test_pack_rejects_out_of_range_indices():
    for width in ALL_WIDTHS:
        bad = np.zeros(50, dtype=np.uint64)
        bad[41] = 1 << width
        with pytest.raises(InvalidInputError, match=r"position 41 .* %d bits" % width):
            pack(bad, width)
    with pytest.raises(InvalidInputError, match="index -1 at position 2"):
        pack(np.array([0, 1, -1, 2], dtype=np.int64), 5)
    with pytest.raises(InvalidInputError):
        pack([0, 256], 8)
    with pytest.raises(InvalidInputError):
        pack([0, -1], 16)
    with pytest.raises(InvalidInputError):
        pack([1 << 32], 32)
    with pytest.raises(InvalidInputError, match="dtype float"):
        pack(np.array([1.0, 2.0]), 4)
    with pytest.raises(InvalidInputError):
        pack(np.array([True, False]), 1)
    # out of range in the partial last group, past a block boundary
    x = np.zeros(21, dtype=np.uint32)
    x[-1] = 8
    with pytest.raises(InvalidInputError, match="position 20"):
        pack(x, 3)


def test_unpack_rejects_wrong_length():
    packed = pack(np.arange(10, dtype=np.uint8), 4).tobytes()  # 5 bytes
    with pytest.raises(
        IntegrityError, match=r"^packed stream has 6 bytes, expected 5 for 10 indices of 4 bits$"
    ):
        unpack(packed + b"\x00", 10, 4)
    with pytest.raises(IntegrityError, match="has 4 bytes, expected 5"):
        unpack(packed[:-1], 10, 4)
    with pytest.raises(IntegrityError, match="has 1 bytes, expected 0"):
        unpack(b"\x00", 0, 7)
    for width in (8, 16, 32):
        with pytest.raises(IntegrityError):
            unpack(bytes(width // 8 * 3 + 1), 3, width)
    with pytest.raises(InvalidInputError):
        unpack(np.zeros(5, dtype=np.uint16), 10, 4)
    with pytest.raises(InvalidInputError):
        unpack("abc", 2, 4)


@pytest.mark.parametrize("width", ALL_WIDTHS)
def test_unpack_rejects_nonzero_padding(width):
    for count in range(1, 17):
        used = (count * width) % 8
        if not used:
            continue
        packed = bytearray(pack(np.full(count, (1 << width) - 1, dtype=np.uint64), width).tobytes())
        assert packed[-1] == (1 << used) - 1  # all used bits set, padding clear
        for bit in range(used, 8):
            bad = bytearray(packed)
            bad[-1] |= 1 << bit
            with pytest.raises(IntegrityError, match="padding"):
                unpack(bytes(bad), count, width)
        assert unpack(bytes(packed), count, width).tolist() == [(1 << width) - 1] * count


def test_errors_are_one_line():
    for call in (lambda: unpack(b"\x00\x00", 1, 3), lambda: unpack(b"\x80", 1, 3),
                 lambda: pack([9], 3), lambda: unpack_range(b"", 0, 4, 3)):
        with pytest.raises((IntegrityError, InvalidInputError)) as info:
            call()
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- random access


@pytest.mark.parametrize("width", ALL_WIDTHS)
def test_unpack_range_matches_unpack(width):
    rng = np.random.default_rng(7 * width)
    n = 700
    x = random_indices(rng, n, width)
    packed = pack(x, width)
    full = unpack(packed, n, width)
    ranges = [(0, n), (0, 0), (n, n), (0, 1), (n - 1, n), (3, 5), (8, 16), (7, 9), (5, 45)]
    ranges += [tuple(sorted(rng.integers(0, n + 1, size=2).tolist())) for _ in range(25)]
    for start, stop in ranges:
        got = unpack_range(packed, start, stop, width)
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(got, full[start:stop])
        # only bytes floor(start*w/8) .. ceil(stop*w/8) are read: truncate the stream right
        # after them and poison every byte before them
        b0, b1 = start * width // 8, (stop * width + 7) // 8
        poisoned = packed[:b1].copy()
        poisoned[:b0] = 0xFF
        got = unpack_range(poisoned.tobytes(), start, stop, width)
        np.testing.assert_array_equal(got, full[start:stop])


@settings(max_examples=40, deadline=None)
@given(
    width=st.sampled_from(PROPERTY_WIDTHS),
    n=st.integers(0, 400),
    seed=st.integers(0, 2**32 - 1),
    bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)),
)
def test_unpack_range_property(width, n, seed, bounds):
    x = random_indices(np.random.default_rng(seed), n, width)
    start, stop = sorted(int(f * n) for f in bounds)
    np.testing.assert_array_equal(unpack_range(pack(x, width), start, stop, width), x[start:stop])


def test_unpack_range_rejects_bad_arguments():
    packed = pack(np.arange(20, dtype=np.uint8) % 8, 3)  # 60 bits -> 8 bytes
    with pytest.raises(InvalidInputError, match="stop < start"):
        unpack_range(packed, 5, 4, 3)
    with pytest.raises(InvalidInputError):
        unpack_range(packed, -1, 4, 3)
    with pytest.raises(IntegrityError, match="need at least 9"):
        unpack_range(packed, 0, 22, 3)  # 66 bits
    # stop = 21 needs 63 bits = 8 bytes: allowed (reads padding as a value, no length check)
    assert unpack_range(packed, 0, 21, 3).size == 21


# --------------------------------------------------------------------------- block boundaries


@pytest.mark.parametrize("chunk", [8, 16, 40])
@pytest.mark.parametrize("width", [1, 3, 7, 12, 13, 24, 25, 26])
def test_chunk_boundaries(monkeypatch, chunk, width):
    monkeypatch.setattr(bitpack, "CHUNK_INDICES", chunk)
    rng = np.random.default_rng(chunk * 100 + width)
    deltas = (-9, -8, -1, 0, 1, 7, 8, 9)
    lengths = sorted({max(0, k * chunk + d) for k in (1, 2, 5) for d in deltas})
    for n in lengths:
        x = random_indices(rng, n, width)
        packed = pack(x, width)
        np.testing.assert_array_equal(packed, numpy_reference_pack(x, width))
        np.testing.assert_array_equal(unpack(packed, n, width), x)
        for start, stop in ((0, n), (1, n), (chunk - 1, n - 1), (n // 3, n // 2 + 9)):
            start, stop = min(start, n), max(min(stop, n), min(start, n))
            np.testing.assert_array_equal(unpack_range(packed, start, stop, width), x[start:stop])


@pytest.mark.parametrize("width", [6, 12, 27])
def test_default_chunk_boundaries(width):
    chunk = bitpack.CHUNK_INDICES
    rng = np.random.default_rng(width)
    x = random_indices(rng, chunk * 2 + 9, width)
    for n in (chunk - 1, chunk, chunk + 1, chunk + 8, 2 * chunk + 9):
        packed = pack(x[:n], width)
        np.testing.assert_array_equal(packed, numpy_reference_pack(x[:n], width))
        np.testing.assert_array_equal(unpack(packed, n, width), x[:n])


def test_chunk_size_must_be_a_multiple_of_8(monkeypatch):
    monkeypatch.setattr(bitpack, "CHUNK_INDICES", 12)
    with pytest.raises(InvalidInputError):
        pack(np.zeros(100, dtype=np.uint8), 3)


@pytest.mark.parametrize("width", [5, 12])
def test_memory_is_bounded(width):
    n = 1 << 21
    x = random_indices(np.random.default_rng(0), n, width)
    out_bytes = packed_n_bytes(n, width)
    tracemalloc.start()
    try:
        packed = pack(x, width)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        values = unpack(packed, n, width)
        _, peak_unpack = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    slack = 8 << 20  # far below the n * width bytes of a per-bit temporary (10-24 MB here)
    assert peak < out_bytes + slack
    assert peak_unpack < out_bytes + 4 * n + slack
    np.testing.assert_array_equal(values, x)


@pytest.mark.parametrize("width", [3, 6, 8, 13, 16, 31, 32])
def test_unpack_into_other_integer_types(width):
    rng = np.random.default_rng(width)
    values = rng.integers(0, 2**width, size=203, dtype=np.uint64)
    data = pack(values, width)
    for dtype in (np.intp, np.int64, np.uint64):
        got = unpack(data, values.size, width, dtype)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, values)
        np.testing.assert_array_equal(unpack_range(data, 5, 150, width, dtype), values[5:150])


def test_unpack_refuses_a_type_too_narrow():
    data = pack(np.arange(10), 9)
    with pytest.raises(InvalidInputError, match="cannot hold"):
        unpack(data, 10, 9, np.uint8)
    with pytest.raises(InvalidInputError, match="cannot hold"):
        unpack(pack(np.arange(10), 32), 10, 32, np.int32)
    with pytest.raises(InvalidInputError, match="cannot hold"):
        unpack(data, 10, 9, np.float64)
