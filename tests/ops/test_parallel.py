"""Threads change nothing but speed: compress and decompress write the same bytes for any
--jobs, and decoding in cache-sized blocks (straight into the output dtype) matches the plain
float32 decode followed by a cast."""

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from fibquant_cli.core.codec import DECODE_ROWS
from fibquant_cli.core.layer import decoded_segments, narrow, restore_into, round_to_dtype, widen
from fibquant_cli.core.params import Profile
from fibquant_cli.ops import decompress as pipeline
from fibquant_cli.ops.compress import compress
from fibquant_cli.ops.decompress import decompress
from fibquant_cli.ops.spec import CompressSpec
from fibquant_cli.storage.codebook_cache import quantizer_for

from conftest import make_dump


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_jobs_do_not_change_the_files(tmp_path, monkeypatch, dtype):
    d = make_dump(tmp_path, dtype=dtype, layers=5, tokens=48)
    spec = CompressSpec(keep_first=1)
    one, two = tmp_path / "one.fq.safetensors", tmp_path / "two.fq.safetensors"
    compress(d.path, output=one, spec=spec, attention=False, jobs=1)
    compress(d.path, output=two, spec=spec, attention=False, jobs=2)
    assert one.read_bytes() == two.read_bytes()
    monkeypatch.setattr(pipeline, "DECODE_BATCH_BYTES", 1)  # one tensor per hand-off
    decompress(one, output=tmp_path / "r1.safetensors", jobs=1)
    decompress(one, output=tmp_path / "r2.safetensors", jobs=2)
    monkeypatch.setattr(pipeline, "DECODE_BATCH_BYTES", 1 << 30)  # everything in one batch
    decompress(one, output=tmp_path / "r3.safetensors", jobs=2)
    first = (tmp_path / "r1.safetensors").read_bytes()
    assert (tmp_path / "r2.safetensors").read_bytes() == first
    assert (tmp_path / "r3.safetensors").read_bytes() == first
    restored = load_file(tmp_path / "r1.safetensors")
    assert set(restored) == set(load_file(d.path))


@pytest.mark.parametrize("heads,t_mid,keep", [(3, 2000, (0, 0)), (2, 4097, (1, 2)), (1, 5, (0, 0)),
                                              (2, 0, (3, 1))])
