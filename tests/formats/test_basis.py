"""The basis file: what ``write_basis`` writes, ``load_basis`` reads back, and what it refuses
(one-line errors naming the file; a changed byte is an integrity error)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fibquant_cli.errors import IntegrityError, InvalidInputError
from fibquant_cli.formats.basis import (
    METADATA_KEY,
    BasisRope,
    BasisSource,
    basis_digest,
    load_basis,
)
from fibquant_cli.formats.digest import tensor_digest
from fibquant_cli.storage.basis import write_basis

from conftest import load, read_st_header, write_safetensors

DIGEST_A = "blake3:" + "a" * 64
DIGEST_B = "blake3:" + "b" * 64
SOURCES = (BasisSource("b.safetensors", DIGEST_B), BasisSource("a.safetensors", DIGEST_A))


def matrices(layers=2, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        for role in ("key", "value"):
            q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
            out[(layer, role)] = (rng.standard_normal(dim), q, np.geomspace(5, 0.1, dim))
    return out


def write(path, sources=SOURCES, sensitivity=True, **kw):
    args = dict(layers=2, kv_heads=2, head_dim=3, rope=BasisRope(1e4, "half"), keep_first=1,
                tokens=100, sources=list(sources), matrices=matrices(),
                sensitivity=np.array([[0.1, 1.0], [0.2, 2.0]]) if sensitivity else None)
    args.update(kw)
    return write_basis(path, **args)


def test_round_trip(tmp_path):
    path = tmp_path / "m.basis.safetensors"
    basis = write(path)
    assert (basis.layers, basis.dim, basis.tokens, basis.keep_first) == (2, 6, 100, 1)
    assert basis.rope == BasisRope(1e4, "half")
    assert [s.file for s in basis.sources] == ["a.safetensors", "b.safetensors"]  # by digest
    mean, columns, variance = basis.matrix(1, "value")
    want = matrices()[(1, "value")]
    for got, expected in zip((mean, columns, variance), want):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected.astype(np.float32))
    assert basis.sensitivity(1, "value") == pytest.approx(2.0)
    assert load_basis(path).digest == basis.digest
    no_sens = write(tmp_path / "n.basis.safetensors", sensitivity=False)
    assert no_sens.sensitivity(0, "key") is None and no_sens.digest != basis.digest
    again = write(tmp_path / "again.basis.safetensors", sources=list(reversed(basis.sources)))
    assert again.path.read_bytes() == path.read_bytes()


def test_flipped_byte_is_an_integrity_error(tmp_path):
    path = tmp_path / "m.basis.safetensors"
    write(path)
    raw = bytearray(path.read_bytes())
    raw[-30] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError) as err:
        load_basis(path)
    assert str(err.value).startswith(str(path)) and "digest" in str(err.value)


def test_file_changed_after_loading(tmp_path):
    path = tmp_path / "m.basis.safetensors"
    basis = write(path)
    raw = bytearray(path.read_bytes())
    raw[-30] ^= 0x01
    path.write_bytes(bytes(raw))
    basis.matrix(0, "key")  # not the changed tensor
    with pytest.raises(IntegrityError, match="changed since"):
        basis.matrix(1, "value")


def test_kept_basis_serves_what_was_verified(tmp_path):
    path = tmp_path / "m.basis.safetensors"
    write(path)
    kept = load_basis(path, keep=True)
    raw = bytearray(path.read_bytes())
    raw[-30] ^= 0x01
    path.write_bytes(bytes(raw))  # changed after loading: a kept basis never reads it again
    for (layer, role), want in matrices().items():
        for got, expected in zip(kept.matrix(layer, role), want):
            np.testing.assert_array_equal(got, expected.astype(np.float32))
    kept.matrix(0, "key")[1][:] = 0  # callers get copies
    assert kept.matrix(0, "key")[1].any()


def test_values_are_checked_once_per_content(tmp_path, monkeypatch):
    import fibquant_cli.formats.basis as fmt

    src = tmp_path / "m.basis.safetensors"
    write(src)
    bad = rewrite(src, tmp_path / "bad.basis.safetensors", redigest=True,
                  edit_tensors=lambda t: t["layer.0.key.basis"].__imul__(1.01))
    checked = []
    real = fmt.value_problem
    monkeypatch.setattr(fmt, "value_problem", lambda n, a: checked.append(n) or real(n, a))
    monkeypatch.setattr(fmt, "_SOUND", set())
    load_basis(src)
    first = len(checked)
    load_basis(src, keep=True)
    assert first == 13 and len(checked) == first  # the same digests: not checked again
    for _ in range(2):  # a refused tensor is never remembered as sound
        with pytest.raises(InvalidInputError, match="not orthonormal"):
            load_basis(bad)
    assert checked[first:].count("layer.0.key.basis") == 2


def rewrite(src, dst, *, edit_meta=None, edit_tensors=None, redigest=False):
    """Copy a basis file with its metadata and/or tensors changed (optionally re-digested)."""
    header, _ = read_st_header(src)
    meta = json.loads(header["__metadata__"][METADATA_KEY])
    tensors = load(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if redigest:
        digests = {n: tensor_digest("F32", a.shape, a) for n, a in tensors.items()}
        meta["digest"] = basis_digest(meta, digests)
    write_safetensors(dst, tensors, {METADATA_KEY: json.dumps(meta)})
    return dst


def edit(key, value):
    return lambda meta: meta.__setitem__(key, value)


@pytest.mark.parametrize("change, error, fragment", [
    (dict(edit_meta=edit("tokens", 101)), IntegrityError, "does not match its digest"),
    (dict(edit_meta=edit("rope", None)), IntegrityError, "does not match its digest"),
    (dict(edit_meta=edit("schema", "x")), InvalidInputError, "expected fibquant_basis_v1"),
    (dict(edit_meta=lambda m: m.pop("tokens")), InvalidInputError, "missing ['tokens']"),
    (dict(edit_meta=edit("layers", 3), redigest=True), InvalidInputError,
     "tensor 'layer.2.key.mean': missing tensor"),
    (dict(edit_tensors=lambda t: t.pop("layer.1.key.basis")), InvalidInputError,
     "tensor 'layer.1.key.basis': missing tensor"),
    (dict(edit_tensors=lambda t: t.__setitem__("extra", np.zeros(1, np.float32))),
     InvalidInputError, "tensor 'extra': unexpected tensor"),
    (dict(edit_tensors=lambda t: t.__setitem__("layer.0.key.mean", np.zeros(6))),
     InvalidInputError, "expected F32 [6], found F64 [6]"),
    (dict(edit_tensors=lambda t: t["layer.0.key.basis"].__imul__(1.01), redigest=True),
     InvalidInputError, "tensor 'layer.0.key.basis': columns are not orthonormal"),
    (dict(edit_tensors=lambda t: t["layer.0.value.variance"].__setitem__(5, -1), redigest=True),
     InvalidInputError, "negative variance -1.0"),
    (dict(edit_tensors=lambda t: t["layer.1.value.mean"].__setitem__(0, np.nan),
          redigest=True), InvalidInputError, "non-finite value nan"),
])
def test_refusals(tmp_path, change, error, fragment):
    src = tmp_path / "m.basis.safetensors"
    write(src)
    bad = rewrite(src, tmp_path / "bad.basis.safetensors", **change)
    with pytest.raises(error) as err:
        load_basis(bad)
    message = str(err.value)
    assert message.startswith(str(bad)) and fragment in message and "\n" not in message


def test_not_a_basis_file(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": np.zeros(2, np.float32)})
    with pytest.raises(InvalidInputError, match="not a fibquant basis file"):
        load_basis(path)


def test_writer_refuses_what_the_reader_would(tmp_path):
    bad = matrices()
    mean, columns, variance = bad[(0, "key")]
    bad[(0, "key")] = (mean, columns * 2, variance)
    with pytest.raises(InvalidInputError, match="not orthonormal"):
        write(tmp_path / "m.basis.safetensors", matrices=bad)
    assert not (tmp_path / "m.basis.safetensors").exists()
