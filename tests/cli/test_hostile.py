"""Hostile inputs (issue 12): each case as the sweep found it, with the exit code, a one-line
message naming the file, tensor or flag, and nothing left behind.

Sections follow the issue's items: 1 random access verifies what it reads, 2 header and
document changes, 4 outputs and input paths, 5 hangs, 6 "internal error", 7 exit class and
blame, 8 extreme values. Item 3 (signals) is tests/cli/test_signals.py; the byte-flip property
test is tests/cli/test_hostile_property.py. docs/hostile-input.md lists every case.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from fibquant_cli.errors import IntegrityError
from fibquant_cli.formats import stfile, untrusted
from fibquant_cli.formats.container import open_container
from fibquant_cli.formats.digest import CONTAINER_SCHEMA, bytes_digest
from fibquant_cli.storage.stwriter import write_file

from conftest import assert_error, invoke, listing, make_dump
from conftest import ok as assert_ok


@pytest.fixture(autouse=True)
def _no_hang():
    """A case that blocks (a FIFO, an unbounded training) fails the test instead of hanging."""
    def stop(signum, frame):
        raise TimeoutError("hostile case ran over 20 s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small compressed file (keys centered, 2 protected tokens) and what it restores to:
    {"dir", "file" (bytes), "full" (restored bytes), "slice" (layer 1, tokens 4:20 bytes)}."""
    work = tmp_path_factory.mktemp("small")
    dump = make_dump(work, layers=2, tokens=24)
    comp = work / "kv.fq.safetensors"
    assert_ok(invoke("compress", dump.path, "-o", comp, "--keep-first", "2", "--no-attention"))
    assert_ok(invoke("decompress", comp, "-o", work / "full.safetensors"))
    assert_ok(invoke("decompress", comp, "-o", work / "slice.safetensors", "--layers", "1",
                     "--tokens", "4:20"))
    return {"dir": work, "dump": dump, "file": comp.read_bytes(),
            "full": (work / "full.safetensors").read_bytes(),
            "slice": (work / "slice.safetensors").read_bytes()}


def copy_of(small, directory: Path, data: bytes | None = None) -> Path:
    out = directory / "c.fq.safetensors"
    out.write_bytes(small["file"] if data is None else data)
    return out


def header_of(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n], object_pairs_hook=dict), data[8 + n:]


def with_header(obj: dict, rest: bytes) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + rest


def forged(small, directory: Path, edit_doc, version: str | None = None) -> Path:
    """A copy whose document ``edit_doc`` changed (or replaced: its return value), with its
    digest recomputed: a forgery, which only the document's validation can catch."""
    header = stfile.read_header(copy_of(small, directory))
    tensors = {n: stfile.RawTensor(i.dtype, i.shape, stfile.read_raw(header, n))
               for n, i in header.tensors.items()}
    doc = json.loads(header.metadata["fibquant"])
    replaced = edit_doc(doc)
    doc = doc if replaced is None else replaced
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    meta = {"fibquant_format": "3" if version is None else version, "fibquant": text,
            "fibquant_digest": bytes_digest(CONTAINER_SCHEMA, text.encode())}
    out = directory / "forged.fq.safetensors"
    write_file(out, tensors, meta)
    header.path.unlink()
    return out


READERS = {
    "decompress": lambda p: ("decompress", p, "-o", p.parent / "r.safetensors"),
    "slice": lambda p: ("decompress", p, "-o", p.parent / "r.safetensors", "--layers", "1",
                        "--tokens", "4:20"),
    "validate": lambda p: ("validate", p),
}


def refused_by_every_reader(cli, path: Path, code: int, *fragments: str) -> None:
    before = listing(path.parent)
    for name, args in READERS.items():
        assert_error(cli(*args(path)), code, str(path), *fragments)
        assert listing(path.parent) == before, name


# ============================================================ 1. random access verifies

def _slice_read_ranges(path: Path, layer: int) -> dict[str, range]:
    """Stored array -> the byte offsets (in the file) of what a slice of ``layer`` decodes."""
    header = stfile.read_header(path)
    out = {}
    for name, info in header.tensors.items():
        if f"/l{layer}/" in name or name == f"fq/raw/layer.{layer}.query":
            out[name] = range(header.data_start + info.begin, header.data_start + info.end)
    return out


