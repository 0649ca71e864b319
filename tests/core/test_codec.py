"""encode/decode over arrays, the codebook cache and the core's import boundary."""

import subprocess
import sys

import numpy as np
import pytest

from fibquant_cli.core.codebook import initial_codebook, nearest_bruteforce
from fibquant_cli.core.codec import FibQuantizer, default_rotation
from fibquant_cli.core.params import Profile
from fibquant_cli.core.rotation import haar_rotation
from fibquant_cli.errors import IntegrityError, InvalidInputError
from fibquant_cli.storage import codebook_cache as cache


@pytest.fixture(scope="module")
def quantizer():
    profile = Profile(16, 2, 16, restarts=1, iterations=5)
    return FibQuantizer(profile, initial_codebook(16, 2, 16), default_rotation(profile))


def test_rotation_is_orthogonal_with_positive_r_diagonal():
    q = haar_rotation(32, np.random.default_rng(0))
    np.testing.assert_allclose(q.T @ q, np.eye(32), atol=1e-12)
    g = np.random.default_rng(0).standard_normal((32, 32))
    _, r = np.linalg.qr(g)
    # Q * sign(diag R) is the unique QR with positive diagonal: Q^T G is upper triangular.
    upper = q.T @ g
    np.testing.assert_allclose(np.tril(upper, -1), 0, atol=1e-10)
    assert np.all(np.diag(upper) > 0)
    assert np.abs(np.diag(r)).tolist() == pytest.approx(np.diag(upper).tolist())


def test_encode_matches_reference_pipeline(quantizer):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 16)) * 3.0
    codes, norms = quantizer.encode(x)
    nu = np.linalg.norm(x, axis=1)
    y = (x / nu[:, None]) @ quantizer.rotation.T
    ref = nearest_bruteforce(y.reshape(-1, 2), quantizer.codebook).reshape(500, 8)
    assert np.mean(codes == ref) > 0.999  # the codec searches in float32
    np.testing.assert_allclose(norms, nu, rtol=1e-6)


def test_decode_is_norm_times_rotated_codewords(quantizer):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, size=(50, 8)).astype(np.uint32)
    norms = rng.uniform(0.5, 4, size=50).astype(np.float32)
    expected = norms[:, None] * (quantizer.codebook[codes].reshape(50, 16) @ quantizer.rotation)
    np.testing.assert_allclose(quantizer.decode(codes, norms), expected, rtol=1e-5, atol=1e-6)


def test_round_trip_error_is_the_codebook_distortion(quantizer):
    rng = np.random.default_rng(3)
    u = rng.standard_normal((20_000, 16))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x = u * rng.uniform(0.1, 10, size=(20_000, 1))
    x_hat = quantizer.decode(*quantizer.encode(x))
    rel = ((x - x_hat) ** 2).sum(1) / (x**2).sum(1)
    y = u @ quantizer.rotation.T
    blocks = y.reshape(-1, 2)
    dist = ((blocks - quantizer.codebook[nearest_bruteforce(blocks, quantizer.codebook)]) ** 2)
    d_unit = dist.sum() / 20_000
    assert rel.mean() == pytest.approx(d_unit, rel=0.01)


