"""Random-access decode (decompress --layers/--tokens) equals the full decode on that range."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from fibquant_cli.errors import UsageError
from fibquant_cli.formats.stfile import read_header
from fibquant_cli.ops.compress import compress
from fibquant_cli.ops.decompress import decompress
from fibquant_cli.ops.slice import decompress_slice, parse_range
from fibquant_cli.ops.spec import CompressSpec

from conftest import make_dump


@pytest.mark.parametrize("layout,five_d,keep", [("bhtd", False, (2, 3)), ("bthd", False, (0, 0)),
                                                ("bhtd", True, (1, 0))])
def test_slice_equals_full_decode(tmp_path, layout, five_d, keep):
    d = make_dump(tmp_path, layout=layout, five_d=five_d, batch=2, layers=3, tokens=40)
    comp = tmp_path / "kv.fq.safetensors"
    compress(d.path, output=comp, spec=CompressSpec(keep_first=keep[0], keep_last=keep[1]),
             attention=False, jobs=1)
    decompress(comp, output=tmp_path / "full.safetensors")
    full = load_file(tmp_path / "full.safetensors")
    for layers, tokens in [("1:3", "5:37"), ("0", "0:2"), ("2:3", "38:40"), (None, "10:11")]:
        out = tmp_path / f"s{layers}_{tokens}.safetensors".replace(":", "-")
        decompress_slice(comp, layers=layers, tokens=tokens, output=out)
        got = load_file(out)
        lsel = parse_range(layers, 3, "--layers")
        tsel = parse_range(tokens, 40, "--tokens")
        for name, arr in got.items():
            ref = full[name]
            if ref.ndim == 5:
                expected = ref[:, lsel.start:lsel.stop, :, tsel.start:tsel.stop]
            elif layout == "bthd":
                expected = ref[:, tsel.start:tsel.stop]
            else:
                expected = ref[:, :, tsel.start:tsel.stop]
            np.testing.assert_array_equal(arr, expected, err_msg=name)
        assert any("key" in n for n in got) and any("value" in n for n in got)


def test_slice_never_reads_other_vectors_codes(tmp_path):
    """Garbage in a code stream the slice does not decode does not change the slice.

    (Garbage inside a decode block it does read is refused: tests/test_hostile.py.)
    """
    d = make_dump(tmp_path, tokens=64)
    comp = tmp_path / "kv.fq.safetensors"
    compress(d.path, output=comp, attention=False, jobs=1)
    decompress_slice(comp, layers="0", tokens="20:30", output=tmp_path / "a.safetensors")
    header = read_header(comp)
    info = header.tensors["fq/e0/l1/codes"]
    raw = bytearray(comp.read_bytes())
    for offset in range(0, 400):
        raw[header.data_start + info.begin + offset] ^= 0xFF
    comp.write_bytes(bytes(raw))
    decompress_slice(comp, layers="0", tokens="20:30", output=tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("text,n,expected", [("3:5", 8, range(3, 5)), ("3", 8, range(3, 4)),
                                             (":2", 8, range(0, 2)), ("6:", 8, range(6, 8)),
                                             (None, 4, range(0, 4))])
def test_parse_range(text, n, expected):
    assert parse_range(text, n, "--x") == expected


@pytest.mark.parametrize("text", ["5:3", "0:9", "x", "3:3", "-1:2"])
def test_parse_range_rejects(text):
    with pytest.raises(UsageError):
        parse_range(text, 8, "--layers")
