"""Peer KV codecs: hand-computed KIVI cases, a brute-force KIVI reference, exact bit counts,
gguf bit-for-bit agreement (when gguf is installed) and availability without gguf."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from fibquant_cli.errors import InvalidInputError, UsageError
from fibquant_cli.formats import peers
from fibquant_cli.formats.peers import (
    Fp8Codec,
    Fp16Codec,
    KiviCodec,
    PeerCodec,
    available_peers,
    get_peer,
    peer_names,
)

GGML_BITS = {"q8_0": 8.5, "q5_1": 6.0, "q5_0": 5.5, "q4_1": 5.0, "q4_0": 4.5}
GGML_PAYLOAD_BITS = {"q8_0": 8.0, "q5_1": 5.0, "q5_0": 5.0, "q4_1": 4.0, "q4_0": 4.0}
KIVI4, KIVI2 = KiviCodec("kivi_int4", 4), KiviCodec("kivi_int2", 2)


def gaussian(shape=(1, 2, 64, 64), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def rel_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    return float(np.sum((x64 - x_hat) ** 2) / np.sum(x64**2))


def kivi_reference(x: np.ndarray, role: str, bits: int) -> np.ndarray:
    """One group at a time, in the plain words of the KIVI description."""
    out = np.empty_like(x)
    b, h, t, d = x.shape
    top = 2**bits - 1
    axis_len = t if role == "key" else d
    for i in range(b):
        for j in range(h):
            for r in range(d if role == "key" else t):
                for g0 in range(0, axis_len, 32):
                    span = slice(g0, g0 + 32)
                    sl = (i, j, span, r) if role == "key" else (i, j, r, span)
                    group = x[sl]
                    scale = np.float32(np.float16((group.max() - group.min()) / np.float32(top)))
                    zero = np.float32(np.float16(group.min()))
                    codes = np.zeros_like(group) if scale == 0 else np.clip(
                        np.rint((group - zero) / scale), 0, top)
                    out[sl] = codes * scale + zero
    return out


# --------------------------------------------------------------------------- protocol, registry


def test_every_runnable_peer_follows_the_protocol():
    x = gaussian()
    avail = available_peers()
    assert set(avail.runnable) | set(avail.unavailable) == set(peer_names())
    for name, codec in avail.runnable.items():
        assert isinstance(codec, PeerCodec) and codec.name == name
        for role in ("key", "value"):
            x_hat = codec.roundtrip(x, role)
            assert x_hat.dtype == np.float32 and x_hat.shape == x.shape
            payload = codec.payload_bits_per_value(x.shape, role)
            assert codec.bits_per_value(x.shape, role) >= payload


def test_without_gguf_the_llama_cpp_peers_are_unavailable_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    avail = available_peers()
    assert set(avail.unavailable) == {"q8_0", "q5_1", "q5_0", "q4_1", "q4_0"}
    for reason in avail.unavailable.values():
        assert "pip install gguf" in reason
    assert list(avail.runnable) == ["fp16", "fp8_e4m3", "kivi_int4", "kivi_int2"]
    with pytest.raises(UsageError, match="peer 'q4_0' is unavailable: needs the optional 'gguf'"):
        get_peer("q4_0")
    assert get_peer("kivi_int2") == KIVI2


def test_unknown_peer_names_the_known_ones():
    with pytest.raises(UsageError, match="unknown peer 'q3_0'; expected one of fp16, fp8_e4m3"):
        get_peer("q3_0")


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 64), np.float32), "expected a 4-D tensor"),
    (np.zeros((1, 1, 4, 32), np.int32), "expected a float tensor"),
    (np.full((1, 1, 2, 32), np.nan, np.float32), r"value at index \(0, 0, 0, 0\) is not finite"),
    (np.full((1, 1, 2, 32), 1e5, np.float32), "exceeds the float16 range"),
])
def test_bad_input_is_named(bad, message):
    with pytest.raises(InvalidInputError, match=message):
        KIVI4.roundtrip(bad, "key")


def test_bad_role_and_shape():
    with pytest.raises(InvalidInputError, match="role must be one of key, value, got 'query'"):
        Fp16Codec().roundtrip(gaussian(), "query")
    with pytest.raises(InvalidInputError, match="positive ints"):
        KIVI4.bits_per_value((1, 0, 32, 64), "key")


# --------------------------------------------------------------------------- KIVI


def test_kivi_values_by_hand():
    # Values: one group per token along head_dim (4 channels -> one short group each), b = 2.
    x = np.array([[[[0.0, 0.5, 2.0, 3.0],     # min 0, max 3: scale 3/3 = 1, zero 0
                    [-1.0, 0.2, 1.4, 5.0]]]],  # min -1, max 5: scale 6/3 = 2, zero -1
                 dtype=np.float32)
    # codes: rint([0, .5, 2, 3]) = [0, 0, 2, 3] (0.5 ties to even);
    #        rint(([-1, .2, 1.4, 5] + 1) / 2) = rint([0, .6, 1.2, 3]) = [0, 1, 1, 3]
    expected = np.array([[[[0.0, 0.0, 2.0, 3.0],
                           [-1.0, 1.0, 1.0, 5.0]]]], dtype=np.float32)
    np.testing.assert_array_equal(KIVI2.roundtrip(x, "value"), expected)


def test_kivi_keys_by_hand_use_the_float16_scale():
    # Keys: one group per channel along tokens (3 tokens, 2 channels), b = 4.
    x = np.array([[[[0.0, 7.0], [0.5, 7.0], [1.0, 7.0]]]], dtype=np.float32)
    # channel 0: min 0, max 1, scale 1/15 stored as float16 0.066650390625, zero 0;
    #   codes rint([0, .5, 1] / 0.066650390625) = rint([0, 7.5018, 15.0037]) = [0, 8, 15]
    # channel 1: constant, scale 0, zero 7 -> reconstructed exactly
    s16 = 0.066650390625
    assert np.float16(1 / 15) == s16
    expected = np.array([[[[0.0, 7.0], [8 * s16, 7.0], [15 * s16, 7.0]]]], dtype=np.float32)
    np.testing.assert_array_equal(KIVI4.roundtrip(x, "key"), expected)


@pytest.mark.parametrize("role", ["key", "value"])
@pytest.mark.parametrize("codec", [KIVI4, KIVI2], ids=lambda c: c.name)
def test_kivi_matches_the_group_by_group_reference(codec, role):
    x = gaussian((2, 2, 40, 48), seed=3) * np.float32(3.0)  # short last groups on both axes
    np.testing.assert_array_equal(codec.roundtrip(x, role), kivi_reference(x, role, codec.bits))


def test_kivi_chunking_does_not_change_the_result(monkeypatch):
    x = gaussian((1, 3, 70, 64), seed=4)
    whole = {role: KIVI2.roundtrip(x, role) for role in ("key", "value")}
    monkeypatch.setattr(peers, "KIVI_BUDGET_BYTES", 7 * 4 * 64 * 4)  # 7 rows per chunk
    for role in ("key", "value"):
        np.testing.assert_array_equal(KIVI2.roundtrip(x, role), whole[role])


def test_kivi_keys_per_channel_confine_an_outlier_channel():
    x = gaussian((1, 2, 64, 64), seed=5)
    x[..., 5] *= 100.0
    others = np.arange(64) != 5
    clean = x[..., others]
    per_channel = KIVI4.roundtrip(x, "key")[..., others]
    per_token = KIVI4.roundtrip(x, "value")[..., others]
    # Per-channel groups never see channel 5, so the other channels are exactly as without it.
    x_plain = x.copy()
    x_plain[..., 5] /= 100.0
    np.testing.assert_array_equal(per_channel, KIVI4.roundtrip(x_plain, "key")[..., others])
    assert rel_mse(clean, per_channel) < 0.01
    assert rel_mse(clean, per_token) > 100 * rel_mse(clean, per_channel)


def test_kivi_error_falls_with_bits():
    x = gaussian()
    for role in ("key", "value"):
        assert rel_mse(x, KIVI4.roundtrip(x, role)) < rel_mse(x, KIVI2.roundtrip(x, role)) / 10


def test_kivi_bits_per_value_by_hand():
    shape = (1, 1, 40, 64)  # 2560 values
    # keys: per channel, tokens 40 = one group of 32 + one of 8 -> 64 * 2 = 128 groups
    assert KIVI4.n_groups(shape, "key") == 128
    assert KIVI4.bits_per_value(shape, "key") == 4 + 128 * 32 / 2560 == 5.6
    assert KIVI2.bits_per_value(shape, "key") == 2 + 128 * 32 / 2560 == 3.6
    # values: per token, head_dim 64 = two groups of 32 -> 40 * 2 = 80 groups
    assert KIVI4.bits_per_value(shape, "value") == 4 + 80 * 32 / 2560 == 5.0
    # whole groups on both axes: exactly b + 1
    assert KIVI2.bits_per_value((2, 3, 384, 64), "key") == 3.0
    assert KIVI2.bits_per_value((2, 3, 384, 64), "value") == 3.0
    assert KIVI2.payload_bits_per_value(shape, "key") == 2.0


# --------------------------------------------------------------------------- fp8, fp16


def test_fp8_error_band_and_bits():
    x = gaussian((1, 2, 256, 64))
    r = rel_mse(x, Fp8Codec().roundtrip(x, "key"))
    assert 3e-4 < r < 3e-3
    assert Fp8Codec().bits_per_value((1, 3, 384, 64), "key") == 8 + 32 / (3 * 384 * 64)
    assert Fp8Codec().payload_bits_per_value((1, 3, 384, 64), "value") == 8.0


def test_fp8_uses_the_whole_e4m3_range_and_handles_zeros():
    x = gaussian()
    x_hat = Fp8Codec().roundtrip(x, "value")
    assert np.isfinite(x_hat).all()
    amax = np.abs(x).max()
    assert np.abs(x_hat).max() == pytest.approx(amax, rel=1e-6)
    zeros = np.zeros((1, 1, 4, 32), np.float32)
    np.testing.assert_array_equal(Fp8Codec().roundtrip(zeros, "key"), zeros)


def test_fp16_is_the_float16_rounding():
    x = gaussian()
    np.testing.assert_array_equal(Fp16Codec().roundtrip(x, "key"),
                                  x.astype(np.float16).astype(np.float32))
    assert Fp16Codec().bits_per_value(x.shape, "key") == 16.0


# --------------------------------------------------------------------------- llama.cpp via gguf


@pytest.mark.parametrize("name", list(GGML_BITS))
def test_ggml_peer_is_gguf_bit_for_bit(name):
    gguf = pytest.importorskip("gguf")
    codec = get_peer(name)
    qtype = gguf.GGMLQuantizationType[name.upper()]
    x = gaussian((1, 2, 40, 64), seed=6)
    for role in ("key", "value"):
        x_hat = codec.roundtrip(x, role)
        reference = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        np.testing.assert_array_equal(x_hat.view(np.uint32), reference.view(np.uint32))
        assert codec.bits_per_value(x.shape, role) == GGML_BITS[name]
        assert codec.payload_bits_per_value(x.shape, role) == GGML_PAYLOAD_BITS[name]


def test_ggml_error_falls_with_bits():
    pytest.importorskip("gguf")
    x = gaussian()
    errors = {name: rel_mse(x, get_peer(name).roundtrip(x, "key")) for name in GGML_BITS}
    assert errors["q8_0"] < errors["q5_0"] < errors["q4_0"]
    assert errors["q8_0"] < errors["q4_0"] / 100


def test_ggml_head_dim_must_be_a_block_multiple():
    pytest.importorskip("gguf")
    message = "head_dim 48 is not a multiple of the q4_0 block size 32"
    with pytest.raises(InvalidInputError, match=message):
        get_peer("q4_0").roundtrip(gaussian((1, 1, 4, 48)), "key")
    with pytest.raises(InvalidInputError, match="head_dim 40"):
        get_peer("q8_0").bits_per_value((1, 1, 4, 40), "value")


def test_core_peers_imports_no_cli_or_file_libraries():
    banned = ("typer", "rich", "safetensors", "scipy", "torch")
    source = open(peers.__file__).read()
    for name in banned:
        assert f"import {name}" not in source and f"from {name}" not in source
    assert math.isclose(peers.FP8_MAX, 448.0)