def test_slice_refuses_every_flip_in_the_parts_it_decodes(tmp_path):
    """Item 1: every byte of the selected layer's codes, norms, key mean and protected tokens,
    and every 16th byte of its query, flipped one at a time (a different bit each time): the
    slice raises IntegrityError naming the file and the array, and writes nothing. (Before:
    14 of 14 such flips decoded into wrong values with exit 0.) A tiny file (0.5 bits: 4 code
    bytes per vector; 1 protected token) keeps the exhaustive part fast.
    """
    from fibquant_cli.ops.compress import compress
    from fibquant_cli.ops.slice import decompress_slice
    from fibquant_cli.ops.spec import CompressSpec

    (tmp_path / "src").mkdir()
    dump = make_dump(tmp_path / "src", layers=2, kv_heads=1, query_heads=1, tokens=12,
                     extras=False)
    path = tmp_path / "c.fq.safetensors"
    compress(dump.path, output=path, spec=CompressSpec(key=(8, 16), value=(8, 16), keep_first=1),
             attention=False, jobs=1)
    clean = path.read_bytes()
    ranges = _slice_read_ranges(path, 1)
    assert {n.rsplit("/", 1)[1] for n in ranges} == {"codes", "norms", "mean", "kept",
                                                      "layer.1.query"}
    positions = [(n, p) for n, r in ranges.items() for p in (r[::16] if "query" in n else r)]
    before = listing(tmp_path)
    for k, (name, pos) in enumerate(positions):
        data = bytearray(clean)
        data[pos] ^= 1 << (k % 8)
        path.write_bytes(data)
        with pytest.raises(IntegrityError, match="digest mismatch") as err:
            decompress_slice(path, layers="1", tokens="0:12", output=tmp_path / "r.safetensors")
        assert (err.value.path, err.value.tensor) == (str(path), name)
    path.write_bytes(clean)
    assert listing(tmp_path) == before
    assert len(positions) > 600


