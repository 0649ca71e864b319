"""Codebook formulas (spec section 3), the sampler, the search and Lloyd-Max."""

import math

import numpy as np
import pytest
import scipy.special as sp

from fibquant_cli.core import codebook as cbm
from fibquant_cli.core.params import Profile
from fibquant_cli.core.source import sample_canonical


@pytest.mark.parametrize("d,k,beta", [(64, 2, 16.0), (64, 4, 20 + 1 / 3), (128, 2, 32.0)])
def test_radial_beta_spot_values(d, k, beta):
    assert cbm.radial_beta(d, k) == pytest.approx(beta, rel=1e-15)


@pytest.mark.parametrize("d", [16, 64, 128])
def test_k2_closed_form_equals_beta_path(d):
    np.testing.assert_allclose(cbm.radii_k2(d, 256), cbm.radii(d, 2, 256), rtol=1e-12)


@pytest.mark.parametrize("d,k,n", [(64, 4, 256), (64, 8, 16), (128, 3, 64)])
def test_radii_are_beta_quantiles(d, k, n):
    q = (np.arange(n) + 0.5) / n
    expected = np.sqrt(sp.betaincinv(k / 2, cbm.radial_beta(d, k), q))
    np.testing.assert_allclose(cbm.radii(d, k, n), expected, rtol=1e-11)


def test_golden_spiral_directions():
    u = cbm.directions(2, 5)
    theta = 2 * math.pi * np.arange(5) * (1 - 2 / (1 + math.sqrt(5)))
    np.testing.assert_allclose(u, np.stack([np.cos(theta), np.sin(theta)], 1), atol=1e-15)


def test_fibonacci_sphere_directions():
    n = 7
    u = cbm.directions(3, n)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-15)
    z = 1 - (2 * (np.arange(n) + 1) - 1) / n
    np.testing.assert_allclose(u[:, 2], z, atol=1e-15)


def test_roberts_kronecker_points_and_directions():
    k, n = 4, 9
    phi = 1.1673039782614187
    xi = cbm.kronecker_points(k, n)
    for i in range(n):
        for j in range(1, k + 1):
            expected = ((i + 0.5) * phi**-j) % 1.0
            assert xi[i, j - 1] == pytest.approx(min(max(expected, 1e-12), 1 - 1e-12), abs=1e-14)
    z = sp.ndtri(xi)
    np.testing.assert_allclose(cbm.directions(k, n), z / np.linalg.norm(z, axis=1, keepdims=True),
                               atol=1e-13)


def test_initial_codebook_is_radius_times_direction():
    cb = cbm.initial_codebook(64, 4, 32)
    np.testing.assert_allclose(np.linalg.norm(cb, axis=1), cbm.radii(64, 4, 32), rtol=1e-14)


@pytest.mark.parametrize("d,k", [(64, 2), (64, 8), (128, 4)])
def test_sampler_moments(d, k):
    x = sample_canonical(d, k, 400_000, np.random.default_rng(3))
    # E||X||^2 = k/d; each coordinate has variance 1/d (standard errors ~0.2% here).
    assert np.mean((x**2).sum(1)) == pytest.approx(k / d, rel=0.01)
    np.testing.assert_allclose(x.var(axis=0), 1 / d, rtol=0.02)
    assert np.abs(x.mean(axis=0)).max() < 5 * math.sqrt(1 / d / 400_000)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chunked_search_equals_bruteforce(dtype):
    rng = np.random.default_rng(0)
    cb = cbm.initial_codebook(64, 4, 256)
    y = sample_canonical(64, 4, 3000, rng)
    fast = cbm.nearest(y.astype(dtype), cb, budget_bytes=4096)  # forces many chunks
    ref = cbm.nearest_bruteforce(y, cb)
    if dtype is np.float64:
        np.testing.assert_array_equal(fast, ref)
    else:  # float32 may flip a near-tie; the chosen codeword must then be as close
        dist = lambda c: ((y - cb[c]) ** 2).sum(1)  # noqa: E731
        assert np.mean(fast == ref) > 0.999
        np.testing.assert_allclose(dist(fast), dist(ref), atol=1e-6)


