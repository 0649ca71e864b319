"""fibquant_cli.api: arrays held in memory in, compressed files out, random access back.

The API must be the CLI's code path: compressing arrays writes the very bytes compressing
the same tensors from a file writes, and reads equal what ``decompress`` restores.
"""

from __future__ import annotations

import filecmp
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from fibquant_cli import api as fq
from fibquant_cli.errors import IntegrityError, InvalidInputError, UsageError
from fibquant_cli.formats import stfile
from fibquant_cli.formats.kvdump import open_dump

from conftest import SAMPLE_DUMP, bits_equal, load, make_dump, ok


def _kv(layers=2, tokens=24, dtype=np.float16, queries=True, seed=0):
    rng = np.random.default_rng(seed)
    kv = {}
    for i in range(layers):
        kv[f"layer.{i}.key"] = rng.standard_normal((1, 2, tokens, 64)).astype(dtype)
        kv[f"layer.{i}.value"] = rng.standard_normal((1, 2, tokens, 64)).astype(dtype)
        if queries:
            kv[f"layer.{i}.query"] = rng.standard_normal((1, 4, tokens, 64)).astype(dtype)
    kv["input_ids"] = np.arange(tokens, dtype=np.int64)[None]
    return kv


def test_arrays_compress_to_the_bytes_the_cli_writes_for_the_same_dump(cli, tmp_path):
    dump = open_dump(SAMPLE_DUMP)
    tensors = {name: stfile.read_tensor(dump.header, name) for name in dump.header.tensors}
    ok(cli("compress", SAMPLE_DUMP, "-o", tmp_path / "cli.fq.safetensors", "--no-attention"))
    # The manifest built from the names is the sample's own, but the source file is unnamed.
    fq.compress(tensors, tmp_path / "api.fq.safetensors", manifest=dump.manifest,
                attention=False)
    assert fq.decompress(tmp_path / "api.fq.safetensors").keys() == tensors.keys()
    from fibquant_cli.formats.kvdump import dump_of_arrays
    from fibquant_cli.ops.compress import compress

    named = dump_of_arrays(tensors, dump.manifest, SAMPLE_DUMP.name, dump.header.metadata)
    compress(named, output=tmp_path / "named.fq.safetensors", attention=False)
    assert filecmp.cmp(tmp_path / "cli.fq.safetensors", tmp_path / "named.fq.safetensors",
                       shallow=False)


def test_reads_equal_the_cli_decompress_and_slices_equal_the_full_decode(cli, tmp_path):
    kv = _kv()
    path = tmp_path / "kv.fq.safetensors"
    rep = fq.compress(kv, path, bits=3, rope={"theta": 10000.0})
    assert rep.attention is not None and not rep.attention.proxy  # the queries were found
    ok(cli("decompress", path, "-o", tmp_path / "r.safetensors"))
    restored = load(tmp_path / "r.safetensors")
    everything = fq.decompress(path)
    assert list(everything) == list(kv)
    for name, arr in everything.items():
        assert bits_equal(arr, restored[name]), name
    assert bits_equal(everything["input_ids"], kv["input_ids"])
    with fq.open_compressed(path) as reader:
        assert reader.names == tuple(kv)
        assert reader.kv_names == ("layer.0.key", "layer.0.value", "layer.1.key",
                                   "layer.1.value")
        assert reader.manifest.entries[0].rope.theta == 10000.0
        part = reader.read("layer.1.value", tokens=slice(5, 9))
        assert bits_equal(part, np.ascontiguousarray(everything["layer.1.value"][:, :, 5:9]))
        assert bits_equal(reader.read("layer.0.key", tokens="3"),
                          np.ascontiguousarray(everything["layer.0.key"][:, :, 3:4]))
        assert bits_equal(reader.layer("key", 1, tokens=range(0, 24)), everything["layer.1.key"])


def test_a_round_trip_keeping_every_token_is_bit_exact_in_every_dtype(tmp_path):
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32):
        kv = _kv(tokens=16, dtype=dtype, queries=False)
        fq.compress(kv, tmp_path / "kv.fq.safetensors", keep_first=16, force=True,
                    attention=False)
        back = fq.decompress(tmp_path / "kv.fq.safetensors")
        assert all(bits_equal(back[name], kv[name]) for name in kv), dtype


def test_keys_and_values_lists_and_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    keys = [torch.from_numpy(rng.standard_normal((1, 2, 8, 64)).astype(np.float32)).bfloat16()
            for _ in range(2)]
    values = [torch.from_numpy(rng.standard_normal((1, 2, 8, 64)).astype(np.float32))
              for _ in range(2)]
    fq.compress((keys, values), tmp_path / "t.fq.safetensors", keep_first=8, attention=False)
    back = fq.decompress(tmp_path / "t.fq.safetensors")
    assert back["layer.1.key"].dtype == ml_dtypes.bfloat16
    assert np.array_equal(back["layer.1.key"].astype(np.float32), keys[1].float().numpy())
    assert np.array_equal(back["layer.0.value"], values[0].numpy())


def test_a_dump_saved_from_arrays_is_what_the_cli_compresses(cli, tmp_path):
    kv = _kv(queries=False)
    path, mpath = fq.save_dump(kv, tmp_path / "kv.safetensors")
    assert mpath.name == "kv.manifest.json"
    ok(cli("validate", path))
    assert all(bits_equal(load(path)[n], kv[n]) for n in kv)