def test_slice_flip_reports_exit_4_naming_file_and_tensor(cli, small, tmp_path):
    """Item 1 through the CLI: codes, norms, the stored key mean, a pass-through query."""
    for part in ("fq/e0/l1/codes", "fq/e1/l1/norms", "fq/e0/l1/mean", "fq/e0/l1/kept"):
        path = copy_of(small, tmp_path)
        header = stfile.read_header(path)
        info = header.tensors[part]
        data = bytearray(small["file"])
        data[header.data_start + info.begin + info.n_bytes // 2] ^= 0x40
        path.write_bytes(data)
        before = listing(tmp_path)
        assert_error(cli(*READERS["slice"](path)), 4, str(path), f"tensor '{part}'",
                     "digest mismatch")
        assert listing(tmp_path) == before


def test_slice_refuses_a_flipped_query(cli, tmp_path):
    dump = make_dump(tmp_path, layers=2, tokens=24)
    comp = tmp_path / "q.fq.safetensors"
    assert_ok(cli("compress", dump.path, "-o", comp, "--no-attention"))
    header = stfile.read_header(comp)
    info = header.tensors["fq/raw/layer.1.query"]
    data = bytearray(comp.read_bytes())
    data[header.data_start + info.begin + 7] ^= 0x01
    comp.write_bytes(data)
    before = listing(tmp_path)
    assert_error(cli("decompress", comp, "-o", tmp_path / "s.safetensors", "--layers", "1",
                     "--tokens", "0:8"), 4, str(comp), "tensor 'fq/raw/layer.1.query'",
                 "digest mismatch")
    assert listing(tmp_path) == before


class CountingReads:
    """Counts the bytes read from one file: every read of an input goes through
    ``untrusted.open_regular``, whose file objects this wraps."""

    def __init__(self, monkeypatch, path: Path):
        self.n_bytes, self.path = 0, str(path)
        real = untrusted.open_regular
        counter = self

        class Counted:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def __getattr__(self, name):
                return getattr(self.fh, name)

            def read(self, *args):
                data = self.fh.read(*args)
                counter.n_bytes += len(data)
                return data

            def readinto(self, buffer):
                got = self.fh.readinto(buffer)
                counter.n_bytes += got or 0
                return got

        def opened(path, *args):
            fh = real(path, *args)
            return Counted(fh) if str(path) == counter.path else fh

        monkeypatch.setattr(untrusted, "open_regular", opened)


def test_one_layer_slice_reads_only_its_blocks(tmp_path, monkeypatch, capsys):
    """Item 1: a one-layer slice of a 4-layer file reads the header (twice: parsed, then
    compared with its canonical form), the codebook and rotation, and per entry the mean, the
    protected token and the one digested block of codes and of norms around the tokens --
    nothing else."""
    from fibquant_cli.ops.compress import compress
    from fibquant_cli.ops.slice import decompress_slice

    dump = make_dump(tmp_path, layers=4, kv_heads=1, query_heads=1, tokens=8192,
                     queries=False, extras=False)
    comp = tmp_path / "kv.fq.safetensors"
    compress(dump.path, output=comp, attention=False, jobs=1)
    header = stfile.read_header(comp)
    reads = CountingReads(monkeypatch, comp)
    decompress_slice(comp, layers="1", tokens="100:200", output=tmp_path / "s.safetensors")
    n_read = reads.n_bytes
    size = comp.stat().st_size
    doc = open_container(comp).doc
    needed = 2 * header.data_start + sum(
        header.tensors[n].n_bytes for n in header.tensors if n.startswith("fq/p"))
    for role in (0, 1):
        for part in ("codes", "norms"):
            name = f"fq/e{role}/l1/{part}"
            assert len(doc.blocks[name].digests) == 2  # 8192 vectors: two decode blocks
            needed += doc.blocks[name].block_bytes
        for part in ("mean", "kept"):  # read whole (small) when present
            if f"fq/e{role}/l1/{part}" in header.tensors:
                needed += header.tensors[f"fq/e{role}/l1/{part}"].n_bytes
    with capsys.disabled():
        print(f"\n  one-layer slice read {n_read} of {size} bytes "
              f"({100 * n_read / size:.1f}%; expected {needed})")
    assert n_read == needed
    assert n_read < size / 5


def test_heads_sharing_a_block_read_it_once(small, tmp_path, monkeypatch):
    """Two heads of a layer in one decode block: the block is read (and checked) once."""
    from fibquant_cli.ops.slice import decompress_slice

    comp = copy_of(small, tmp_path)
    header = stfile.read_header(comp)
    reads = CountingReads(monkeypatch, comp)
    decompress_slice(comp, layers="1", tokens="4:20", output=tmp_path / "s.safetensors")
    layer = [n for n in header.tensors if "/l1/" in n or n == "fq/raw/layer.1.query"]
    assert reads.n_bytes == 2 * header.data_start + sum(
        header.tensors[n].n_bytes for n in header.tensors if n.startswith("fq/p") or n in layer)


def test_format_1_file_still_slices_by_verifying_whole_arrays(cli, tmp_path):
    """Older files have no block digests: a slice verifies the whole arrays it touches."""
    import shutil

    src = tmp_path / "v1.fq.safetensors"
    shutil.copy(Path(__file__).parents[1] / "fixtures" / "v1.fq.safetensors", src)
    assert_ok(cli("decompress", src, "-o", tmp_path / "s.safetensors", "--layers", "0"))
    header = stfile.read_header(src)
    name = next(n for n in header.tensors if n.endswith("/l0/codes"))
    info = header.tensors[name]
    data = bytearray(src.read_bytes())
    data[header.data_start + info.end - 1] ^= 0x80
    src.write_bytes(data)
    (tmp_path / "s.safetensors").unlink()
    (tmp_path / "s.manifest.json").unlink()
    before = listing(tmp_path)
    assert_error(cli("decompress", src, "-o", tmp_path / "s.safetensors", "--layers", "0",
                     "--tokens", "5:6"), 4, str(src), f"tensor '{name}'", "digest mismatch")
    assert listing(tmp_path) == before


# ============================================================ 2. header and document changes

def _edit_header(small, tmp_path, edit) -> Path:
    obj, rest = header_of(small["file"])
    obj = edit(obj)
    path = tmp_path / "c.fq.safetensors"
    path.write_bytes(with_header(obj, rest))
    return path


def test_passthrough_dtype_changed_in_header(cli, small, tmp_path):
    def edit(obj):
        obj["fq/raw/input_ids"]["dtype"] = "U64"  # same size: only the dtype lies
        return obj
    refused_by_every_reader(cli, _edit_header(small, tmp_path, edit), 4,
                            "tensor 'fq/raw/input_ids'", "stored as U64")


def test_extra_metadata_key(cli, small, tmp_path):
    def edit(obj):
        obj["__metadata__"]["extra"] = "1"
        return obj
    refused_by_every_reader(cli, _edit_header(small, tmp_path, edit), 4,
                            "__metadata__ must hold exactly", "extra")


def test_reordered_header_entries(cli, small, tmp_path):
    def edit(obj):
        names = [k for k in obj if k != "__metadata__"]
        order = ["__metadata__", names[1], names[0], *names[2:]]
        return {k: obj[k] for k in order}
    refused_by_every_reader(cli, _edit_header(small, tmp_path, edit), 4,
                            "stored arrays differ from the document's layout (in another order)")


@pytest.mark.parametrize("field, edit, found", [
    ("entries[0].center", lambda d: d["entries"][0].update(center="yes"), "'yes'"),
    ("source.tensor_order", lambda d: d["source"].update(tensor_order=[]), "found 0 names"),
])
def test_forged_document_with_recomputed_digest(cli, small, tmp_path, field, edit, found):
    refused_by_every_reader(cli, forged(small, tmp_path, edit), 4, f"document {field}", found)


def test_forged_block_digests_are_refused(cli, small, tmp_path):
    def edit(doc):
        name = next(iter(doc["blocks"]))
        doc["blocks"][name]["digests"].append(doc["blocks"][name]["digests"][0])
    refused_by_every_reader(cli, forged(small, tmp_path, edit), 4, "block digests")


# ============================================================ 4. outputs and input paths

def test_output_dangling_symlink(cli, small, tmp_path):
    comp = copy_of(small, tmp_path)
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "nowhere")
    before = listing(tmp_path)
    assert_error(cli("decompress", comp, "-o", tmp_path / "link.safetensors", "--force"), 2,
                 str(tmp_path / "link.safetensors"), "symbolic link")
    assert listing(tmp_path) == before and not (tmp_path / "nowhere").exists()


