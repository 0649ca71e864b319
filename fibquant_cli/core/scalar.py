"""The scalar baseline (docs/method.md §4): TurboQuant's MSE quantizer, one Lloyd-Max table per
coordinate.

Glossary
--------
marginal     the law of one coordinate X of a uniform point on S^(d-1): density
             f(x) = c (1 - x^2)^((d-3)/2) on [-1, 1], c = 1 / B(1/2, (d-1)/2);
             X^2 ~ Beta(1/2, (d-1)/2).
level        one of the L = 2**bits reconstruction values; ``levels (L,) float64``, increasing.
threshold    a cell boundary; ``thresholds (L-1,) float64``, the midpoints of adjacent levels.
code         the index of the cell holding a rotated coordinate (ties -> lowest index).
distortion   D_unit = E||u - u_hat||^2 over unit vectors u; equals d * E[(X - Q(X))^2].

The table is the Lloyd-Max fixed point (thresholds = midpoints of levels, levels = conditional
means of their cells). Cell integrals are exact, with no grid or sampling: the mass and second
moment are incomplete beta functions, the first moment is elementary, and the distortion of the
inner cells is a Gauss-Legendre rule on a smooth integrand (see ``_half_squared_error``).
The fixed point is found by Newton's method on the Lloyd map, whose Jacobian is tridiagonal in
closed form; plain Lloyd contracts by only 1 - O(1/L^2) per step, i.e. tens of thousands of
steps at 8 bits. A Newton step that would break the ordering falls back to a Lloyd step.
"""

from __future__ import annotations

import math
from functools import cache
from numbers import Integral

import numpy as np

from fibquant_cli.core.params import MAX_HEAD_DIM
from fibquant_cli.core.special import betainc, betaincinv
from fibquant_cli.errors import InvalidInputError, ProfileError, ResourceError

MIN_HEAD_DIM = 2  # d = 2 is the arcsine law; still a valid (log-convex) marginal
MAX_BITS = 8
NORM_BITS = 16
# Largest float64 temporary of encode/decode, in bytes (a few (rows, d) arrays per chunk).
CODEC_BUDGET_BYTES = 32 * 2**20
TEMPORARIES_PER_ROW = 3
TABLE_TOL = 1e-13
TABLE_NOISE_TOL = 1e-11
TABLE_STALL_STEPS = 3
TABLE_MAX_STEPS = 100
GAUSS_NODES = 24
_F32_MAX = float(np.finfo(np.float32).max)


# --- the marginal, on the half-line [t, 1] ------------------------------------------------------
def _shape(d: int) -> float:
    """b = (d - 1)/2, the second Beta shape of X^2."""
    return (d - 1) / 2.0


def _log_norm_const(d: int) -> float:
    """log c = -log B(1/2, b)."""
    b = _shape(d)
    return math.lgamma(0.5 + b) - math.lgamma(0.5) - math.lgamma(b)


def _one_minus_sq(t: np.ndarray) -> np.ndarray:
    # (1 - t)(1 + t) keeps full relative precision as t -> 1, where the tail cells of small d live.
    return (1.0 - t) * (1.0 + t)


def _log_one_minus_sq(t: np.ndarray) -> np.ndarray:
    """log(1 - t^2) to a few ulp absolute, for t in [0, 1]: it is multiplied by b ~ d/2."""
    t = np.asarray(t, dtype=np.float64)
    near_one = t > 0.5
    with np.errstate(divide="ignore"):
        return np.where(near_one, np.log(_one_minus_sq(t)), np.log1p(-t * t))


def _beta_sf(a: float, b: float, t: np.ndarray) -> np.ndarray:
    """P(W > t^2) for W ~ Beta(a, b), accurate for every t in [0, 1].

    Each half goes through the direct continued fraction of ``betainc`` with an argument that
    carries no rounding: t^2 itself below the switch point, (1 - t)(1 + t) above it. (Passing
    1 - t^2 everywhere would let betainc form 1 - (1 - t^2), losing t^2 to cancellation near 0.)
    """
    s = t * t
    low = s < (a + 1.0) / (a + b + 2.0)
    out = np.empty_like(s)
    out[low] = 1.0 - betainc(a, b, s[low])
    out[~low] = betainc(b, a, _one_minus_sq(t[~low]))
    return out


