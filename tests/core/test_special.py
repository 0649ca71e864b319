"""Special functions against scipy (test-only dependency), to machine precision."""

import numpy as np
import pytest
import scipy.special as sp

from fibquant_cli.core.special import betainc, betaincinv, kronecker_phi, ndtri


@pytest.mark.parametrize("a,b", [(1.0, 16.0), (2.0, 61 / 3), (4.0, 22.0), (16.0, 40.0), (0.5, 3.0)])
def test_betainc_and_inverse_match_scipy(a, b):
    x = np.linspace(0.0, 1.0, 2001)
    np.testing.assert_allclose(betainc(a, b, x), sp.betainc(a, b, x), rtol=1e-12, atol=1e-300)
    q = (np.arange(4096) + 0.5) / 4096
    np.testing.assert_allclose(betaincinv(a, b, q), sp.betaincinv(a, b, q), rtol=1e-11)


def test_ndtri_matches_scipy_including_tails():
    p = np.concatenate([(np.arange(8192) + 0.5) / 8192, [1e-12, 1 - 1e-12, 1e-300, 0.3]])
    np.testing.assert_allclose(ndtri(p), sp.ndtri(p), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k,expected", [(1, (1 + 5**0.5) / 2), (2, 1.324718), (4, 1.167304)])
def test_kronecker_phi(k, expected):
    phi = kronecker_phi(k)
    assert phi > 1
    assert abs(phi ** (k + 1) - phi - 1) < 1e-14
    assert phi == pytest.approx(expected, abs=5e-7)