def test_output_character_device_even_with_force(cli, small, tmp_path):
    comp = copy_of(small, tmp_path)
    before = listing(tmp_path)
    assert_error(cli("decompress", comp, "-o", "/dev/null", "--force"), 2, "/dev/null",
                 "not a regular file")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_output_in_a_missing_directory_written_with_a_slash(cli, small, tmp_path, command):
    dump = small["dump"]
    source = dump.path if command == "compress" else copy_of(small, tmp_path)
    target = str(tmp_path / "newdir") + "/"
    before = listing(tmp_path)
    assert_error(cli(command, source, "-o", target), 2, target, "names a directory")
    assert listing(tmp_path) == before and not (tmp_path / "newdir").exists()


@pytest.mark.parametrize("command", ["validate", "compress", "decompress", "digest"])
def test_input_path_with_a_trailing_slash(cli, small, command):
    path = str(small["dump"].path) + "/"
    assert_error(cli(command, path), 3, path, "names a directory; expected a file")


# ============================================================ 5. hangs

@pytest.mark.parametrize("explicit", [True, False], ids=["--manifest", "sidecar"])
def test_fifo_manifest_is_refused_without_blocking(cli, tmp_path, explicit):
    dump = make_dump(tmp_path)
    fifo = tmp_path / ("pipe.json" if explicit else "kv.manifest.json")
    dump.manifest_path.unlink()
    os.mkfifo(fifo)
    args = ("-m", fifo) if explicit else ()
    before = listing(tmp_path)
    for command in ("validate", "compress"):
        start = time.monotonic()
        assert_error(cli(command, dump.path, *args), 3, str(fifo), "not a regular file")
        assert time.monotonic() - start < 5
    assert listing(tmp_path) == before