def test_restore_into_matches_decode_then_cast(heads, t_mid, keep):
    """Blocks that straddle heads, kept tokens around them, the mean added, fp16 rounding."""
    q = quantizer_for(Profile(64, 2, 64))
    rng = np.random.default_rng(1)
    n = heads * t_mid
    x = rng.standard_normal((n, 64)).astype(np.float32) * 3.0
    codes, norms = q.encode(x)
    norms = norms.astype(np.float16).astype(np.float32)
    mean = rng.standard_normal((1, heads, 64)).astype(np.float32)
    kf, kl = keep
    kept = rng.standard_normal((1, heads, kf + kl, 64)).astype(np.float16)
    out = np.empty((1, heads, kf + t_mid + kl, 64), dtype=np.float16)
    restore_into(q, codes, norms, mean, kept, keep, out)
    ref = (q.decode(codes, norms).reshape(1, heads, t_mid, 64) + mean[:, :, None, :])
    np.testing.assert_array_equal(out[:, :, kf:kf + t_mid], ref.astype(np.float16))
    np.testing.assert_array_equal(out[:, :, :kf], kept[:, :, :kf])
    np.testing.assert_array_equal(out[:, :, kf + t_mid:], kept[:, :, kf:])
    # The segments cover every row once, in order, never across a decode block, and rounded
    # as compress rounds them for its statistics they are exactly the restored values.
    seen = [(g, r0, r1, round_to_dtype(seg, np.float16))
            for g, r0, r1, seg in decoded_segments(q, codes, norms, mean, t_mid, np.float16)]
    assert [r for _, r0, r1, _ in seen for r in range(r0, r1)] == list(range(n))
    assert all(r0 // DECODE_ROWS == (r1 - 1) // DECODE_ROWS for _, r0, r1, _ in seen)
    assert all(r0 // t_mid == g == (r1 - 1) // t_mid for g, r0, r1, _ in seen)
    flat = out[:, :, kf:kf + t_mid].reshape(n, 64)
    for _, r0, r1, rows in seen:
        np.testing.assert_array_equal(rows, flat[r0:r1].astype(np.float32))


def _finite_f32(rng, n, top):
    """Random float32 bit patterns (every exponent, subnormals, signed zeros) within +-top."""
    x = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) <= top)]
    ties = (np.arange(1, 2049, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)
    special = np.array([0.0, -0.0, 2.0 ** -25, 2.0 ** -24, 3 * 2.0 ** -26, 2.0 ** -14,
                        65504.0, -65504.0, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11],
                       dtype=np.float32)
    return np.concatenate([x, ties, ties * np.float32(2.0 ** 20), special])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_round_to_dtype_equals_the_casts(dtype):
    rng = np.random.default_rng(7)
    top = float(ml_dtypes.finfo(dtype).max)
    x = _finite_f32(rng, 200_000, top)
    # uniform bits are mostly huge or tiny: add values at the scale of real KV too
    x = np.concatenate([x, rng.standard_normal(50_000).astype(np.float32) * 4])
    got = round_to_dtype(x.copy(), dtype)
    expected = x.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_widen_equals_the_cast_bit_for_bit():
    every_f16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    expected = every_f16.astype(np.float32)
    got = widen(every_f16)
    # NaNs included: same bits, not just the same value
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    bf = every_f16.view(np.uint16).view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(widen(bf).view(np.uint32),
                                  bf.astype(np.float32).view(np.uint32))
    strided = every_f16.reshape(4, 128, 128).transpose(1, 0, 2)[:, :, 5:70]
    out = widen(strided)
    assert out.flags.c_contiguous and out.shape == strided.shape
    np.testing.assert_array_equal(out.view(np.uint32),
                                  strided.astype(np.float32).view(np.uint32))


def test_narrow_equals_the_cast_bit_for_bit():
    rng = np.random.default_rng(11)
    x = _finite_f32(rng, 400_000, 65504.0)
    # every float32 exponent that fp16 can reach, both signs, 1 in 997 bit patterns of it
    sweep = np.arange(0, 0x477FE000, 997, dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, sweep, -sweep, rng.standard_normal(50_000).astype(np.float32) * 4])
    spread = x[rng.permutation(x.size)]  # small values few in every chunk: fixed one by one
    for values in (spread, np.sort(x)):  # ... and chunks of nothing else: fixed chunk-wide
        got = narrow(values)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got.view(np.uint16),
                                      values.astype(np.float16).view(np.uint16))
    block = x[:3 * 5 * 64].reshape(3, 5, 64)[:, ::2]  # any shape and strides in, C order out
    assert narrow(block).flags.c_contiguous
    np.testing.assert_array_equal(narrow(block).view(np.uint16),
                                  block.astype(np.float16).view(np.uint16))


