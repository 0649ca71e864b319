"""The scalar baseline (spec section 4): TurboQuant's MSE quantizer, one Lloyd-Max table per
coordinate.

Glossary
--------
marginal     the law of one coordinate X of a uniform point on S^(d-1): density
             f(x) = c (1 - x^2)^((d-3)/2) on [-1, 1], c = 1 / B(1/2, (d-1)/2); X^2 ~ Beta(1/2, (d-1)/2).
level        one of the L = 2**bits reconstruction values; ``levels (L,) float64``, increasing.
threshold    a cell boundary; ``thresholds (L-1,) float64``, the midpoints of adjacent levels.
code         the index of the cell holding a rotated coordinate (ties -> lowest index).
distortion   D_unit = E||u - u_hat||^2 for a unit vector u = d * E[(X - Q(X))^2].

The table is the Lloyd-Max fixed point (thresholds = midpoints of levels, levels = conditional
means of their cells). Every cell integral is exact: mass and second moment are incomplete beta
functions of 1 - t^2, the first moment is elementary, so no grid or sampling enters the table.
The fixed point is found by Newton's method on the Lloyd map, whose Jacobian is tridiagonal in
closed form; plain Lloyd contracts by only 1 - O(1/L^2) per step, i.e. tens of thousands of
steps at 8 bits. A Newton step that would break the ordering falls back to a Lloyd step.
"""

from __future__ import annotations

import math
from functools import lru_cache
from numbers import Integral

import numpy as np

from ..errors import InvalidInputError, ProfileError, ResourceError
from .params import MAX_HEAD_DIM
from .special import betainc, betaincinv

MIN_HEAD_DIM = 2  # d = 2 is the arcsine law; still a valid (log-convex) marginal
MAX_BITS = 8
NORM_BITS = 16
# Largest float64 temporary of encode/decode, in bytes (a few (rows, d) arrays per chunk).
CODEC_BUDGET_BYTES = 32 * 2**20
TEMPORARIES_PER_ROW = 3
TABLE_TOL = 1e-13
TABLE_MAX_STEPS = 200
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
    # (1 - t)(1 + t) keeps full relative precision as t -> 1, where the tail cells live.
    return (1.0 - t) * (1.0 + t)


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
    b = _shape(d)
    s = _one_minus_sq(t)
    with np.errstate(divide="ignore"):
        log_s = np.log(s)
    return np.exp(_log_norm_const(d) + b * log_s) / (d - 1)


def _moment2_above(d: int, t: np.ndarray) -> np.ndarray:
    """E[X^2; X > t] = P(W' > t^2) / (2d), W' ~ Beta(3/2, b), since B(3/2, b) / B(1/2, b) = 1/d."""
    return _beta_sf(1.5, _shape(d), t) / (2.0 * d)


def _density(d: int, t: np.ndarray) -> np.ndarray:
    """f(t) = c (1 - t^2)^(b - 1), for |t| < 1."""
    return np.exp(_log_norm_const(d) + (_shape(d) - 1.0) * np.log(_one_minus_sq(t)))


def _half_edges(half_levels: np.ndarray) -> np.ndarray:
    """Cell edges of the positive half: [0, midpoints..., 1]."""
    mids = 0.5 * (half_levels[:-1] + half_levels[1:])
    return np.concatenate(([0.0], mids, [1.0]))


def _cell_moments(d: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mass, first and second moment of each cell [edges[j], edges[j+1]] of the half-line."""
    mass = _mass_above(d, edges)
    m1 = _moment1_above(d, edges)
    m2 = _moment2_above(d, edges)
    return mass[:-1] - mass[1:], m1[:-1] - m1[1:], m2[:-1] - m2[1:]


# --- the Lloyd-Max table -------------------------------------------------------------------
def _companded_start(d: int, half: int) -> np.ndarray:
    """Positive levels at the quantiles of f^(1/3), the high-rate optimal point density.

    f^(1/3) is again a marginal of this family, with b' = (b + 2)/3; its |X|^2 ~ Beta(1/2, b').
    """
    shape = (_shape(d) + 2.0) / 3.0
    q = (np.arange(half) + 0.5) / half
    return np.sqrt(betaincinv(0.5, shape, q))


def _newton_step(d: int, levels: np.ndarray, edges: np.ndarray, mass: np.ndarray,
                 centroids: np.ndarray) -> np.ndarray:
    """One Newton step on G(l) = l - centroid(midpoints(l)) over the positive half.

    d centroid_j / d upper edge = f(t)(t - m_j)/P_j; d centroid_j / d lower edge = f(t)(m_j - t)/P_j;
    each inner edge is the mean of its two levels, hence the factors 1/2.
    """
    half = levels.size
    jac = np.eye(half)
    if half > 1:
        inner = edges[1:-1]
        f = _density(d, inner)
        upper = 0.5 * f * (inner - centroids[:-1]) / mass[:-1]
        lower = 0.5 * f * (centroids[1:] - inner) / mass[1:]
        j = np.arange(half - 1)
        jac[j, j] -= upper
        jac[j, j + 1] -= upper
        jac[j + 1, j + 1] -= lower
        jac[j + 1, j] -= lower
    return levels - np.linalg.solve(jac, levels - centroids)


def _is_ordered(levels: np.ndarray) -> bool:
    return bool(levels[0] > 0.0 and levels[-1] < 1.0 and np.all(np.diff(levels) > 0.0))


def _half_table(d: int, half: int) -> np.ndarray:
    """The positive levels of the symmetric Lloyd-Max table with 2 * half levels.

    Stops when a Lloyd step would move no level by TABLE_TOL or more. (The size of a Newton step
    is no stopping rule: near the fixed point it is rounding noise in the centroids amplified by
    the condition number of the Jacobian, O(L^2).)
    """
    levels = _companded_start(d, half)
    for _ in range(TABLE_MAX_STEPS):
        edges = _half_edges(levels)
        mass, m1, _ = _cell_moments(d, edges)
        centroids = m1 / mass
        residual = float(np.max(np.abs(centroids - levels)))
        if residual < TABLE_TOL:
            return levels
        new = _newton_step(d, levels, edges, mass, centroids)
        levels = new if _is_ordered(new) else centroids
    raise RuntimeError(f"Lloyd-Max table for d={d}, L={2 * half} did not converge "
                       f"(last Lloyd change {residual:.3g})")


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


@lru_cache(maxsize=None)
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


def scalar_d_unit_theory(d: int, bits: int) -> float:
    """D_unit = d * E[(X - Q(X))^2] of ``lloyd_max_table(d, bits)``, from exact cell integrals."""
    d, bits = _check_table_args(d, bits)
    levels, _ = _table(d, bits)
    pos = levels[levels.size // 2:]
    mass, m1, m2 = _cell_moments(d, _half_edges(pos))
    half_mse = float(np.sum(m2 - 2.0 * pos * m1 + pos * pos * mass))
    return 2.0 * d * half_mse


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
    >>> q = ScalarQuantizer(64, 2, haar_rotation(64, np.random.default_rng(0)))
    >>> codes, norms = q.encode(x)
    >>> x_hat = q.decode(codes, norms)
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
            raise InvalidInputError(f"row {offset + row}: norm {nu[row]:.3g} exceeds the float32 range")
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