def test_fifo_input_is_refused_without_blocking(cli, tmp_path):
    fifo = tmp_path / "kv.safetensors"
    os.mkfifo(fifo)
    assert_error(cli("validate", fifo), 3, str(fifo), "not a regular file")


def test_untrainable_size_is_refused_at_once(cli, tmp_path):
    dump = make_dump(tmp_path)
    before = listing(tmp_path)
    for args in (("compress", dump.path, "--block-dim", "2", "--size", "1048576"),
                 ("codebook", "--size", "1048576")):
        start = time.monotonic()
        assert_error(cli(*args), 5, "--size 1048576", "use a size of at most")
        assert time.monotonic() - start < 5
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", ["codebook", "compress"])
def test_a_long_training_is_announced_with_an_estimate(cli, tmp_path, monkeypatch, command):
    """Item 5's other half: a training the bound allows is announced on stderr, with an
    estimated duration, before it starts (the threshold is lowered so a tiny one shows it)."""
    from fibquant_cli.storage import codebook_cache

    monkeypatch.setattr(codebook_cache, "NOTE_TRAINING_SECONDS", 0)
    monkeypatch.setenv("FIBQUANT_CACHE_DIR", str(tmp_path / "cache"))
    if command == "codebook":
        args = ("codebook", "--head-dim", "32", "--block-dim", "2", "--size", "8",
                "--eval-vectors", "1000")
    else:
        dump = make_dump(tmp_path, queries=False)
        args = ("compress", dump.path, "--block-dim", "2", "--size", "8", "--no-attention")
    result = assert_ok(cli(*args))
    assert "fibquant: training the codebook" in result.stderr
    assert "N=8 (not shipped, not cached): about 0 s" in result.stderr


def test_eval_vectors_is_bounded(cli):
    assert_error(cli("codebook", "--eval-vectors", "10000000000"), 2, "--eval-vectors",
                 "10000000000")


# ============================================================ 6. no "internal error"

BIG = "9" * 5000


def _dump_with_header_text(tmp_path, replace) -> Path:
    dump = make_dump(tmp_path, metadata={"note": "x"})
    raw = dump.path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = replace(raw[8:8 + n].decode().rstrip())
    data = text.encode() + b" " * (-len(text.encode()) % 8)
    dump.path.write_bytes(struct.pack("<Q", len(data)) + data + raw[8 + n:])
    return dump.path


@pytest.mark.parametrize("where", ["shape", "data_offsets", "__metadata__"])
def test_huge_integer_in_a_safetensors_header(cli, tmp_path, where):
    def replace(text):
        obj = json.loads(text)
        name = next(k for k in obj if k != "__metadata__")
        if where == "__metadata__":
            return text.replace('"x"', BIG, 1)
        key = '"shape":' if where == "shape" else '"data_offsets":'
        entry = json.dumps(obj[name], separators=(",", ":"))
        return text.replace(entry, entry.replace(key + "[", key + "[" + BIG + ","), 1)
    path = _dump_with_header_text(tmp_path, replace)
    before = listing(tmp_path)
    for command in ("validate", "compress", "digest"):
        assert_error(cli(command, path), 3, str(path), "integer of 5000 digits")
    assert listing(tmp_path) == before


def test_huge_integer_in_a_manifest(cli, tmp_path):
    dump = make_dump(tmp_path)
    dump.write_manifest(text=dump.manifest_path.read_text().replace('"batch": 1', f'"batch": {BIG}', 1))
    for args in (("validate", dump.path), ("compress", dump.path), ("digest", dump.manifest_path)):
        assert_error(cli(*args), 3, str(dump.manifest_path), "integer of 5000 digits")


