"""The compressed file: every altered byte of it is caught, versions are refused or read as
documented."""

from __future__ import annotations

import json

import pytest

from fibquant_cli.formats import stfile
from fibquant_cli.storage.stwriter import write_file

from conftest import (
    assert_error,
    listing,
)
from conftest import ok as assert_ok

# ----------------------------------------------------------------------------- corrupted compressed files


def _tensor_offset(path, name):
    h = stfile.read_header(path)
    info = h.tensors[name]
    return h.data_start + info.begin + info.n_bytes // 2 + 1


def _header_offset(path, needle: bytes, delta: int):
    start = stfile.read_header(path).data_start
    raw = path.read_bytes()[:start]
    assert raw.count(needle) >= 1, needle
    return raw.index(needle) + delta


def _after(path, *needles: bytes) -> int:
    """Offset of the first byte after ``needles`` found one after the other in the header."""
    start = stfile.read_header(path).data_start
    raw = path.read_bytes()[:start]
    pos = 0
    for needle in needles:
        pos = raw.index(needle, pos) + len(needle)
    return pos


REGIONS = {
    "codes": lambda p: _tensor_offset(p, "fq/e0/l1/codes"),
    "norms": lambda p: _tensor_offset(p, "fq/e1/l0/norms"),
    "codebook": lambda p: _tensor_offset(p, "fq/p0/codebook"),
    "rotation": lambda p: _tensor_offset(p, "fq/p0/rotation"),
    "passthrough": lambda p: _tensor_offset(p, "fq/raw/layer.1.query"),
    "metadata-json": lambda p: _header_offset(p, b"format_version", 3),
    "metadata-digest": lambda p: _header_offset(p, b'"fibquant_digest":"blake3:', 30),
    "header-padding": lambda p: stfile.read_header(p).data_start - 1,
    "header-length-prefix": lambda p: 0,
    "header-open-brace": lambda p: 8,
    "header-dtype": lambda p: _header_offset(p, b'"dtype":"U8"', 9),
    "header-shape": lambda p: _after(p, b'"fq/e1/l0/norms":{"dtype":"F16","shape":[1,'),
    "header-offsets": lambda p: _after(p, b'"fq/e0/l1/codes":', b'"data_offsets":['),
    "tensor-name": lambda p: _header_offset(p, b'"fq/e0/l1/codes":', 12),
    "format-version": lambda p: _header_offset(p, b'"fibquant_format":"3"', 19),
}
def _flip_cases():
    for region in REGIONS:
        for mask in (0x01, 0x20):
            yield pytest.param(region, mask, id=f"{region}-x{mask:02x}")


@pytest.mark.parametrize("region, mask", list(_flip_cases()))
def test_one_flipped_byte_is_detected(cli, compressed, region, mask):
    offset = REGIONS[region](compressed)
    raw = bytearray(compressed.read_bytes())
    if region == "header-padding":
        assert raw[offset] == 0x20
    raw[offset] ^= mask
    compressed.write_bytes(bytes(raw))
    directory = compressed.parent
    before = listing(directory)
    restored = directory / "r.safetensors"
    dec = cli("decompress", compressed, "-o", restored)
    val = cli("validate", compressed)
    for res in (dec, val):
        assert res.exit_code in (3, 4), (region, res.exit_code, res.output)
        assert_error(res, res.exit_code, str(compressed))
    assert listing(directory) == before  # no restored dump, sidecar or temporary file
    if region in ("codes", "norms", "codebook", "rotation", "passthrough"):
        assert dec.exit_code == 4 and "digest mismatch" in dec.stderr
        assert "tensor 'fq/" in dec.stderr


def _rewritten(compressed, name, edit_doc, version=None):
    """A copy of ``compressed`` whose document ``edit_doc`` changed, digest recomputed."""
    from fibquant_cli.formats.container import metadata_for

    header = stfile.read_header(compressed)
    tensors = {n: stfile.RawTensor(i.dtype, i.shape, stfile.read_raw(header, n))
               for n, i in header.tensors.items()}
    doc = json.loads(header.metadata["fibquant"])
    edit_doc(doc)
    metadata = metadata_for(doc)
    if version is not None:
        metadata["fibquant_format"] = version
    out = compressed.parent / name
    write_file(out, tensors, metadata)
    return out


def test_newer_format_version_is_refused(cli, compressed):
    newer = _rewritten(compressed, "newer.fq.safetensors",
                       lambda doc: doc.update(format_version=99))
    before = listing(compressed.parent)
    for command in ("decompress", "validate"):
        assert_error(cli(command, newer), 3, str(newer), "written by a newer fibquant",
                     "format version 99")
    assert listing(compressed.parent) == before


def test_a_version_that_disagrees_with_the_document_is_corruption_not_newer(cli, compressed):
    odd = _rewritten(compressed, "odd.fq.safetensors", lambda doc: None, version="2")
    for command in ("decompress", "validate"):
        assert_error(cli(command, odd), 4, str(odd), "format version 2 differs from the "
                     "document's 3")


def test_decompress_plain_dump_is_refused(cli, dump):
    before = listing(dump.path.parent)
    assert_error(cli("decompress", dump.path, "-o", dump.path.parent / "r.safetensors"), 3,
                 str(dump.path), "not a fibquant compressed file")
    assert listing(dump.path.parent) == before


def test_compress_compressed_file_is_refused(cli, dump, tmp_path):
    assert_ok(cli("compress", dump.path))
    comp = tmp_path / "kv.fq.safetensors"
    before = listing(tmp_path)
    assert_error(cli("compress", comp, "-o", tmp_path / "again.fq.safetensors"), 3,
                 str(comp), "compressed fibquant file, not a KV dump")
    assert listing(tmp_path) == before


def test_digest_of_corrupted_compressed_file(cli, compressed):
    raw = bytearray(compressed.read_bytes())
    raw[REGIONS["codes"](compressed)] ^= 0x01
    compressed.write_bytes(bytes(raw))
    res = cli("digest", compressed, "--json")
    assert_error(res, 4, "tensor 'fq/e0/l1/codes'", "digest mismatch")
    rep = json.loads(res.stdout)
    assert rep["ok"] is False
    bad = [r["name"] for r in rep["digests"] if r["status"] != "ok"]
    assert bad == ["fq/e0/l1/codes"]