def test_search_ties_go_to_lowest_index():
    cb = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    assert cbm.nearest(np.array([[0.0, 0.0], [2.0, 0.0]]), cb).tolist() == [0, 0]


def test_distance_output_is_squared_error():
    rng = np.random.default_rng(1)
    cb = rng.standard_normal((50, 3))
    y = rng.standard_normal((200, 3))
    codes, dist = cbm.nearest(y, cb, want_distance=True)
    np.testing.assert_allclose(dist, ((y - cb[codes]) ** 2).sum(1), atol=1e-12)


def test_lloyd_step_moves_to_centroids_and_fills_empty_cells():
    rng = np.random.default_rng(2)
    samples = rng.standard_normal((2000, 2))
    cb = np.array([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]])  # the last cell stays empty
    new, _ = cbm.lloyd_step(samples, cb)
    codes = cbm.nearest_bruteforce(samples, cb)
    for j in (0, 1):
        np.testing.assert_allclose(new[j], samples[codes == j].mean(0), atol=1e-12)
    assert np.any(np.all(np.isclose(samples, new[2]), axis=1)), "empty cell seeded by a sample"


def test_training_is_deterministic_and_beats_initial_on_fresh_samples():
    profile = Profile(16, 2, 16, seed=5, restarts=2, iterations=10)
    a, b = cbm.train_codebook(profile), cbm.train_codebook(profile)
    assert a.tobytes() == b.tobytes()
    fresh = sample_canonical(16, 2, 50_000, np.random.default_rng(123))
    init = cbm.initial_codebook(16, 2, 16)
    assert cbm.distortion(fresh, a) < cbm.distortion(fresh, init)


def test_training_never_worse_than_initial(monkeypatch):
    # A Lloyd step that makes things worse must not be kept.
    monkeypatch.setattr(cbm, "lloyd_step", lambda s, c: (c * 3.0, 0.0))
    profile = Profile(16, 2, 8, restarts=2, iterations=2)
    np.testing.assert_array_equal(cbm.train_codebook(profile), cbm.initial_codebook(16, 2, 8))


def test_d_unit_of_trained_codebook_small_point():
    # (d, k, N) = (16, 2, 4): each block is coded at 1 bit/coordinate; D_unit must beat the
    # 1-bit scalar bound 1 - 2/pi-ish regime and stay below 1 (the zero codebook's distortion).
    profile = Profile(16, 2, 4, restarts=1, iterations=10)
    cb = cbm.train_codebook(profile)
    value = cbm.d_unit(cb, 16, 20_000, np.random.default_rng(9))
    zero = cbm.d_unit(np.zeros((1, 2)), 16, 2_000, np.random.default_rng(9))
    assert zero == pytest.approx(1.0)
    assert 0.2 < value < 0.45


def test_large_codebooks_train_with_the_fast_search(monkeypatch):
    """assign() switches to the pruned search at FAST_ASSIGN_MIN_SIZE and agrees with brute force."""
    rng = np.random.default_rng(7)
    cb = cbm.initial_codebook(64, 4, 2048)
    y = sample_canonical(64, 4, 4000, rng)
    codes, dist = cbm.assign(y, cb)
    ref = cbm.nearest_bruteforce(y, cb)
    assert np.mean(codes == ref) > 0.999
    np.testing.assert_allclose(dist, ((y - cb[codes]) ** 2).sum(1), rtol=1e-12)
    # Below the threshold the brute-force assignment (and its exact codes) is kept.
    small = cb[:1024]
    np.testing.assert_array_equal(cbm.assign(y, small)[0], cbm.nearest_bruteforce(y, small))