@pytest.mark.parametrize("case, edit, fragments", [
    ("list for an object", lambda d: d.update(source=[]), ("document source",
                                                           "expected an object")),
    ("list for the document", lambda d: [], ("differs from the document's null",)),
    ("missing digest", lambda d: d["profiles"][0].pop("codebook_digest") and None,
     ("document profiles[0]", "missing codebook_digest")),
    ("array digest missing", lambda d: d["arrays"].pop(next(iter(d["arrays"]))) and None,
     ("document arrays differ",)),
    ("block digest missing", lambda d: d["blocks"].pop(next(iter(d["blocks"]))) and None,
     ("block digests differ",)),
    ("block size changed", lambda d: next(iter(d["blocks"].values())).update(block_bytes=8),
     ("block digests of",)),
])
def test_forged_document_shapes(cli, small, tmp_path, case, edit, fragments):
    path = forged(small, tmp_path, edit)
    refused_by_every_reader(cli, path, 4, *(fragments or ()))


def test_forged_document_with_a_5000_digit_integer(cli, small, tmp_path):
    def edit(doc):
        doc["tool"] = "@@BIG@@"
    path = forged(small, tmp_path, edit)
    # Put the integer into the document text itself, and recompute its digest.
    header = stfile.read_header(path)
    text = header.metadata["fibquant"].replace('"@@BIG@@"', BIG)
    meta = dict(header.metadata, fibquant=text,
                fibquant_digest=bytes_digest(CONTAINER_SCHEMA, text.encode()))
    tensors = {n: stfile.RawTensor(i.dtype, i.shape, stfile.read_raw(header, n))
               for n, i in header.tensors.items()}
    path.unlink()
    write_file(path, tensors, meta)
    refused_by_every_reader(cli, path, 4, "integer of 5000 digits")


@pytest.mark.parametrize("version", ["abc", "", "3.0", "٣", BIG])
def test_non_numeric_format_version(cli, small, tmp_path, version):
    path = forged(small, tmp_path, lambda d: None, version=version)
    refused_by_every_reader(cli, path, 4, "format version")


@pytest.mark.parametrize("length", [220, 240, 255])
def test_legal_long_output_names(cli, small, tmp_path, length):
    comp = copy_of(small, tmp_path)
    name = "r" * (length - len(".safetensors")) + ".safetensors"
    out = tmp_path / name
    manifest_name = name.removesuffix(".safetensors") + ".manifest.json"
    if len(manifest_name) > 255:  # the manifest beside it would not be a legal name
        assert_error(cli("decompress", comp, "-o", out), 2, manifest_name, "File name too long")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.fq.safetensors"]
        return
    assert_ok(cli("decompress", comp, "-o", out))
    assert out.read_bytes() == small["full"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fibquant-")]


def test_legal_255_character_compress_output(cli, small, tmp_path):
    """Before: the temporary's name (output name + suffix) passed 255 bytes: exit 1."""
    out = tmp_path / ("k" * (255 - len(".fq.safetensors")) + ".fq.safetensors")
    assert_ok(cli("compress", small["dump"].path, "-o", out, "--no-attention"))
    assert out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# ============================================================ 7. exit class and blame

@pytest.mark.parametrize("args, flag", [
    (("--block-dim", "0", "--size", "64"), "--block-dim"),
    (("--block-dim", "3", "--size", "64"), "--block-dim"),
    (("--block-dim", "2", "--size", "1"), "--size"),
    (("--block-dim", "2", "--size", "0"), "--size"),
    (("--block-dim", "2", "--size", "-5"), "--size"),
    (("--block-dim", "2", "--size", str(2**40)), "--size"),
    (("--key-block-dim", "5", "--key-size", "16"), "--key-block-dim"),
    (("--value-block-dim", "2", "--value-size", "1"), "--value-size"),
    (("--seed", str(2**64)), "--seed"),
    (("--seed", "-1"), "--seed"),
])
def test_bad_flag_is_a_usage_error_naming_it(cli, tmp_path, args, flag):
    dump = make_dump(tmp_path)
    before = listing(tmp_path)
    line = assert_error(cli("compress", dump.path, *args), 2, flag)
    assert "manifest" not in line
    assert listing(tmp_path) == before


@pytest.mark.parametrize("args, flag", [
    (("--head-dim", "0"), "--head-dim"), (("--head-dim", "-3"), "--head-dim"),
    (("--block-dim", "0"), "--block-dim"), (("--size", "1"), "--size"),
    (("--seed", str(2**63)), "--seed"),
])
def test_codebook_bad_flag_is_a_usage_error_naming_it(cli, args, flag):
    assert_error(cli("codebook", *args, "--eval-vectors", "1000"), 2, flag)


def test_errors_name_the_output_not_its_temporary(cli, small, tmp_path, monkeypatch):
    import errno

    from fibquant_cli.storage import publish

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    comp = copy_of(small, tmp_path)
    monkeypatch.setattr(publish.os, "replace", full)
    before = listing(tmp_path)
    line = assert_error(cli("decompress", comp, "-o", tmp_path / "r.safetensors"), 5,
                        str(tmp_path / "r.safetensors"), "No space left")
    assert ".fibquant-" not in line and ".tmp" not in line
    assert listing(tmp_path) == before


def test_write_errors_name_the_output_not_its_temporary(cli, small, tmp_path, monkeypatch):
    """A failing write inside the temporary file is reported against the output."""
    import errno

    from fibquant_cli.storage import stwriter

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd):
            self.fd = fd

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            os.close(self.fd)

    monkeypatch.setattr(stwriter.os, "fdopen",
                        lambda fd, mode="r", *a, **k: Full(fd) if mode == "wb"
                        else real_fdopen(fd, mode, *a, **k))
    comp = copy_of(small, tmp_path)
    before = listing(tmp_path)
    for extra in ((), ("--layers", "1")):
        line = assert_error(cli("decompress", comp, "-o", tmp_path / "r.safetensors", *extra),
                            5, str(tmp_path / "r.safetensors"), "No space left")
        assert ".fibquant-" not in line
    assert listing(tmp_path) == before


