"""The bytes of a compressed file, read back by hand as docs/container.md specifies them.

Nothing here parses with fibquant: the header is unpacked with struct and json, digests are
recomputed with blake3, and the codes are unpacked bit by bit and checked against a
brute-force nearest-codeword search with the file's own codebook and rotation.
"""

from __future__ import annotations

import json
import struct

import blake3
import numpy as np
import pytest

from conftest import make_dump, ok


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    from conftest import invoke

    tmp = tmp_path_factory.mktemp("bytes")
    dump = make_dump(tmp, tokens=8, layers=1, kv_heads=1, query_heads=1, seed=5)
    out = tmp / "o.fq.safetensors"
    ok(invoke("compress", dump.path, "--bits", 3, "--keep-first", 1, "-o", out, "--no-attention"))
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return dump, raw, n, header


def _array(raw, n, header, name):
    entry = header[name]
    begin, end = entry["data_offsets"]
    dtype = {"F32": "<f4", "F16": "<f2", "U8": "u1", "I64": "<i8"}[entry["dtype"]]
    return np.frombuffer(raw[8 + n + begin:8 + n + end], dtype=dtype).reshape(entry["shape"])


def test_header_is_padded_json_with_the_documented_order(written):
    _, raw, n, header = written
    text = raw[8:8 + n].decode()
    compact = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    assert n % 8 == 0 and text == compact + " " * (n - len(compact)) and n - len(compact) < 8
    assert list(header) == ["__metadata__", "fq/p0/codebook", "fq/p0/rotation",
                            "fq/e0/l0/codes", "fq/e0/l0/norms", "fq/e0/l0/mean", "fq/e0/l0/kept",
                            "fq/e1/l0/codes", "fq/e1/l0/norms", "fq/e1/l0/kept",
                            "fq/raw/input_ids", "fq/raw/layer.0.query"]
    cursor = 0
    for name, entry in list(header.items())[1:]:  # back to back, no gaps
        assert entry["data_offsets"][0] == cursor, name
        cursor = entry["data_offsets"][1]
    assert 8 + n + cursor == len(raw)


def test_metadata_and_document_digest(written):
    _, raw, n, header = written
    meta = header["__metadata__"]
    assert set(meta) == {"fibquant_format", "fibquant", "fibquant_digest"}
    assert meta["fibquant_format"] == "3"
    expected = blake3.blake3(b"fibquant_container_v1\x00" + meta["fibquant"].encode()).hexdigest()
    assert meta["fibquant_digest"] == "blake3:" + expected
    doc = json.loads(meta["fibquant"])
    assert [e["codec"] for e in doc["entries"]] == ["fibquant", "fibquant"]
    assert [e["center"] for e in doc["entries"]] == [True, False]


def test_every_array_digest_is_blake3_of_its_dtype_shape_and_bytes(written):
    _, raw, n, header = written
    doc = json.loads(header["__metadata__"]["fibquant"])
    for name, entry in list(header.items())[1:]:
        begin, end = entry["data_offsets"]
        prefix = json.dumps({"dtype": entry["dtype"], "shape": entry["shape"]},
                            separators=(",", ":")).encode()
        digest = blake3.blake3(b"fibquant_tensor_v1\x00" + prefix + b"\x00"
                               + raw[8 + n + begin:8 + n + end]).hexdigest()
        assert doc["arrays"][name] == "blake3:" + digest, name


def test_codes_are_the_nearest_codewords_packed_lsb_first(written):
    dump, raw, n, header = written
    codebook = _array(raw, n, header, "fq/p0/codebook").astype(np.float64)  # (64, 2)
    rotation = _array(raw, n, header, "fq/p0/rotation").astype(np.float64)  # (64, 64)
    packed = _array(raw, n, header, "fq/e0/l0/codes")
    norms = _array(raw, n, header, "fq/e0/l0/norms").reshape(-1)
    mean = _array(raw, n, header, "fq/e0/l0/mean").reshape(-1)
    keys = dump.canonical[("key", 0)].astype(np.float64).reshape(-1, 64)[1:]  # token 0 is kept
    x = keys - mean
    assert np.allclose(norms, np.linalg.norm(x, axis=1), rtol=1e-3)
    y = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ rotation.T  # rows: y = Pi u
    blocks = y.reshape(-1, 2)
    dist = ((blocks[:, None, :] - codebook[None]) ** 2).sum(-1)
    expected = dist.argmin(axis=1)
    bits = int.from_bytes(packed.tobytes(), "little")
    got = [(bits >> (6 * i)) & 63 for i in range(expected.size)]  # 6-bit wires for N = 64
    # float32 arithmetic in the encoder may pick the other of two near-equidistant codewords
    near_ties = np.sort(dist, axis=1)[:, 1] - dist.min(axis=1) < 1e-6
    assert all(g == e or t for g, e, t in zip(got, expected, near_ties))
    assert len(packed) == -(-expected.size * 6 // 8)


def test_kept_tokens_and_raw_tensors_are_the_source_bytes(written):
    dump, raw, n, header = written
    kept = _array(raw, n, header, "fq/e1/l0/kept")
    np.testing.assert_array_equal(kept.reshape(-1), dump.canonical[("value", 0)][0, 0, 0])
    ids = _array(raw, n, header, "fq/raw/input_ids")
    np.testing.assert_array_equal(ids, dump.tensors["input_ids"])
