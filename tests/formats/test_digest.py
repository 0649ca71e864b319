"""Tests for fibquant_cli.formats.digest: every expected value is rebuilt here by hand with blake3."""

from __future__ import annotations

import blake3
import ml_dtypes
import numpy as np
import pytest

from fibquant_cli.errors import InvalidInputError
from fibquant_cli.formats import digest as digest_mod
from fibquant_cli.formats.digest import (
    bytes_digest,
    file_digest,
    format_digest,
    json_digest,
    parse_digest,
    tensor_digest,
)
from fibquant_cli.formats.manifest import KvShape

# The contract's compact JSON for this shape, typed out by hand (keys in contract order).
SHAPE_JSON = (
    '{"schema_version":"fib_quant_kv_tensor_shape_v1","role":"key","attention_kind":"gqa",'
    '"batch":1,"layers":2,"kv_heads":2,"query_heads":4,"tokens":128,"head_dim":64,'
    '"dtype":"f16","rope_state":"post_rope"}'
)


def reference(tag: bytes, payload: bytes) -> str:
    return "blake3:" + blake3.blake3(tag + b"\x00" + payload).hexdigest()


def test_blake3_library_matches_the_official_empty_input_vector():
    expected = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert blake3.blake3(b"").hexdigest() == expected


def test_shape_digest_matches_the_crate_scheme():
    shape = KvShape(
        role="key", attention_kind="gqa", batch=1, layers=2, kv_heads=2, query_heads=4,
        tokens=128, head_dim=64, dtype="f16", rope_state="post_rope",
    )
    expected = reference(b"fib_quant_kv_tensor_shape_v1", SHAPE_JSON.encode())
    assert shape.digest() == expected
    assert json_digest("fib_quant_kv_tensor_shape_v1", shape.to_json()) == expected


def test_json_digest_keeps_key_order_and_raw_unicode():
    assert json_digest("t", {"a": 1, "b": [True, None]}) == reference(b"t", b'{"a":1,"b":[true,null]}')
    assert json_digest("t", {"a": 1, "b": 2}) != json_digest("t", {"b": 2, "a": 1})
    assert json_digest("t", {"n": "é\n"}) == reference(b"t", '{"n":"é\\n"}'.encode())


def test_json_digest_is_domain_separated():
    assert json_digest("a", [1]) != json_digest("b", [1])
    # the 0x00 separator keeps tag and payload apart
    assert bytes_digest("ab", b"c") != bytes_digest("a", b"bc")


def test_json_digest_refuses_nan_and_bad_tags():
    with pytest.raises(ValueError):
        json_digest("t", {"x": float("nan")})
    with pytest.raises(ValueError):
        json_digest("a\x00b", {})
    with pytest.raises(ValueError):
        json_digest("", {})


def test_bytes_digest_matches_reference_for_bytes_and_memoryview(monkeypatch):
    data = bytes(range(256)) * 5
    expected = reference(b"raw", data)
    assert bytes_digest("raw", data) == expected
    assert bytes_digest("raw", memoryview(data)) == expected
    assert bytes_digest("raw", bytearray(data)) == expected
    monkeypatch.setattr(digest_mod, "_CHUNK_BYTES", 7)
    assert bytes_digest("raw", data) == expected


def test_tensor_digest_matches_reference_framing():
    arr = np.arange(6, dtype="<f4").reshape(2, 3)
    expected = reference(
        b"fibquant_tensor_v1", b'{"dtype":"F32","shape":[2,3]}' + b"\x00" + arr.tobytes()
    )
    assert tensor_digest("F32", (2, 3), arr) == expected
    assert tensor_digest("F32", (2, 3), arr.tobytes()) == expected


def test_tensor_digest_covers_dtype_and_shape_for_identical_bytes():
    data = bytes(range(12))
    by_dtype = {tensor_digest(dt, (6,), data) for dt in ("F16", "BF16", "I16", "U16")}
    assert len(by_dtype) == 4
    by_shape = {tensor_digest("F16", shape, data) for shape in [(6,), (2, 3), (3, 2), (1, 6)]}
    assert len(by_shape) == 4


