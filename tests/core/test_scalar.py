"""The scalar baseline (spec section 4): Lloyd-Max table, its distortion, and the codec."""

import functools
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import integrate

from fibquant_cli.core import scalar as sc
from fibquant_cli.core.rotation import haar_rotation
from fibquant_cli.errors import InvalidInputError, ProfileError, ResourceError

SPEC_D_UNIT_64 = {1: 0.358, 2: 0.1145, 3: 0.0334, 4: 0.0091}
N_FRESH = 20_000


# --- independent references (scipy.integrate.quad on the unnormalized density) ------------
def _cell_integral(d: int, lo: float, hi: float, g) -> float:
    """Integral of g(x) (1 - x)^p (1 + x)^p over a cell [lo, hi] (not both +-1), p = (d - 3)/2.

    For d = 2 (p < 0) a cell touching +-1 puts the singular endpoint factor into quad's
    algebraic weight, so it is integrated exactly.
    """
    p = (d - 3) / 2.0
    opts = dict(epsabs=0.0, epsrel=1e-13, limit=200)
    if p < 0 and hi == 1.0:
        val, _ = integrate.quad(lambda x: g(x) * (1 + x) ** p, lo, hi, weight="alg",
                                wvar=(0.0, p), **opts)
    elif p < 0 and lo == -1.0:
        val, _ = integrate.quad(lambda x: g(x) * (1 - x) ** p, lo, hi, weight="alg",
                                wvar=(p, 0.0), **opts)
    else:
        val, _ = integrate.quad(lambda x: g(x) * ((1 - x) * (1 + x)) ** p, lo, hi, **opts)
    return val


def _edges(thresholds):
    return np.concatenate(([-1.0], thresholds, [1.0]))


def _quad_centroids(d, thresholds):
    e = _edges(thresholds)
    mass = np.array([_cell_integral(d, a, b, lambda x: 1.0) for a, b in zip(e[:-1], e[1:])])
    m1 = np.array([_cell_integral(d, a, b, lambda x: x) for a, b in zip(e[:-1], e[1:])])
    return m1 / mass


def _quad_d_unit(d, levels, thresholds):
    e = _edges(thresholds)
    total = sum(_cell_integral(d, a, b, lambda x: 1.0) for a, b in zip(e[:-1], e[1:]))
    err = sum(_cell_integral(d, a, b, lambda x, c=c: (x - c) ** 2)
              for a, b, c in zip(e[:-1], e[1:], levels))
    return d * err / total