def test_narrow_and_widen_are_exact_where_the_cpu_flushes_subnormals():
    # its rebias makes fp16's subnormals float32 subnormals: a CPU set to flush those to zero
    # (torch can, and so can a library built with -ffast-math) must not zero them
    torch = pytest.importorskip("torch")
    import fibquant_cli.core.layer as layer

    x = np.arange(0, 0x38800000, 4099, dtype=np.uint32).view(np.float32)  # |x| < 2^-14 + ...
    x = np.concatenate([x, -x, np.float32([1.0, 65504.0])])
    every_f16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    assert layer._keeps_subnormals()
    torch.set_flush_denormal(True)
    try:
        assert not layer._keeps_subnormals()
        got = narrow(x)
        wide = widen(every_f16)  # its rescaling of fp16's subnormals would read them as 0
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(got.view(np.uint16), x.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(wide.view(np.uint32), every_f16.astype(np.float32).view(np.uint32))


def test_restore_into_clamps_only_past_the_dtype_range():
    q = quantizer_for(Profile(64, 2, 64))
    x = np.zeros((4, 64), dtype=np.float32)
    x[:, 0] = [60000.0, -60000.0, 1.0, 65000.0]
    codes, norms = q.encode(x)
    out = np.empty((1, 1, 4, 64), dtype=np.float16)
    restore_into(q, codes, norms * 1.2, None, None, (0, 0), out)  # overshoots fp16's max
    assert np.isfinite(out).all()
    big = np.abs(q.decode(codes, norms * 1.2)) > 65504
    assert big.any()
    np.testing.assert_array_equal(np.abs(out[0, 0])[big], np.float16(65504))


def test_decompress_jobs_option(tmp_path, cli):
    d = make_dump(tmp_path)
    comp = tmp_path / "kv.fq.safetensors"
    compress(d.path, output=comp, attention=False, jobs=1)
    res = cli("decompress", comp, "--jobs", "2", "-o", tmp_path / "r.safetensors")
    assert res.exit_code == 0, res.output
    assert set(load_file(tmp_path / "r.safetensors")) == set(load_file(d.path))
    res = cli("decompress", comp, "--jobs", "-1", "-o", tmp_path / "bad.safetensors")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("bits,dtype", [(3, "f16"), (2, "bf16")])
def test_chunked_encoder_statistics_are_those_of_the_restored_file(tmp_path, bits, dtype):
    """Layers longer than ENCODE_ROWS vectors, chunk boundaries inside a head, a kept token and
    key centering: the reported errors are still exactly those of the restored file."""
    from fibquant_cli.codecs.fibquant import ENCODE_ROWS
    from fibquant_cli.ops.spec import resolve_spec

    tokens, heads = 3001, 3  # 3 x 3000 middle vectors: 2 chunks, the boundary inside head 2
    assert heads * (tokens - 1) > ENCODE_ROWS > tokens - 1
    d = make_dump(tmp_path, dtype=dtype, layers=1, kv_heads=heads, query_heads=6, tokens=tokens)
    comp = tmp_path / "kv.fq.safetensors"
    spec = resolve_spec(bits=bits, keep_first=1)
    rep = compress(d.path, output=comp, spec=spec, attention=False, jobs=1).to_json()
    decompress(comp, output=tmp_path / "r.safetensors")
    original, restored = load_file(d.path), load_file(tmp_path / "r.safetensors")
    for entry, role in zip(rep["entries"], ("key", "value")):
        name = next(n for n in original if n.endswith(role) or f".{role}" in n)
        x = original[name].astype(np.float64).reshape(-1, 64)
        y = restored[name].astype(np.float64).reshape(-1, 64)
        err, energy = float(((x - y) ** 2).sum()), float((x * x).sum())
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        assert entry["rel_mse"] == pytest.approx(err / energy, rel=1e-6)
        assert entry["cosine_mean"] == pytest.approx(cos.mean(), rel=1e-6)
        assert entry["cosine_min"] == pytest.approx(cos.min(), rel=1e-6)
        assert 0 < entry["rel_mse"] < 0.2


def test_packed_codes_unpack_rows_and_refuse_indices_past_n():
    from fibquant_cli.codecs.fibquant import PackedCodes
    from fibquant_cli.core import bitpack
    from fibquant_cli.errors import IntegrityError

    p = Profile(64, 2, 48)  # N = 48 on 6-bit wires: 48..63 are not codewords
    n, bpv = 2 * DECODE_ROWS + 5, p.blocks_per_vector
    codes = np.random.default_rng(0).integers(0, 48, size=(n, bpv))
    packed = bitpack.check_stream(bitpack.pack(codes, p.wire_bits), n * bpv, p.wire_bits)
    stream = PackedCodes(packed, n, p, "fq/e0/l0/codes")
    assert stream.shape == (n, bpv)
    for a, b in [(0, DECODE_ROWS), (DECODE_ROWS, 2 * DECODE_ROWS), (2 * DECODE_ROWS, n), (3, 11)]:
        got = stream.rows(a, b)
        assert got.dtype == np.intp
        np.testing.assert_array_equal(got, codes[a:b])
    stream.check_all()
    bad = codes.copy()
    bad[DECODE_ROWS + 7, 3] = 63
    packed = bitpack.pack(bad, p.wire_bits)
    stream = PackedCodes(packed, n, p, "fq/e0/l0/codes")
    stream.rows(0, DECODE_ROWS)  # the block without it decodes
    position = (DECODE_ROWS + 7) * bpv + 3
    with pytest.raises(IntegrityError, match=f"index 63 at position {position} is >= N = 48"):
        stream.check_all()