def _mass_above(d: int, t: np.ndarray) -> np.ndarray:
    """P(X > t) = P(X^2 > t^2) / 2 for t in [0, 1]."""
    return 0.5 * _beta_sf(0.5, _shape(d), t)


def _moment1_above(d: int, t: np.ndarray) -> np.ndarray:
    """E[X; X > t] = c (1 - t^2)^b / (d - 1)."""
    return np.exp(_log_norm_const(d) + _shape(d) * _log_one_minus_sq(t)) / (d - 1)


def _moment2_above(d: int, t: np.ndarray) -> np.ndarray:
    """E[X^2; X > t] = P(W' > t^2) / (2d), W' ~ Beta(3/2, b), since B(3/2, b) / B(1/2, b) = 1/d."""
    return _beta_sf(1.5, _shape(d), t) / (2.0 * d)


def _density(d: int, t: np.ndarray) -> np.ndarray:
    """f(t) = c (1 - t^2)^(b - 1), for |t| < 1."""
    return np.exp(_log_norm_const(d) + (_shape(d) - 1.0) * _log_one_minus_sq(t))


def _half_edges(half_levels: np.ndarray) -> np.ndarray:
    """Cell edges of the positive half: [0, midpoints..., 1]."""
    mids = 0.5 * (half_levels[:-1] + half_levels[1:])
    return np.concatenate(([0.0], mids, [1.0]))


