"""core/rope.py and the manifest's optional ``rope`` object."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fibquant_cli.core.rope import pair_halves, pair_order, rope_angles, rotate, turn_pairs, unrotate
from fibquant_cli.errors import InvalidInputError
from fibquant_cli.formats.manifest import load_manifest, parse_manifest

from conftest import make_dump

ROPE = {"theta": 100000.0, "style": "half", "first_position": 0}


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_unrotate_inverts_rotate_to_machine_precision(style):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 50, 64))
    positions = 10_000 + np.arange(50)
    back = unrotate(rotate(x, positions, 1e5, style), positions, 1e5, style)
    assert np.abs(back - x).max() < 1e-12
    # A rotation keeps every pair's length, so the vector norms too.
    assert np.allclose(np.linalg.norm(rotate(x, positions, 1e5, style), axis=-1),
                       np.linalg.norm(x, axis=-1), rtol=1e-13)


def test_styles_are_complex_multiplication_on_their_pairs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 8))
    pos = np.arange(5) * 7
    turn = np.exp(1j * rope_angles(pos, 8, 500.0))
    inter = rotate(x, pos, 500.0, "interleaved")
    z = (x[:, 0::2] + 1j * x[:, 1::2]) * turn
    assert np.allclose(inter[:, 0::2], z.real, atol=1e-14)
    assert np.allclose(inter[:, 1::2], z.imag, atol=1e-14)
    half = rotate(x, pos, 500.0, "half")
    z = (x[:, :4] + 1j * x[:, 4:]) * turn
    assert np.allclose(half[:, :4], z.real, atol=1e-14)
    assert np.allclose(half[:, 4:], z.imag, atol=1e-14)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_turn_pairs_is_rotate_on_pair_ordered_channels(style):
    """The codecs' float32 turn: channels in pair_order, one complex multiply per pair."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 3, 16))  # (tokens, heads, d)
    order = pair_order(16, style)
    assert sorted(order) == list(range(16))
    first = 70_000
    want = rotate(x.transpose(1, 0, 2), first + np.arange(40), 1e4, style).transpose(1, 0, 2)
    y = np.ascontiguousarray(x[..., order], dtype=np.float32)
    turn_pairs(y, first, 1e4)
    assert np.abs(y - want[..., order]).max() < 2e-5
    turn_pairs(y, first, 1e4, inverse=True)
    assert np.abs(y - x[..., order]).max() < 2e-5
    # pair_halves are views (writes land in z) of a head in the same order
    z = np.empty_like(x)
    a, b = pair_halves(z, style)
    a[...], b[...] = x[..., order][..., 0::2], x[..., order][..., 1::2]
    np.testing.assert_array_equal(z, x)


def test_half_style_matches_transformers_rotate_half():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import rotate_half

    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 2, 16, 64))
    pos = np.arange(16)
    ang = np.concatenate([rope_angles(pos, 64, 1e4)] * 2, axis=-1)
    xt = torch.from_numpy(x)
    ref = xt * torch.from_numpy(np.cos(ang)) + rotate_half(xt) * torch.from_numpy(np.sin(ang))
    assert np.abs(rotate(x, pos, 1e4, "half") - ref.numpy()).max() < 1e-13


def _manifest_with(tmp_path, rope, entry=0):
    d = make_dump(tmp_path)
    obj = copy.deepcopy(d.manifest)
    obj["entries"][entry]["rope"] = rope
    return d, obj


def test_rope_object_parses_round_trips_and_keeps_the_shape_digest(tmp_path, cli):
    d, obj = _manifest_with(tmp_path, ROPE)
    plain = parse_manifest(d.manifest, source="m")
    m = parse_manifest(obj, source="m")
    assert m.entries[0].rope.to_json() == ROPE
    assert parse_manifest(m.to_json(), source="copy") == m
    assert m.entries[0].shape.digest() == plain.entries[0].shape.digest()
    d.write_manifest(obj)
    assert cli("validate", d.path).exit_code == 0
    # compress/decompress carry it through to the restored manifest
    out = tmp_path / "kv.fq.safetensors"
    assert cli("compress", d.path, "-o", out, "--no-attention").exit_code == 0
    assert cli("decompress", out, "-o", tmp_path / "r.safetensors").exit_code == 0
    assert load_manifest(tmp_path / "r.manifest.json").entries[0].rope == m.entries[0].rope


@pytest.mark.parametrize("rope, entry, message", [
    (ROPE, 1, "only an entry whose rope_state is post_rope may carry rope"),
    ({**ROPE, "style": "neox"}, 0, "'neox' is not one of half, interleaved"),
    ({**ROPE, "theta": 1.0}, 0, "expected a finite number > 1"),
    ({**ROPE, "theta": "1e4"}, 0, "expected a number, found string"),
    ({**ROPE, "first_position": -1}, 0, "first_position: expected an integer in"),
    ({k: v for k, v in ROPE.items() if k != "style"}, 0, "missing key 'style'"),
    ({**ROPE, "scaling": 2}, 0, "unknown key 'scaling'"),
])
def test_bad_rope_objects_are_refused(tmp_path, cli, rope, entry, message):
    d, obj = _manifest_with(tmp_path, rope, entry)
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(")):
        parse_manifest(obj, source="m")
    d.write_manifest(obj)
    res = cli("validate", d.path)
    assert res.exit_code == 3 and message in res.stderr