def test_zero_vectors_decode_to_exact_zeros(quantizer):
    x = np.zeros((3, 16))
    x[1] = 1.0
    codes, norms = quantizer.encode(x)
    assert norms[0] == 0 and norms[2] == 0
    out = quantizer.decode(codes, norms)
    assert np.all(out[0] == 0) and np.all(out[2] == 0)
    assert np.any(out[1] != 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_named(quantizer, bad):
    x = np.ones((40_000, 16), dtype=np.float32)
    x[33_333, 5] = bad  # beyond the first row chunk, so the offset must be added
    with pytest.raises(InvalidInputError, match=r"row 33333 is not finite .* at column 5"):
        quantizer.encode(x)


def test_encode_rejects_wrong_width(quantizer):
    with pytest.raises(InvalidInputError, match=r"expected vectors of shape \(n, 16\)"):
        quantizer.encode(np.ones((4, 15)))


def test_cache_builds_once_then_loads_and_rebuilds_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("FIBQUANT_CACHE_DIR", str(tmp_path))
    profile = Profile(16, 2, 8, restarts=1, iterations=3, seed=11)
    first, origin = cache.load_or_build(profile)
    assert origin.kind == "built" and origin.path.parent == tmp_path
    second, origin2 = cache.load_or_build(profile)
    assert origin2.kind == "cache"
    assert first.tobytes() == second.tobytes()
    # Corrupt the stored codebook (keep the file readable): detected and rebuilt.
    with np.load(origin.path) as z:
        parts = {k: z[k] for k in z.files}
    parts["codebook"] = parts["codebook"] + 1e-9
    np.savez(origin.path, **parts)
    with pytest.raises(IntegrityError, match="codebook digest mismatch"):
        cache.load_entry(origin.path, profile)
    third, origin3 = cache.load_or_build(profile)
    assert origin3.kind == "built" and "rebuilt" in origin3.note
    assert third.tobytes() == first.tobytes()


def test_cache_entry_of_another_profile_is_refused(tmp_path):
    a = Profile(16, 2, 8, restarts=1, iterations=1)
    b = Profile(16, 2, 8, restarts=1, iterations=2)
    path = tmp_path / "x.npz"
    cache.save_entry(path, a, initial_codebook(16, 2, 8))
    with pytest.raises(IntegrityError, match="another profile"):
        cache.load_entry(path, b)


@pytest.mark.parametrize("d,k,n", [(64, 2, 16), (64, 2, 64), (64, 2, 256), (64, 4, 256),
                                   (64, 8, 256), (128, 2, 64), (128, 4, 256), (128, 8, 256)])
def test_shipped_codebooks_exist_and_verify(d, k, n):
    profile = Profile(d, k, n)
    path = cache.SHIPPED_DIR / cache.entry_name(profile)
    assert path.exists(), f"missing shipped codebook {path.name}"
    cb = cache.load_entry(path, profile)
    assert cb.shape == (n, k)


def test_core_never_imports_cli_libraries():
    code = ("import sys, fibquant_cli.core.codec, fibquant_cli.storage.codebook_cache, "
            "fibquant_cli.core.scalar, fibquant_cli.core.bitpack, fibquant_cli.core.attention;"
            "bad = {'typer', 'rich', 'safetensors', 'scipy', 'torch'} & set(sys.modules); "
            "print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_normalize_fast_path_and_float64_fallbacks():
    from fibquant_cli.core.codec import normalize

    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 16)).astype(np.float32)
    x[1] *= 1e30   # squares overflow float32
    x[2] *= 1e-25  # squares underflow float32
    x[3] = 0.0
    nu, u = normalize(x)
    ref = np.linalg.norm(x.astype(np.float64), axis=1)
    np.testing.assert_allclose(nu, ref, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(u[[0, 1, 2, 4, 5]], axis=1), 1.0, rtol=1e-6)
    assert np.all(u[3] == 0)


def test_normalize_refuses_norms_beyond_float32():
    from fibquant_cli.core.codec import normalize

    x = np.full((3, 16), 3e38, dtype=np.float32)
    x[0] = 1.0
    with pytest.raises(InvalidInputError, match=r"row 1: vector norm beyond the float32 range"):
        normalize(x)


@pytest.mark.parametrize("dtype,st", [(np.float16, "F16"), ("bfloat16", "BF16"), (np.float32, "F32")])
def test_largest_magnitude_matches_numpy(dtype, st):
    import ml_dtypes

    from fibquant_cli.ops.compress_plan import largest_magnitude

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    x = (np.random.default_rng(5).standard_normal(999) * 300).astype(dt)
    x[17] = -float(np.abs(x.astype(np.float32)).max()) * 1.5  # the largest is negative
    assert largest_magnitude(x.tobytes(), st) == float(np.abs(x.astype(np.float32)).max())
    assert largest_magnitude(b"", st) == 0.0
    x[3] = np.nan
    assert np.isnan(largest_magnitude(x.tobytes(), st))
    x[3] = -np.inf
    assert largest_magnitude(x.tobytes(), st) == np.inf
