"""What users see when a request is wrong or an input is bad: the exit code (usage 2, invalid
input 3, integrity 4, resource 5), one line on stderr naming file, tensor and reason, no
traceback, and nothing left behind."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import safetensors.numpy

from fibquant_cli.errors import InvalidInputError

from conftest import (
    assert_error,
    listing,
    make_dump,
)
from conftest import ok as assert_ok

# ----------------------------------------------------------------------------- flag errors


def test_bits_without_preset_is_usage_error(cli, dump):
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path, "--bits", "2.5"), 2,
                 "--bits 2.5 has no preset", "0.5, 1, 2, 3, 4")
    assert listing(dump.path.parent) == before


@pytest.mark.parametrize("args", [["--block-dim", "4"], ["--size", "256"]])
def test_block_dim_and_size_go_together(cli, dump, args):
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path, *args), 2, "--block-dim and --size together")
    assert listing(dump.path.parent) == before


def test_bits_and_block_dim_exclusive(cli, dump):
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path, "--bits", "2", "--block-dim", "4", "--size", "256"),
                 2, "either --bits or --block-dim/--size")
    assert listing(dump.path.parent) == before


def test_block_dim_not_dividing_head_dim(cli, dump):
    # A usage error naming the flag, not the manifest's fault (issue 12, item 7).
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path, "--block-dim", "3", "--size", "64"), 2,
                 str(dump.path), "--block-dim gives block_dim 3, which must divide the "
                 "head_dim 64", "tensor 'layer.0.key'")
    assert listing(dump.path.parent) == before


# ----------------------------------------------------------------------------- bad safetensors input


def _random_bytes(p):
    p.write_bytes(np.random.default_rng(1).bytes(4096))


def _text(p):
    p.write_text("This is not a safetensors file, just some text.\n" * 10)


def _tiny(p):
    p.write_bytes(b"abc")


def _truncated_header(p, dump_bytes):
    (n,) = struct.unpack("<Q", dump_bytes[:8])
    p.write_bytes(dump_bytes[: 8 + n // 2])


def _absurd_header(p):
    p.write_bytes(struct.pack("<Q", 2**40) + b"junk" * 64)


BAD_FILES = {
    "random-bytes": (lambda p, raw: _random_bytes(p), "absurd header length"),
    "text-file": (lambda p, raw: _text(p), "absurd header length"),
    "three-bytes": (lambda p, raw: _tiny(p), "too short"),
    "truncated-100": (lambda p, raw: p.write_bytes(raw[:-100]), "truncated file?"),
    "truncated-header": (_truncated_header, "absurd header length"),
    "absurd-header-length": (lambda p, raw: _absurd_header(p), "absurd header length 1099511627776"),
}


@pytest.mark.parametrize("command", ["compress", "validate", "decompress", "digest"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_safetensors_files(cli, dump, case, command):
    make, reason = BAD_FILES[case]
    raw = dump.path.read_bytes()
    make(dump.path, raw)
    before = listing(dump.path.parent)
    line = assert_error(cli(command, dump.path), 3, str(dump.path), reason)
    assert listing(dump.path.parent) == before, line


@pytest.mark.parametrize("command", ["compress", "validate", "decompress", "digest"])
def test_missing_input_file(cli, tmp_path, command):
    missing = tmp_path / "nope.safetensors"
    assert_error(cli(command, missing), 3, f"{missing}: no such file")
    assert os.listdir(tmp_path) == []


def test_directory_as_input(cli, tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    assert_error(cli("compress", tmp_path / "d.safetensors"), 3, "is a directory")
    assert os.listdir(tmp_path) == ["d.safetensors"]


# ----------------------------------------------------------------------------- bad manifests


def _shape(manifest, i=0):
    return manifest["entries"][i]["shape"]


def _missing_manifest(dump):
    dump.manifest_path.unlink()
    return 3, [str(dump.path), f"no manifest at {dump.manifest_path}", "--manifest"]


def _syntax_error(dump):
    dump.write_manifest(text='{\n  "schema_version": "fibquant_kv_manifest_v1",\n  "entries": [}\n')
    return 3, [str(dump.manifest_path), "invalid JSON at line 3, column 15"]


def _unknown_key(dump):
    m = json.loads(json.dumps(dump.manifest))
    _shape(m)["head_dimm"] = _shape(m).pop("head_dim")
    dump.write_manifest(m)
    return 3, [str(dump.manifest_path), "entries[0].shape: unknown key 'head_dimm'"]


def _missing_key(dump):
    m = json.loads(json.dumps(dump.manifest))
    del _shape(m, 1)["tokens"]
    dump.write_manifest(m)
    return 3, [str(dump.manifest_path), "entries[1].shape: missing key 'tokens'"]


def _value_post_rope(dump):
    m = json.loads(json.dumps(dump.manifest))
    _shape(m, 1)["rope_state"] = "post_rope"
    dump.write_manifest(m)
    return 3, [str(dump.manifest_path), "entries[1].shape: value tensors must use not_applicable rope state"]


def _string_integer(dump):
    m = json.loads(json.dumps(dump.manifest))
    _shape(m)["tokens"] = "32"
    dump.write_manifest(m)
    return 3, [str(dump.manifest_path), "entries[0].shape.tokens: expected an integer"]


def _short_tensor(dump):
    t = dict(dump.tensors)
    t["layer.1.key"] = np.ascontiguousarray(t["layer.1.key"][:, :, :31])
    safetensors.numpy.save_file(t, str(dump.path))
    return 3, [str(dump.path), "tensor 'layer.1.key'", "expected shape [1, 2, 32, 64]",
               "found [1, 2, 31, 64]"]


def _wrong_dtype(dump):
    t = dict(dump.tensors)
    t["layer.0.value"] = t["layer.0.value"].astype(np.float32)
    safetensors.numpy.save_file(t, str(dump.path))
    return 3, [str(dump.path), "tensor 'layer.0.value'", "expected dtype F16", "found F32"]


def _absent_tensor(dump):
    t = dict(dump.tensors)
    del t["layer.1.value"]
    safetensors.numpy.save_file(t, str(dump.path))
    return 3, [str(dump.path), "tensor 'layer.1.value'", "not present in the file"]


BAD_MANIFESTS = {
    "missing-manifest": _missing_manifest,
    "json-syntax": _syntax_error,
    "unknown-key": _unknown_key,
    "missing-key": _missing_key,
    "value-post-rope": _value_post_rope,
    "string-integer": _string_integer,
    "shape-mismatch": _short_tensor,
    "dtype-mismatch": _wrong_dtype,
    "absent-tensor": _absent_tensor,
}


@pytest.mark.parametrize("command", ["compress", "validate"])
@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_or_contract(cli, dump, case, command):
    code, fragments = BAD_MANIFESTS[case](dump)
    before = listing(dump.path.parent)
    assert_error(cli(command, dump.path), code, *fragments)
    assert listing(dump.path.parent) == before


@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_in_per_layer_tensor(cli, dump, value, shown):
    t = dict(dump.tensors)
    t["layer.1.value"] = t["layer.1.value"].copy()
    t["layer.1.value"][0, 1, 17, 42] = value
    safetensors.numpy.save_file(t, str(dump.path))
    before = listing(dump.path.parent)
    for command in ("compress", "validate"):
        assert_error(cli(command, dump.path), 3, str(dump.path), "tensor 'layer.1.value'",
                     f"non-finite value {shown} at position [0, 1, 17, 42]")
    assert listing(dump.path.parent) == before


def test_non_finite_position_in_5d_and_bthd_tensors(cli, tmp_path):
    dump = make_dump(tmp_path, dtype="f32", five_d=True, value_layout="bthd")
    t = dict(dump.tensors)
    t["cache.key"] = t["cache.key"].copy()
    t["cache.key"][0, 1, 0, 5, 9] = np.nan  # layer 1: reported in the stored (5-D) axes
    safetensors.numpy.save_file(t, str(dump.path))
    before = sorted(os.listdir(tmp_path))
    assert_error(cli("compress", dump.path), 3, "tensor 'cache.key'",
                 "non-finite value nan at position [0, 1, 0, 5, 9]")
    t["cache.key"][0, 1, 0, 5, 9] = 0.0
    t["layer.0.value"] = t["layer.0.value"].copy()
    t["layer.0.value"][0, 20, 1, 3] = np.inf  # bthd: [batch, token, head, dim]
    safetensors.numpy.save_file(t, str(dump.path))
    assert_error(cli("compress", dump.path), 3, "tensor 'layer.0.value'",
                 "non-finite value inf at position [0, 20, 1, 3]")
    assert sorted(os.listdir(tmp_path)) == before


# ----------------------------------------------------------------------------- output paths


def test_compress_output_exists(cli, dump, tmp_path):
    out = tmp_path / "kv.fq.safetensors"
    out.write_bytes(b"precious")
    before = listing(tmp_path)
    assert_error(cli("compress", dump.path), 2, str(out), "output exists", "--force")
    assert listing(tmp_path) == before
    assert_ok(cli("compress", dump.path, "--force"))
    assert out.read_bytes() != b"precious"
    assert_ok(cli("validate", out))
    assert sorted(os.listdir(tmp_path)) == sorted(before)  # no temporary file left


def test_decompress_output_or_sidecar_exists(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    comp = tmp_path / "kv.fq.safetensors"
    sidecar = tmp_path / "kv.restored.manifest.json"
    sidecar.write_text("precious")
    before = listing(tmp_path)
    assert_error(cli("decompress", comp), 2, str(sidecar), "output exists")
    assert listing(tmp_path) == before
    sidecar.unlink()
    (tmp_path / "kv.restored.safetensors").write_bytes(b"precious")
    before = listing(tmp_path)
    assert_error(cli("decompress", comp), 2, "kv.restored.safetensors", "output exists")
    assert listing(tmp_path) == before
    assert_ok(cli("decompress", comp, "--force"))
    assert_ok(cli("validate", tmp_path / "kv.restored.safetensors"))


@pytest.mark.parametrize("force", [False, True])
def test_output_is_the_input(cli, dump, tmp_path, force):
    flags = ["--force"] if force else []
    before = listing(tmp_path)
    assert_error(cli("compress", dump.path, "-o", dump.path, *flags), 2, "output is the input file")
    spelled = tmp_path / "." / "sub" / ".." / "kv.safetensors"
    (tmp_path / "sub").mkdir()
    assert_error(cli("compress", dump.path, "-o", spelled, *flags), 2, "output is the input file")
    (tmp_path / "sub").rmdir()
    assert listing(tmp_path) == before
    assert_ok(cli("compress", dump.path))
    comp = tmp_path / "kv.fq.safetensors"
    before = listing(tmp_path)
    assert_error(cli("decompress", comp, "-o", comp, *flags), 2, "output is the input file")
    assert listing(tmp_path) == before


def test_compress_output_is_the_manifest(cli, dump, tmp_path):
    before = listing(tmp_path)
    assert_error(cli("compress", dump.path, "-o", dump.manifest_path), 2,
                 "output is the manifest file")
    assert_error(cli("compress", dump.path, "-o", dump.manifest_path, "--force"), 2,
                 "output is the manifest file")
    assert listing(tmp_path) == before


def test_output_directory_missing(cli, dump, tmp_path):
    before = listing(tmp_path)
    assert_error(cli("compress", dump.path, "-o", tmp_path / "nodir" / "o.fq.safetensors"), 2,
                 "does not exist")
    assert listing(tmp_path) == before and not (tmp_path / "nodir").exists()


# ----------------------------------------------------------------------------- --debug and messages


def test_debug_shows_the_exception(cli, tmp_path):
    missing = tmp_path / "nope.safetensors"
    plain = cli("compress", missing)
    assert_error(plain, 3, "no such file")
    debug = cli("--debug", "compress", missing)
    assert debug.exit_code != 0
    assert isinstance(debug.exception, InvalidInputError)
    assert debug.exc_info is not None and debug.exc_info[2] is not None  # a traceback exists
    # and the flag does not stick to the next invocation
    assert_error(cli("compress", missing), 3, "no such file")


def test_error_message_shows_bracketed_path_verbatim(cli, tmp_path):
    folder = tmp_path / "run[old]"
    folder.mkdir()
    missing = folder / "kv.safetensors"
    assert_error(cli("compress", missing), 3, f"{missing}: no such file")


def test_error_message_with_closing_tag_text(cli, dump):
    m = json.loads(json.dumps(dump.manifest))
    m["entries"][0]["shape"]["[/x]"] = 1
    dump.write_manifest(m)
    assert_error(cli("compress", dump.path), 3, "unknown key '[/x]'")


# ----------------------------------------------------------------------------- sidecar path problems


def _sidecar_is_a_directory(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    assert_ok(cli("decompress", tmp_path / "kv.fq.safetensors"))  # an earlier, good restore
    previous = (tmp_path / "kv.restored.safetensors").read_bytes()
    sidecar = tmp_path / "kv.restored.manifest.json"
    sidecar.unlink()
    sidecar.mkdir()
    res = cli("decompress", tmp_path / "kv.fq.safetensors", "--force")
    return res, previous


def test_decompress_sidecar_is_a_directory_is_usage_error(cli, dump, tmp_path):
    res, _ = _sidecar_is_a_directory(cli, dump, tmp_path)
    assert_error(res, 2, "kv.restored.manifest.json", "directory")


def test_failed_forced_decompress_keeps_previous_output(cli, dump, tmp_path):
    res, previous = _sidecar_is_a_directory(cli, dump, tmp_path)
    assert res.exit_code != 0
    assert (tmp_path / "kv.restored.safetensors").exists()
    assert (tmp_path / "kv.restored.safetensors").read_bytes() == previous


# ----------------------------------------------------------------------------- resource limits (exit 5)


def test_header_above_cap_is_resource_error(cli, tmp_path):
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as fh:  # sparse: costs no disk
        fh.write(struct.pack("<Q", 101 * 2**20))
        fh.truncate(102 * 2**20)
    for command in ("compress", "validate"):
        assert_error(cli(command, big), 5, str(big), "absurd header length 105906176",
                     "above the 104857600-byte cap")
    assert os.listdir(tmp_path) == ["big.safetensors"]


def test_size_overflow_in_manifest_is_resource_error(cli, dump):
    dump.manifest["entries"][0]["shape"]["tokens"] = 2**32
    dump.write_manifest()
    before = listing(dump.path.parent)
    assert_error(cli("compress", dump.path), 5, str(dump.manifest_path),
                 "entries[0].shape: kv shape size overflow")
    assert listing(dump.path.parent) == before


def test_huge_manifest_is_resource_error(cli, dump):
    with open(dump.manifest_path, "r+b") as fh:
        fh.truncate(17 * 2**20)
    assert_error(cli("compress", dump.path), 5, str(dump.manifest_path),
                 "manifest is larger than 16777216 bytes")
    assert sorted(os.listdir(dump.path.parent)) == ["kv.manifest.json", "kv.safetensors"]



@pytest.mark.parametrize("case", ["unknown-key", "json-syntax", "value-post-rope"])
def test_digest_of_bad_manifest(cli, dump, case):
    code, fragments = BAD_MANIFESTS[case](dump)
    assert_error(cli("digest", dump.manifest_path), code, *fragments)


@pytest.mark.parametrize("args, fragment", [
    (["compress", "x.safetensors", "--bogus"], "No such option: --bogus"),
    (["compress"], "Missing argument"),
    (["decompress", "x.fq.safetensors", "--jobs", "many"], "'--jobs'"),
    (["decompress", "x.fq.safetensors", "--jobs", "-1"], "'--jobs'"),
    (["frobnicate"], "No such command"),
])
def test_typer_usage_errors_are_one_line_exit_2(cli, args, fragment):
    line = assert_error(cli(*args), 2, fragment)
    assert "--help" in line  # says where to look


def test_library_errors_name_flags_not_parameters(cli, dump):
    line = assert_error(cli("compress", dump.path, "--key-block-dim", "4"), 2,
                        "--key-block-dim", "--key-size")
    assert "key_block_dim" not in line
