"""``fibquant validate`` and ``fibquant digest`` on dumps, manifests and compressed files."""

from __future__ import annotations

import json
import re

import blake3

from conftest import (
    header_order,
    write_safetensors,
)
from conftest import ok as assert_ok

# ----------------------------------------------------------------------------- validate and digest


def test_validate_good_dump(cli, dump):
    res = assert_ok(cli("validate", dump.path))
    assert "FAIL" not in res.stdout and "pass" in res.stdout
    rep = json.loads(assert_ok(cli("validate", dump.path, "--json")).stdout)
    assert rep["ok"] is True and rep["kind"] == "dump" and rep["error"] is None
    assert all(check["ok"] for check in rep["checks"])


def test_validate_good_compressed(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    res = assert_ok(cli("validate", tmp_path / "kv.fq.safetensors"))
    assert "FAIL" not in res.stdout and "pass" in res.stdout


def _blake3(tag: bytes, payload: bytes) -> str:
    return "blake3:" + blake3.blake3(tag + b"\x00" + payload).hexdigest()


def test_digest_of_manifest_matches_independent_blake3(cli, dump):
    key = ('{"schema_version":"fib_quant_kv_tensor_shape_v1","role":"key","attention_kind":"gqa",'
           '"batch":1,"layers":2,"kv_heads":2,"query_heads":4,"tokens":32,"head_dim":64,'
           '"dtype":"f16","rope_state":"post_rope"}')
    value = ('{"schema_version":"fib_quant_kv_tensor_shape_v1","role":"value",'
             '"attention_kind":"gqa","batch":1,"layers":2,"kv_heads":2,"query_heads":4,'
             '"tokens":32,"head_dim":64,"dtype":"f16","rope_state":"not_applicable"}')
    expected = [_blake3(b"fib_quant_kv_tensor_shape_v1", s.encode()) for s in (key, value)]
    rep = json.loads(assert_ok(cli("digest", dump.manifest_path, "--json")).stdout)
    assert rep["kind"] == "manifest"
    assert [row["digest"] for row in rep["digests"]] == expected
    text = assert_ok(cli("digest", dump.manifest_path)).stdout
    assert re.findall(r"blake3:[0-9a-f]{64}", text) == expected


def test_digest_of_dump_is_independent_of_tensor_order(cli, dump, tmp_path):
    names = list(dump.tensors)
    forward = tmp_path / "forward.safetensors"
    backward = tmp_path / "backward.safetensors"
    write_safetensors(forward, {n: dump.tensors[n] for n in names})
    write_safetensors(backward, {n: dump.tensors[n] for n in reversed(names)})
    assert header_order(forward) == list(reversed(header_order(backward)))
    a = json.loads(assert_ok(cli("digest", forward, "--json")).stdout)
    b = json.loads(assert_ok(cli("digest", backward, "--json")).stdout)
    assert a["kind"] == b["kind"] == "dump"
    assert a["file_digest"] == b["file_digest"]
    rows_a = {r["name"]: r["digest"] for r in a["digests"]}
    assert rows_a == {r["name"]: r["digest"] for r in b["digests"]}
    # the per-tensor and whole-file digests, computed independently
    x = dump.tensors["layer.0.key"]
    assert rows_a["layer.0.key"] == _blake3(
        b"fibquant_tensor_v1", b'{"dtype":"F16","shape":[1,2,32,64]}\x00' + x.tobytes())
    pairs = json.dumps([[n, rows_a[n]] for n in sorted(rows_a)], separators=(",", ":"))
    assert a["file_digest"] == _blake3(b"fibquant_file_v1", pairs.encode())


def test_digest_of_compressed_lists_every_array(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    comp = tmp_path / "kv.fq.safetensors"
    rep = json.loads(assert_ok(cli("digest", comp, "--json")).stdout)
    assert rep["kind"] == "compressed" and rep["ok"] is True
    assert sorted(r["name"] for r in rep["digests"]) == sorted(header_order(comp))
    assert {r["status"] for r in rep["digests"]} == {"ok"}
    assert all(re.fullmatch(r"blake3:[0-9a-f]{64}", r["digest"]) for r in rep["digests"])