def test_tensor_digest_scalar_and_empty():
    assert tensor_digest("F32", (), np.float32(1.5).tobytes()) == reference(
        b"fibquant_tensor_v1", b'{"dtype":"F32","shape":[]}\x00' + np.float32(1.5).tobytes()
    )
    assert tensor_digest("F32", (), np.array(1.5, np.float32)) == tensor_digest(
        "F32", (), np.float32(1.5).tobytes()
    )
    assert tensor_digest("F16", (0, 4), b"") == reference(
        b"fibquant_tensor_v1", b'{"dtype":"F16","shape":[0,4]}\x00'
    )


@pytest.mark.parametrize("chunk", [1 << 24, 5, 64, 1000])
def test_tensor_digest_of_strided_and_byte_swapped_arrays(monkeypatch, chunk):
    monkeypatch.setattr(digest_mod, "_CHUNK_BYTES", chunk)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    strided = base.transpose(0, 2, 1, 3)
    contiguous = np.ascontiguousarray(strided)
    expected = reference(
        b"fibquant_tensor_v1", b'{"dtype":"F32","shape":[3,5,4,6]}\x00' + contiguous.tobytes()
    )
    assert tensor_digest("F32", strided.shape, strided) == expected
    assert tensor_digest("F32", contiguous.shape, contiguous) == expected
    big_endian = contiguous.astype(">f4")
    assert tensor_digest("F32", big_endian.shape, big_endian) == expected
    assert tensor_digest("F32", strided.shape, strided.astype(">f4")) == expected
    sliced = base[:, ::2]
    assert tensor_digest("F32", sliced.shape, sliced) == tensor_digest(
        "F32", sliced.shape, np.ascontiguousarray(sliced).tobytes()
    )


def test_tensor_digest_bf16_array():
    arr = np.linspace(-2, 2, 8, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 4)
    assert tensor_digest("BF16", (2, 4), arr) == tensor_digest("BF16", (2, 4), arr.tobytes())


def test_tensor_digest_rejects_length_mismatch():
    with pytest.raises(InvalidInputError, match=r"tensor data is 10 bytes, expected 12 for F16 \[2, 3\]"):
        tensor_digest("F16", (2, 3), bytes(10))
    with pytest.raises(InvalidInputError):
        tensor_digest("F32", (2, 3), np.zeros((2, 2), np.float32))


def test_tensor_digest_rejects_bad_arguments():
    with pytest.raises(ValueError):
        tensor_digest("", (1,), b"\x00")
    with pytest.raises(ValueError):
        tensor_digest("U8", (-1,), b"")
    with pytest.raises(ValueError):
        tensor_digest("U8", (True,), b"\x00")


def test_file_digest_is_independent_of_order_and_matches_reference():
    a = bytes_digest("x", b"a")
    b = bytes_digest("x", b"b")
    forward = {"layer.0.key": a, "layer.0.value": b}
    backward = {"layer.0.value": b, "layer.0.key": a}
    expected = reference(
        b"fibquant_file_v1", f'[["layer.0.key","{a}"],["layer.0.value","{b}"]]'.encode()
    )
    assert file_digest(forward) == expected
    assert file_digest(backward) == expected
    assert file_digest({"layer.0.key": b, "layer.0.value": a}) != expected
    assert file_digest({}) == reference(b"fibquant_file_v1", b"[]")


def test_file_digest_rejects_malformed_member_digest():
    with pytest.raises(InvalidInputError, match=r"^tensor 'w': digest 'nope' is not"):
        file_digest({"w": "nope"})


def test_parse_digest_round_trip():
    raw = bytes(range(32))
    text = format_digest(raw)
    assert text == "blake3:" + raw.hex()
    assert parse_digest(text) == raw


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "blake3:",
        "blake3:" + "0" * 63,
        "blake3:" + "0" * 65,
        "blake3:" + "A" * 64,
        "blake3:" + "g" * 64,
        "BLAKE3:" + "0" * 64,
        "sha256:" + "0" * 64,
        "0" * 64,
        "blake3:" + "0" * 64 + "\n",
        " blake3:" + "0" * 64,
    ],
)
def test_parse_digest_rejects_bad_strings(bad):
    with pytest.raises(InvalidInputError) as info:
        parse_digest(bad)
    assert "\n" not in str(info.value)
    assert "64 lower-case hex digits" in str(info.value)


@pytest.mark.parametrize("bad", [None, 5, b"blake3:" + b"0" * 64])
def test_parse_digest_rejects_non_strings(bad):
    with pytest.raises(InvalidInputError, match="digest must be a string"):
        parse_digest(bad)
