"""Special functions the codebook needs, in numpy alone (no scipy at run time).

* ``betainc(a, b, x)``   -- regularized incomplete beta I_x(a, b), Lentz continued fraction.
* ``betaincinv(a, b, q)`` -- its inverse in x: bisection to a bracket, then Newton polish.
* ``ndtri(p)``            -- standard normal quantile: Acklam's rational start, Halley polish.
* ``kronecker_phi(k)``    -- the root > 1 of x^(k+1) = x + 1 (Roberts' generalized golden ratio).

All are vectorized over their array argument and accurate to a few ulp; the tests pin them
against scipy (a test-only dependency) to 1e-12 relative.
"""

from __future__ import annotations

import math

import numpy as np

_FPMIN = 1e-300
_EPS = 1e-16
_MAXIT = 1000


def _betacf(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """Continued fraction of I_x(a, b) (modified Lentz), vectorized over x.

    Converged elements leave the working set, so the cost follows the slowest few elements
    only in their own number, not in the whole array's.
    """
    out = np.empty_like(x)
    active = np.arange(x.size)
    xs = x.ravel()
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    x = xs
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < _FPMIN, _FPMIN, d)
    d = 1.0 / d
    h = d.copy()
    for m in range(1, _MAXIT + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < _FPMIN, _FPMIN, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < _FPMIN, _FPMIN, c)
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < _FPMIN, _FPMIN, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < _FPMIN, _FPMIN, c)
        d = 1.0 / d
        delta = d * c
        h *= delta
        done = np.abs(delta - 1.0) < _EPS
        if done.any():
            out.ravel()[active[done]] = h[done]
            keep = ~done
            active, x, c, d, h = active[keep], x[keep], c[keep], d[keep], h[keep]
            if active.size == 0:
                break
    out.ravel()[active] = h
    return out


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def betainc(a: float, b: float, x) -> np.ndarray:
    """Regularized incomplete beta function I_x(a, b) for scalar a, b > 0 and x in [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    lo, hi = x <= 0.0, x >= 1.0
    out[lo], out[hi] = 0.0, 1.0
    mid = ~(lo | hi)
    xm = x[mid]
    with np.errstate(divide="ignore"):
        log_front = a * np.log(xm) + b * np.log1p(-xm) - _log_beta(a, b)
    front = np.exp(log_front)
    direct = xm < (a + 1.0) / (a + b + 2.0)
    res = np.empty_like(xm)
    if np.any(direct):
        res[direct] = front[direct] * _betacf(a, b, xm[direct]) / a
    if np.any(~direct):
        res[~direct] = 1.0 - front[~direct] * _betacf(b, a, 1.0 - xm[~direct]) / b
    out[mid] = res
    return out


def betaincinv(a: float, b: float, q) -> np.ndarray:
    """Inverse of ``betainc`` in x: the x in [0, 1] with I_x(a, b) = q."""
    q = np.asarray(q, dtype=np.float64)
    lo = np.zeros_like(q)
    hi = np.ones_like(q)
    # Bracket to ~6e-5, then Newton (quadratic) reaches full precision. For a < 1 the density
    # is unbounded at 0 and Newton crawls there, so bisect (almost) all the way.
    for _ in range(14 if a >= 1.0 else 60):
        mid = 0.5 * (lo + hi)
        below = betainc(a, b, mid) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    x = 0.5 * (lo + hi)
    lb = _log_beta(a, b)
    for _ in range(6):
        pdf = np.exp((a - 1.0) * np.log(x) + (b - 1.0) * np.log1p(-x) - lb)
        step = (betainc(a, b, x) - q) / pdf
        x = np.clip(x - step, lo, hi)
    return x


# Acklam's coefficients for the normal quantile (relative error < 1.15e-9 before polishing).
_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
      1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
      6.680131188771972e01, -1.328068155288572e01)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
      -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
      3.754408661907416e00)
_P_LOW = 0.02425

_erfc = np.frompyfunc(math.erfc, 1, 1)


def ndtri(p) -> np.ndarray:
    """Standard normal quantile Phi^-1(p) for p in (0, 1)."""
    p = np.atleast_1d(np.asarray(p, dtype=np.float64))
    upper = p > 0.5
    # Polish in the lower half only: 1 - p is exact there (Sterbenz), Phi(x) near 1 is not.
    x = _ndtri_lower(np.where(upper, 1.0 - p, p))
    return np.where(upper, -x, x)


def _ndtri_lower(p: np.ndarray) -> np.ndarray:
    x = np.empty_like(p)
    low, high = p < _P_LOW, p > 1.0 - _P_LOW
    central = ~(low | high)
    if np.any(low):
        t = np.sqrt(-2.0 * np.log(p[low]))
        x[low] = _tail(t)
    if np.any(high):
        t = np.sqrt(-2.0 * np.log1p(-p[high]))
        x[high] = -_tail(t)
    if np.any(central):
        t = p[central] - 0.5
        r = t * t
        num = (((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5]) * t
        den = ((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0
        x[central] = num / den
    for _ in range(2):  # Halley steps on Phi(x) - p, with Phi via erfc for tail accuracy
        cdf = 0.5 * np.asarray(_erfc(-x / math.sqrt(2.0)), dtype=np.float64)
        e = cdf - p
        u = e * math.sqrt(2.0 * math.pi) * np.exp(0.5 * x * x)
        x = x - u / (1.0 + 0.5 * x * u)
    return x


def _tail(t: np.ndarray) -> np.ndarray:
    num = ((((_C[0] * t + _C[1]) * t + _C[2]) * t + _C[3]) * t + _C[4]) * t + _C[5]
    den = (((_D[0] * t + _D[1]) * t + _D[2]) * t + _D[3]) * t + 1.0
    return num / den


def kronecker_phi(k: int) -> float:
    """The unique root > 1 of x**(k+1) = x + 1 (phi_1 = golden ratio, phi_2 = plastic number)."""
    x = 2.0
    for _ in range(100):
        f = x ** (k + 1) - x - 1.0
        step = f / ((k + 1) * x**k - 1.0)
        x -= step
        if abs(step) < 1e-17:
            break
    return x