@pytest.mark.parametrize("kv, fragment", [
    ({"layer.0.key": np.zeros((2, 64), np.float16), "layer.0.value": np.zeros((2, 64), np.float16)},
     "<memory>: tensor 'layer.0.key': expected [batch, heads, tokens, head_dim], found shape (2, 64)"),
    ({"layer.0.key": np.zeros((1, 2, 4, 64)), "layer.0.value": np.zeros((1, 2, 4, 64))},
     "tensor 'layer.0.key': dtype float64"),
    ({"layer.0.key": np.zeros((1, 2, 4, 64), np.float16),
      "layer.1.value": np.zeros((1, 2, 4, 64), np.float16)}, "no layer 0"),
    ({"layer.0.key": np.zeros((1, 2, 4, 64), np.float16),
      "layer.0.value": np.zeros((1, 2, 5, 64), np.float16)}, "tensor 'layer.0.value': shape"),
    ({"cache": np.zeros((1, 2, 4, 64), np.float16)}, "no keys or no values"),
    ({"layer.0.key": [[1.0]], "layer.0.value": np.zeros((1, 2, 4, 64), np.float16)},
     "tensor 'layer.0.key': expected a numpy array or a torch tensor, found list"),
])
def test_bad_arrays_are_refused_naming_the_key(tmp_path, kv, fragment):
    with pytest.raises(InvalidInputError) as err:
        fq.compress(kv, tmp_path / "x.fq.safetensors")
    assert fragment in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_nan_is_refused_with_its_position(tmp_path):
    kv = _kv(queries=False)
    kv["layer.1.value"][0, 1, 7, 3] = np.nan
    with pytest.raises(InvalidInputError, match=r"tensor 'layer.1.value': non-finite value nan "
                                                r"at position \[0, 1, 7, 3\]"):
        fq.compress(kv, tmp_path / "x.fq.safetensors")


def test_bad_options_and_ranges_are_usage_errors(tmp_path):
    kv = _kv(queries=False)
    with pytest.raises(UsageError, match="bits 5.5|has no preset"):
        fq.compress(kv, tmp_path / "x.fq.safetensors", bits=2.5)
    from fibquant_cli.ops.spec import CompressSpec

    with pytest.raises(UsageError, match="either spec or the rate options"):
        fq.compress(kv, tmp_path / "x.fq.safetensors", spec=CompressSpec(), bits=3)
    path = tmp_path / "kv.fq.safetensors"
    fq.compress(kv, path, attention=False)
    with pytest.raises(UsageError):  # exists
        fq.compress(kv, path, attention=False)
    reader = fq.open_compressed(path)
    for kwargs, fragment in [({"tokens": slice(20, 30)}, "outside 0:24"),
                             ({"tokens": slice(0, 8, 2)}, "step 1"),
                             ({"layers": 0}, "5-D")]:
        with pytest.raises(UsageError, match=fragment):
            reader.read("layer.0.key", **kwargs)
    with pytest.raises(UsageError, match="compressed tensors only"):
        reader.read("input_ids", tokens=slice(0, 2))
    with pytest.raises(UsageError, match="no tensor 'nope'"):
        reader.read("nope")


def test_a_five_d_tensor_is_read_by_layers_and_tokens(tmp_path):
    dump = make_dump(tmp_path, five_d=True, layers=3, tokens=20, queries=False)
    out = fq.compress_file(dump.path, tmp_path / "kv.fq.safetensors", attention=False)
    assert out.output.endswith("kv.fq.safetensors")
    reader = fq.open_compressed(tmp_path / "kv.fq.safetensors")
    full = reader.read("cache.key")
    assert full.shape == (1, 3, 2, 20, 64)
    assert bits_equal(reader.read("cache.key", layers="1:3", tokens=(4, 9)),
                      np.ascontiguousarray(full[:, 1:3, :, 4:9]))


def test_a_tampered_array_fails_the_reads_that_touch_it_only(tmp_path):
    kv = _kv(queries=False)
    path = tmp_path / "kv.fq.safetensors"
    fq.compress(kv, path, attention=False)
    header = stfile.read_header(path)
    info = header.tensors["fq/e0/l1/codes"]  # layer 1's key codes
    raw = bytearray(path.read_bytes())
    raw[header.data_start + info.end - 1] ^= 0xFF
    path.write_bytes(bytes(raw))
    reader = fq.open_compressed(path)
    assert reader.read("layer.0.key", tokens=slice(0, 4)).shape == (1, 2, 4, 64)
    assert reader.read("layer.1.value").shape == (1, 2, 24, 64)
    for read in (lambda: reader.read("layer.1.key", tokens=slice(0, 4)),
                 lambda: reader.read("layer.1.key"), lambda: fq.decompress(path)):
        with pytest.raises(IntegrityError, match="fq/e0/l1/codes"):
            read()


def test_importing_the_api_loads_no_numerics():
    code = ("import sys, fibquant_cli.api; print(' '.join(m for m in sys.modules "
            "if m.split('.')[0] in ('numpy', 'torch', 'ml_dtypes', 'blake3')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