def _cell_moments(d: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mass P_j and first moment M1_j of each cell [edges[j], edges[j+1]] of the half-line."""
    mass = _mass_above(d, edges)
    m1 = _moment1_above(d, edges)
    return mass[:-1] - mass[1:], m1[:-1] - m1[1:]


# --- the Lloyd-Max table -------------------------------------------------------------------
def _companded_start(d: int, half: int) -> np.ndarray:
    """Positive levels at the quantiles of f^(1/3), the high-rate optimal point density.

    f^(1/3) is again a marginal of this family, with b' = (b + 2)/3; its |X|^2 ~ Beta(1/2, b').
    """
    shape = (_shape(d) + 2.0) / 3.0
    q = (np.arange(half) + 0.5) / half
    return np.sqrt(betaincinv(0.5, shape, q))


def _solve_tridiagonal(lower: np.ndarray, diag: np.ndarray, upper: np.ndarray,
                       rhs: np.ndarray) -> np.ndarray:
    """Thomas algorithm, no pivoting: for log-concave f (d >= 3) the Lloyd map contracts, so its
    Jacobian I - dm/dl is diagonally dominant (d = 2 converges as well, tested).

    (A dense ``np.linalg.solve`` costs ~0.2 s at L = 256 through threaded BLAS; this is ~1 ms.)
    """
    n = diag.size
    c = np.empty(n)
    r = np.empty(n)
    c[0], r[0] = (upper[0] / diag[0] if n > 1 else 0.0), rhs[0] / diag[0]
    for i in range(1, n):
        denom = diag[i] - lower[i - 1] * c[i - 1]
        c[i] = upper[i] / denom if i < n - 1 else 0.0
        r[i] = (rhs[i] - lower[i - 1] * r[i - 1]) / denom
    for i in range(n - 2, -1, -1):
        r[i] -= c[i] * r[i + 1]
    return r


def _newton_step(d: int, levels: np.ndarray, edges: np.ndarray, mass: np.ndarray,
                 centroids: np.ndarray) -> np.ndarray:
    """One Newton step on G(l) = l - centroid(midpoints(l)) over the positive half.

    d m_j / d (upper edge t) = f(t)(t - m_j)/P_j and d m_j / d (lower edge t) = f(t)(m_j - t)/P_j;
    each inner edge is the mean of its two levels, hence the factors 1/2.
    """
    inner = edges[1:-1]
    f = _density(d, inner)
    upper = 0.5 * f * (inner - centroids[:-1]) / mass[:-1]  # d m_j / d l_{j+1}
    lower = 0.5 * f * (centroids[1:] - inner) / mass[1:]    # d m_{j+1} / d l_j
    diag = np.ones(levels.size)
    diag[:-1] -= upper
    diag[1:] -= lower
    return levels - _solve_tridiagonal(-lower, diag, -upper, levels - centroids)


def _is_ordered(levels: np.ndarray) -> bool:
    return bool(levels[0] > 0.0 and levels[-1] < 1.0 and np.all(np.diff(levels) > 0.0))


def _half_table(d: int, half: int) -> np.ndarray:
    """The positive levels of the symmetric Lloyd-Max table with 2 * half levels.

    Stops when a Lloyd step would move no level by TABLE_TOL or more. (The size of a Newton step
    is no stopping rule: near the fixed point it is rounding noise in the centroids amplified by
    the condition number of the Jacobian, O(L^2).) For d >~ 1000 at 7-8 bits the rounding noise
    of the centroids themselves (betainc's b * eps) sits just above TABLE_TOL; once the residual
    stops falling the best iterate is kept if it is below TABLE_NOISE_TOL.
    """
    levels = _companded_start(d, half)
    best, best_residual, stalled = levels, math.inf, 0
    for _ in range(TABLE_MAX_STEPS):
        edges = _half_edges(levels)
        mass, m1 = _cell_moments(d, edges)
        centroids = m1 / mass
        residual = float(np.max(np.abs(centroids - levels)))
        if residual < TABLE_TOL:
            return levels
        if residual < best_residual:
            best, best_residual, stalled = levels, residual, 0
        else:
            stalled += 1
            if stalled >= TABLE_STALL_STEPS and best_residual < TABLE_NOISE_TOL:
                return best
        new = _newton_step(d, levels, edges, mass, centroids)
        levels = new if _is_ordered(new) else centroids
    raise RuntimeError(f"Lloyd-Max table for d={d}, L={2 * half} did not converge "
                       f"(smallest Lloyd change {best_residual:.3g})")


def _check_table_args(d, bits) -> tuple[int, int]:
    for name, value in (("head_dim", d), ("bits", bits)):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise ProfileError(f"{name} must be an integer, got {value!r}")
    d, bits = int(d), int(bits)
    if d > MAX_HEAD_DIM:
        raise ResourceError(f"head_dim {d} exceeds the limit {MAX_HEAD_DIM}")
    if d < MIN_HEAD_DIM:
        raise ProfileError(f"head_dim must be >= {MIN_HEAD_DIM}, got {d}")
    if not 1 <= bits <= MAX_BITS:
        raise ProfileError(f"bits must satisfy 1 <= bits <= {MAX_BITS}, got {bits}")
    return d, bits


@cache
def _table(d: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    pos = _half_table(d, 2 ** (bits - 1))
    levels = np.concatenate((-pos[::-1], pos))
    mids = 0.5 * (pos[:-1] + pos[1:])
    thresholds = np.concatenate((-mids[::-1], [0.0], mids))
    levels.setflags(write=False)
    thresholds.setflags(write=False)
    return levels, thresholds


def lloyd_max_table(d: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The optimal 1-D quantizer of one coordinate of a uniform point on S^(d-1).

    Parameters
    ----------
    d : int
        Head dimension, 2 <= d <= 8192.
    bits : int
        Bits per coordinate, 1..8; the table has L = 2**bits levels.

    Returns
    -------
    levels : (L,) float64, increasing, levels[i] == -levels[L-1-i] exactly.
    thresholds : (L-1,) float64, thresholds[i] == (levels[i] + levels[i+1]) / 2.

    Both arrays are cached per (d, bits) and read-only.

    Examples
    --------
    >>> levels, thresholds = lloyd_max_table(64, 2)
    >>> levels.shape, thresholds.shape
    ((4,), (3,))
    """
    return _table(*_check_table_args(d, bits))


def _half_squared_error(d: int, levels: np.ndarray) -> float:
    """E[(X - Q(X))^2; X > 0] for the positive levels of a symmetric table.

    Inner cells: Gauss-Legendre on (x - l)^2 f(x) itself. The moment form M2 - 2 l M1 + l^2 P
    would cancel about log10(E X^2 / MSE) digits (4-5 at 8 bits), exposing the ~1e-12 relative
    disagreement between the normalizations inside betainc; inner cells span at most a few
    standard deviations 1/sqrt(d) of a smooth integrand, where 24 nodes are exact to rounding.
    The tail cell [t, 1] uses the moment form, which there cancels only ~2 digits.
    """
    edges = _half_edges(levels)
    nodes, weights = np.polynomial.legendre.leggauss(GAUSS_NODES)
    lo, hi = edges[:-2, None], edges[1:-1, None]
    x = 0.5 * (lo + hi) + 0.5 * (hi - lo) * nodes
    inner = 0.5 * (hi - lo)[:, 0] * (((x - levels[:-1, None]) ** 2 * _density(d, x)) @ weights)
    t, top = edges[-2:-1], levels[-1]
    tail = (_moment2_above(d, t) - 2.0 * top * _moment1_above(d, t)
            + top * top * _mass_above(d, t))[0]
    return float(np.sum(inner) + tail)


def scalar_d_unit_theory(d: int, bits: int) -> float:
    """D_unit = d * E[(X - Q(X))^2] of ``lloyd_max_table(d, bits)``, from exact cell integrals."""
    d, bits = _check_table_args(d, bits)
    levels, _ = _table(d, bits)
    return 2.0 * d * _half_squared_error(d, levels[levels.size // 2:])


# --- the codec ---------------------------------------------------------------------------
class ScalarQuantizer:
    """Norm + rotation + one Lloyd-Max code per coordinate (TurboQuant's MSE quantizer).

    Parameters
    ----------
    head_dim : int
        d, the length of each vector.
    bits : int
        Bits per coordinate, 1..8.
    rotation : (d, d) float array
        The shared orthogonal matrix Pi; y = Pi u on encode, x_hat = nu Pi^T y_hat on decode.

    Examples
    --------
    >>> from fibquant_cli.core.rotation import haar_rotation
    >>> rng = np.random.default_rng(0)
    >>> q = ScalarQuantizer(64, 2, haar_rotation(64, rng))
    >>> codes, norms = q.encode(rng.standard_normal((10, 64)))
    >>> q.decode(codes, norms).shape
    (10, 64)
    """

    def __init__(self, head_dim: int, bits: int, rotation: np.ndarray):
        d, bits = _check_table_args(head_dim, bits)
        rotation = np.asarray(rotation)
        if rotation.shape != (d, d):
            raise InvalidInputError(f"rotation must have shape ({d}, {d}), got {rotation.shape}")
        if not np.can_cast(rotation.dtype, np.float64, casting="safe"):
            raise InvalidInputError(f"rotation must be a real array, got dtype {rotation.dtype}")
        rotation = np.ascontiguousarray(rotation, dtype=np.float64)
        if not np.all(np.isfinite(rotation)):
            raise InvalidInputError("rotation is not finite")
        self.head_dim = d
        self.bits = bits
        self.rotation = rotation
        self.levels, self.thresholds = _table(d, bits)

    @property
    def rate_bits(self) -> int:
        """b, bits per coordinate."""
        return self.bits

    @property
    def bits_per_vector(self) -> int:
        """d codes of b bits plus a 16-bit norm."""
        return self.head_dim * self.bits + NORM_BITS

    def _rows_per_chunk(self, budget_bytes: int) -> int:
        return max(1, budget_bytes // (TEMPORARIES_PER_ROW * 8 * self.head_dim))

    def encode(self, x: np.ndarray, *, budget_bytes: int = CODEC_BUDGET_BYTES
               ) -> tuple[np.ndarray, np.ndarray]:
        """Quantize each row of x.

        Parameters
        ----------
        x : (n, d) real array (any float dtype, bfloat16 included)

        Returns
        -------
        codes : (n, d) uint32, cell index of each rotated coordinate, in [0, 2**bits).
        norms : (n,) float32, ||x||_2 of each row (0 for a zero row).
        """
        x = np.asarray(x)
        d = self.head_dim
        if x.ndim != 2 or x.shape[1] != d:
            raise InvalidInputError(f"x must have shape (n, {d}), got {x.shape}")
        if not np.can_cast(x.dtype, np.float64, casting="safe"):
            raise InvalidInputError(f"x must be a real array, got dtype {x.dtype}")
        n = x.shape[0]
        codes = np.empty((n, d), dtype=np.uint32)
        norms = np.empty(n, dtype=np.float32)
        rows = self._rows_per_chunk(budget_bytes)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            chunk = x[start:stop].astype(np.float64)
            nu = self._checked_norms(chunk, start)
            safe = np.where(nu > 0.0, nu, 1.0)
            y = np.divide(chunk, safe[:, None], out=chunk) @ self.rotation.T
            codes[start:stop] = np.searchsorted(self.thresholds, y, side="left")
            norms[start:stop] = nu
        return codes, norms

    @staticmethod
    def _checked_norms(chunk: np.ndarray, offset: int) -> np.ndarray:
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            raise InvalidInputError(f"row {offset + int(np.argmin(finite))} is not finite")
        nu = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
        too_big = ~(nu <= _F32_MAX)
        if too_big.any():
            row = int(np.argmax(too_big))
            raise InvalidInputError(
                f"row {offset + row}: norm {nu[row]:.3g} exceeds the float32 range")
        return nu

    def decode(self, codes: np.ndarray, norms: np.ndarray, *,
               budget_bytes: int = CODEC_BUDGET_BYTES) -> np.ndarray:
        """Reconstruct x_hat = nu * (levels[codes] @ rotation) row by row.

        Parameters
        ----------
        codes : (n, d) integer array with values in [0, 2**bits)
        norms : (n,) real array, finite and >= 0

        Returns
        -------
        x_hat : (n, d) float32; rows with norm 0 are exact (positive) zeros.
        """
        codes = np.asarray(codes)
        norms = np.asarray(norms)
        d, size = self.head_dim, self.levels.size
        if codes.ndim != 2 or codes.shape[1] != d:
            raise InvalidInputError(f"codes must have shape (n, {d}), got {codes.shape}")
        if codes.dtype.kind not in "iu":
            raise InvalidInputError(f"codes must be integers, got dtype {codes.dtype}")
        n = codes.shape[0]
        if norms.shape != (n,):
            raise InvalidInputError(f"norms must have shape ({n},), got {norms.shape}")
        if not np.can_cast(norms.dtype, np.float64, casting="safe"):
            raise InvalidInputError(f"norms must be a real array, got dtype {norms.dtype}")
        if n and (int(codes.min()) < 0 or int(codes.max()) >= size):
            raise InvalidInputError(
                f"codes must lie in [0, {size}), found [{int(codes.min())}, {int(codes.max())}]")
        nu = norms.astype(np.float64)
        bad = ~(np.isfinite(nu) & (nu >= 0.0))
        if bad.any():
            row = int(np.argmax(bad))
            raise InvalidInputError(f"norm of row {row} must be finite and >= 0, got {nu[row]}")
        out = np.empty((n, d), dtype=np.float32)
        rows = self._rows_per_chunk(budget_bytes)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            x_hat = self.levels[codes[start:stop]] @ self.rotation
            x_hat *= nu[start:stop, None]
            # + 0.0 turns the -0.0 of a zero row times a negative value into +0.0.
            x_hat += 0.0
            out[start:stop] = x_hat
        return out