# ============================================================ 8. extreme values

def _rel_mse(a, b) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a - b) ** 2).sum() / (a * a).sum())


@pytest.mark.parametrize("scale", [1e-9, 1e-30, 1e-7])
def test_tiny_f32_vectors_keep_their_precision(cli, tmp_path, scale):
    """Item 8: norms below fp16's normal range are stored as f32 (before: rel. MSE 0.47)."""
    dump = make_dump(tmp_path, dtype="f32", scale=scale, queries=False)
    comp, out = tmp_path / "kv.fq.safetensors", tmp_path / "r.safetensors"
    assert_ok(cli("compress", dump.path, "-o", comp, "--no-attention"))
    assert_ok(cli("decompress", comp, "-o", out))
    restored = safetensors.numpy.load_file(str(out))
    for name in dump.kv_names:
        assert _rel_mse(dump.tensors[name], restored[name]) < 0.05, name
    header = stfile.read_header(comp)
    assert {header.tensors[n].dtype for n in header.tensors if n.endswith("/norms")} == {"F32"}


def test_ordinary_vectors_keep_f16_norms(cli, tmp_path):
    dump = make_dump(tmp_path, dtype="f32", queries=False)
    comp = tmp_path / "kv.fq.safetensors"
    assert_ok(cli("compress", dump.path, "-o", comp, "--no-attention"))
    header = stfile.read_header(comp)
    assert {header.tensors[n].dtype for n in header.tensors if n.endswith("/norms")} == {"F16"}


@pytest.mark.parametrize("center", [True, False])
def test_norm_beyond_float32_is_refused_naming_row_tensor_and_file(cli, tmp_path, center):
    """Item 8: values near 3e38 (before: an error naming nothing, and validate passed)."""
    dump = make_dump(tmp_path, dtype="f32", queries=False)
    tensors = dict(dump.tensors)
    x = tensors["layer.1.key"].copy()
    x[0, 1, 5, :] = 3e38
    tensors["layer.1.key"] = x
    safetensors.numpy.save_file(tensors, str(dump.path))
    before = listing(tmp_path)
    fragments = (str(dump.path), "tensor 'layer.1.key'", "batch 0, head 1, token 5",
                 "beyond float32's range")
    flags = () if center else ("--no-center-keys",)
    assert_error(cli("compress", dump.path, *flags), 3, *fragments)
    assert_error(cli("validate", dump.path), 3, *fragments)
    assert listing(tmp_path) == before