def _mean_abs_coordinate(d):
    """E|X| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


@functools.cache
def _rotation(d):
    return haar_rotation(d, np.random.default_rng(0))


@functools.cache
def _fresh_unit_vectors(d, n, seed):
    """n uniform points on S^(d-1) (Gaussian -> normalize), independent of the rotation's stream."""
    u = np.random.default_rng(seed).standard_normal((n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    u.setflags(write=False)
    return u


def _measured_d_unit(d, bits, n=N_FRESH, seed=1):
    q = sc.ScalarQuantizer(d, bits, _rotation(d))
    u = _fresh_unit_vectors(d, n, seed)
    u_hat = q.decode(*q.encode(u)).astype(np.float64)
    return float(np.mean(np.sum((u - u_hat) ** 2, axis=1)))


# --- the table -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_d_unit_theory_matches_spec_at_d64(bits):
    assert sc.scalar_d_unit_theory(64, bits) == pytest.approx(SPEC_D_UNIT_64[bits], rel=0.02)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_d_unit_measured_matches_theory_and_spec_at_d64(bits):
    measured = _measured_d_unit(64, bits)
    assert measured == pytest.approx(sc.scalar_d_unit_theory(64, bits), rel=0.02)
    assert measured == pytest.approx(SPEC_D_UNIT_64[bits], rel=0.02)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_d_unit_measured_matches_theory_at_d128(bits):
    measured = _measured_d_unit(128, bits, n=N_FRESH // 2, seed=2)
    assert measured == pytest.approx(sc.scalar_d_unit_theory(128, bits), rel=0.02)


@pytest.mark.parametrize("d", [2, 3, 5, 64, 128, 1024])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_table_satisfies_lloyd_max_conditions(d, bits):
    levels, thresholds = sc.lloyd_max_table(d, bits)
    assert levels.dtype == thresholds.dtype == np.float64
    assert levels.shape == (2**bits,) and thresholds.shape == (2**bits - 1,)
    assert np.all(np.diff(levels) > 0) and -1 < levels[0] and levels[-1] < 1
    np.testing.assert_array_equal(thresholds, 0.5 * (levels[:-1] + levels[1:]))
    np.testing.assert_array_equal(levels, -levels[::-1])
    np.testing.assert_allclose(levels, _quad_centroids(d, thresholds), rtol=1e-8)


@pytest.mark.parametrize("d", [2, 3, 5, 64, 128, 1024])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_d_unit_theory_matches_quadrature(d, bits):
    levels, thresholds = sc.lloyd_max_table(d, bits)
    expected = _quad_d_unit(d, levels, thresholds)
    assert sc.scalar_d_unit_theory(d, bits) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("d", [2, 3, 4, 7, 64, 128, 1000, 8192])
def test_one_bit_level_is_mean_abs_coordinate(d):
    levels, thresholds = sc.lloyd_max_table(d, 1)
    m = _mean_abs_coordinate(d)
    np.testing.assert_allclose(levels, [-m, m], rtol=1e-9)
    np.testing.assert_array_equal(thresholds, [0.0])
    assert sc.scalar_d_unit_theory(d, 1) == pytest.approx(1.0 - d * m * m, rel=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 5, 8])
def test_d3_marginal_is_uniform(bits):
    # At d = 3 the marginal is uniform on [-1, 1] (Archimedes): a uniform quantizer, D_unit = 1/L^2.
    size = 2**bits
    levels, _ = sc.lloyd_max_table(3, bits)
    np.testing.assert_allclose(levels, -1.0 + (2.0 * np.arange(size) + 1.0) / size, atol=1e-13)
    assert sc.scalar_d_unit_theory(3, bits) == pytest.approx(1.0 / size**2, rel=1e-10)


def test_table_is_cached_and_read_only():
    levels, thresholds = sc.lloyd_max_table(64, 3)
    again = sc.lloyd_max_table(64, 3)
    assert again[0] is levels and again[1] is thresholds
    with pytest.raises(ValueError):
        levels[0] = 0.0
    assert sc.lloyd_max_table(np.int64(64), 3)[0] is levels


@pytest.mark.parametrize("d,bits,exc", [
    (1, 2, ProfileError), (0, 2, ProfileError), (64, 0, ProfileError), (64, 9, ProfileError),
    (True, 2, ProfileError), (64.0, 2, ProfileError), (64, "2", ProfileError),
    (10**5, 2, ResourceError),
])
def test_table_rejects_bad_arguments(d, bits, exc):
    with pytest.raises(exc):
        sc.lloyd_max_table(d, bits)
    with pytest.raises(exc):
        sc.scalar_d_unit_theory(d, bits)
    assert issubclass(ProfileError, InvalidInputError)


# --- the codec ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rotation64():
    return _rotation(64)


def _brute_force_codes(x, rotation, levels):
    """Nearest level of each rotated coordinate by full comparison; first minimum wins."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = u @ rotation.T
    return np.argmin(np.abs(y[:, :, None] - levels[None, None, :]), axis=2)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_encode_matches_brute_force_and_decode_shape(rotation64, bits):
    q = sc.ScalarQuantizer(64, bits, rotation64)
    x = np.random.default_rng(3).standard_normal((500, 64)) * 7.0
    codes, norms = q.encode(x)
    assert codes.dtype == np.uint32 and codes.shape == (500, 64)
    assert norms.dtype == np.float32 and norms.shape == (500,)
    assert codes.max() < 2**bits
    np.testing.assert_array_equal(codes, _brute_force_codes(x, rotation64, q.levels))
    np.testing.assert_allclose(norms, np.linalg.norm(x, axis=1), rtol=1e-6)
    x_hat = q.decode(codes, norms)
    assert x_hat.dtype == np.float32 and x_hat.shape == (500, 64)
    expected = norms[:, None].astype(np.float64) * (q.levels[codes] @ rotation64)
    np.testing.assert_allclose(x_hat, expected, rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_results(rotation64):
    q = sc.ScalarQuantizer(64, 4, rotation64)
    x = np.random.default_rng(4).standard_normal((37, 64)).astype(np.float32)
    codes, norms = q.encode(x)
    codes_1, norms_1 = q.encode(x, budget_bytes=1)  # one row per chunk
    np.testing.assert_array_equal(codes, codes_1)
    np.testing.assert_array_equal(norms, norms_1)
    np.testing.assert_allclose(q.decode(codes, norms), q.decode(codes, norms, budget_bytes=1),
                               rtol=1e-6, atol=1e-7)


def test_zero_rows_round_trip_to_exact_zeros(rotation64):
    q = sc.ScalarQuantizer(64, 2, rotation64)
    x = np.random.default_rng(5).standard_normal((6, 64))
    x[[0, 4]] = 0.0
    codes, norms = q.encode(x)
    assert norms[0] == 0.0 and norms[4] == 0.0
    assert np.all((codes >= 0) & (codes < 4))
    x_hat = q.decode(codes, norms)
    for row in (0, 4):
        assert np.all(x_hat[row] == 0.0) and not np.any(np.signbit(x_hat[row]))
    assert np.all(np.abs(x_hat[1]) > 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("budget", [sc.CODEC_BUDGET_BYTES, 1])
def test_non_finite_rows_are_named(rotation64, bad, budget):
    q = sc.ScalarQuantizer(64, 2, rotation64)
    x = np.ones((8, 64), dtype=np.float32)
    x[3, 17] = bad
    x[6, 0] = bad
    with pytest.raises(InvalidInputError, match=r"^row 3 is not finite$"):
        q.encode(x, budget_bytes=budget)


def test_encode_accepts_half_precision(rotation64):
    q = sc.ScalarQuantizer(64, 3, rotation64)
    x = np.random.default_rng(6).standard_normal((20, 64))
    codes16, _ = q.encode(x.astype(np.float16))
    codes64, _ = q.encode(x.astype(np.float16).astype(np.float64))
    np.testing.assert_array_equal(codes16, codes64)


def test_encode_rejects_norm_beyond_float32(rotation64):
    q = sc.ScalarQuantizer(64, 2, rotation64)
    x = np.ones((3, 64))
    x[2] = 1e300
    with pytest.raises(InvalidInputError, match="row 2"):
        q.encode(x)


@pytest.mark.parametrize("x", [np.ones((4, 32)), np.ones(64), np.ones((2, 64), dtype=complex)])
def test_encode_rejects_bad_arrays(rotation64, x):
    with pytest.raises(InvalidInputError):
        sc.ScalarQuantizer(64, 2, rotation64).encode(x)


def test_decode_validates_codes_and_norms(rotation64):
    q = sc.ScalarQuantizer(64, 2, rotation64)
    codes, norms = q.encode(np.ones((3, 64)))
    bad = codes.copy()
    bad[1, 5] = 4
    with pytest.raises(InvalidInputError, match=r"\[0, 4\)"):
        q.decode(bad, norms)
    with pytest.raises(InvalidInputError, match="row 2"):
        q.decode(codes, np.array([1.0, 1.0, -1.0], dtype=np.float32))
    with pytest.raises(InvalidInputError, match="row 0"):
        q.decode(codes, np.array([np.nan, 1.0, 1.0], dtype=np.float32))
    with pytest.raises(InvalidInputError):
        q.decode(codes[:, :32], norms)
    with pytest.raises(InvalidInputError):
        q.decode(codes, norms[:2])
    with pytest.raises(InvalidInputError):
        q.decode(codes.astype(np.float32), norms)
    empty = q.decode(np.empty((0, 64), dtype=np.uint32), np.empty(0, dtype=np.float32))
    assert empty.shape == (0, 64) and empty.dtype == np.float32


def test_quantizer_properties_and_rotation_checks(rotation64):
    q = sc.ScalarQuantizer(64, 4, rotation64)
    assert q.bits_per_vector == 64 * 4 + 16
    assert q.rate_bits == 4
    with pytest.raises(InvalidInputError, match=r"\(64, 64\)"):
        sc.ScalarQuantizer(64, 4, rotation64[:32])
    broken = rotation64.copy()
    broken[0, 0] = np.nan
    with pytest.raises(InvalidInputError):
        sc.ScalarQuantizer(64, 4, broken)


def test_scalar_module_imports_numpy_only():
    code = ("import sys, fibquant_cli.core.scalar; "
            "bad = {'scipy', 'typer', 'rich', 'safetensors'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
