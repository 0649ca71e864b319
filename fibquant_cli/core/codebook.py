"""The radial-angular FibQuant codebook (docs/method.md §3) and its Lloyd-Max refinement.

Glossary
--------
codeword   one point c_n = r_n * u_n of R^k.
codebook   the (N, k) float64 array of codewords, shared by every block of every vector.
code       the index n of a block's nearest codeword (squared L2; ties -> lowest index).
distortion mean squared error E||X - Q(X)||^2 of a block; D_unit = (d/k) * that, per unit vector.
"""

from __future__ import annotations

import math

import numpy as np

from fibquant_cli.core.params import Profile
from fibquant_cli.core.source import sample_canonical
from fibquant_cli.core.special import betaincinv, kronecker_phi, ndtri

GOLDEN = (1.0 + math.sqrt(5.0)) / 2.0
XI_CLAMP = 1e-12
# Largest temporary of the nearest-codeword search, in bytes (scores of one chunk of blocks).
SEARCH_BUDGET_BYTES = 32 * 2**20

# Independent random streams derived from the profile seed (one per purpose), so that e.g.
# changing the number of restarts never changes the rotation.
STREAM_ROTATION, STREAM_TRAINING, STREAM_RESTARTS, STREAM_EVALUATION = 1, 2, 3, 4


def stream(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose])


# --- radii -------------------------------------------------------------------------------
def radial_beta(d: int, k: int) -> float:
    """beta = (k/(k+2)) * (d - k - 2)/2 + 1, the second shape of the companded radius law."""
    return (k / (k + 2.0)) * (d - k - 2.0) / 2.0 + 1.0


def radii(d: int, k: int, n: int) -> np.ndarray:
    """r_n = sqrt(BetaInv(q_n; k/2, beta)), q_n = (n - 1/2)/N, n = 1..N; (N,) float64 ascending."""
    q = (np.arange(n, dtype=np.float64) + 0.5) / n
    return np.sqrt(betaincinv(k / 2.0, radial_beta(d, k), q))


def radii_k2(d: int, n: int) -> np.ndarray:
    """Closed form for k = 2: r_n = sqrt(1 - (1 - q_n)^(4/d))."""
    q = (np.arange(n, dtype=np.float64) + 0.5) / n
    return np.sqrt(-np.expm1((4.0 / d) * np.log1p(-q)))


# --- directions ----------------------------------------------------------------------------
def golden_angles(n: int) -> np.ndarray:
    """theta_n = 2 pi n (1 - 1/phi), n = 0..N-1."""
    return 2.0 * math.pi * np.arange(n, dtype=np.float64) * (1.0 - 1.0 / GOLDEN)


def directions(k: int, n: int) -> np.ndarray:
    """Unit directions u_n (N, k): golden spiral (k=2), Fibonacci sphere (k=3), Roberts-Kronecker."""
    if k == 2:
        theta = golden_angles(n)
        return np.stack([np.cos(theta), np.sin(theta)], axis=1)
    if k == 3:
        theta = golden_angles(n)
        z = 1.0 - (2.0 * (np.arange(n) + 1.0) - 1.0) / n
        s = np.sqrt(1.0 - z * z)
        return np.stack([s * np.cos(theta), s * np.sin(theta), z], axis=1)
    xi = kronecker_points(k, n)
    z = ndtri(xi.ravel()).reshape(xi.shape)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def kronecker_points(k: int, n: int) -> np.ndarray:
    """xi_{n,j} = frac((n + 1/2) phi_k^-j), j = 1..k, clamped to [1e-12, 1 - 1e-12]; (N, k)."""
    alpha = kronecker_phi(k) ** -np.arange(1, k + 1, dtype=np.float64)
    xi = np.mod((np.arange(n, dtype=np.float64)[:, None] + 0.5) * alpha[None, :], 1.0)
    return np.clip(xi, XI_CLAMP, 1.0 - XI_CLAMP)


def initial_codebook(d: int, k: int, n: int) -> np.ndarray:
    """c_n = r_n u_n; (N, k) float64."""
    r = radii_k2(d, n) if k == 2 else radii(d, k, n)
    return r[:, None] * directions(k, n)


# --- nearest codeword ----------------------------------------------------------------------
def nearest(
    y: np.ndarray, codebook: np.ndarray, *, budget_bytes: int = SEARCH_BUDGET_BYTES,
    want_distance: bool = False,
):
    """Index of the nearest codeword of each row of y.

    Minimizes ||c||^2/2 - <y, c> through a matmul, over chunks of rows so that no temporary
    exceeds ``budget_bytes`` whatever the number of rows.

    Parameters
    ----------
    y : (m, k) float array
    codebook : (N, k) float array, same dtype as y is best (it is cast to y's dtype).

    Returns
    -------
    codes : (m,) uint32, and with ``want_distance`` also dist (m,) float64 = ||y - c||^2.
    """
    y = np.asarray(y)
    dtype = y.dtype if y.dtype in (np.float32, np.float64) else np.float64
    y = y.astype(dtype, copy=False)
    cb = np.asarray(codebook, dtype=dtype)
    half_sq = 0.5 * np.einsum("ij,ij->i", cb, cb)
    cbt = np.ascontiguousarray(cb.T)
    m, n = y.shape[0], cb.shape[0]
    rows = max(1, budget_bytes // (n * dtype.itemsize))
    codes = np.empty(m, dtype=np.uint32)
    dist = np.empty(m, dtype=np.float64) if want_distance else None
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        scores = y[start:stop] @ cbt
        np.subtract(half_sq, scores, out=scores)
        best = np.argmin(scores, axis=1)
        codes[start:stop] = best
        if want_distance:
            chunk = y[start:stop].astype(np.float64)
            best_score = np.take_along_axis(scores, best[:, None], axis=1)[:, 0]
            dist[start:stop] = np.maximum(0.0, np.einsum("ij,ij->i", chunk, chunk) + 2.0 * best_score)
    return (codes, dist) if want_distance else codes


def nearest_bruteforce(y: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Reference for tests: full ||y - c||^2 by broadcasting, first minimum wins."""
    diff = y[:, None, :].astype(np.float64) - codebook[None, :, :].astype(np.float64)
    return np.argmin(np.einsum("mnk,mnk->mn", diff, diff), axis=1).astype(np.uint32)


# --- Lloyd-Max -----------------------------------------------------------------------------
def random_orthogonal(k: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((k, k)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


# From this size on, training assigns samples with the fast (pruned) search of
# core/fastsearch.py: brute force over 2^20 samples x 4096 codewords is ~10x slower. Smaller
# codebooks keep the brute-force assignment they were trained and shipped with.
FAST_ASSIGN_MIN_SIZE = 2048


def assign(samples: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes (m,) and squared distances (m,) float64 of samples to their nearest codeword."""
    if codebook.shape[0] < FAST_ASSIGN_MIN_SIZE:
        return nearest(samples, codebook, want_distance=True)
    from fibquant_cli.core.search import make_searcher

    codes = make_searcher(codebook).nearest(samples.astype(np.float32))
    diff = samples - codebook[codes]
    return codes, np.einsum("ij,ij->i", diff, diff)


def distortion(samples: np.ndarray, codebook: np.ndarray) -> float:
    """Mean squared error E||X - Q(X)||^2 of codebook on samples (per block)."""
    _, dist = assign(samples, codebook)
    return float(dist.mean())


def lloyd_step(samples: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, float]:
    """One Lloyd iteration: assign, move codewords to centroids, split cells for empty ones.

    Returns the new codebook and the MSE of the assignment that produced it.
    """
    n, k = codebook.shape
    codes, dist = assign(samples, codebook)
    counts = np.bincount(codes, minlength=n)
    new = codebook.copy()
    filled = counts > 0
    for j in range(k):
        sums = np.bincount(codes, weights=samples[:, j], minlength=n)
        new[filled, j] = sums[filled] / counts[filled]
    empty = np.flatnonzero(~filled)
    if empty.size:
        cell_dist = np.bincount(codes, weights=dist, minlength=n)
        for e in empty:
            # Split the highest-distortion cell: its farthest sample seeds the empty codeword.
            j = int(np.argmax(cell_dist))
            members = np.flatnonzero(codes == j)
            far = members[int(np.argmax(dist[members]))]
            new[e] = samples[far]
            cell_dist[j] = 0.0
    return new, float(dist.mean())


def train_codebook(profile: Profile) -> np.ndarray:
    """Multi-restart Lloyd-Max from the initial codebook; never worse than it on training MSE.

    Restart 0 starts from the initial codebook, restart r > 0 from the initial codebook times a
    random k x k orthogonal matrix; the lowest training MSE wins. Deterministic in the profile.
    """
    d, k, n = profile.head_dim, profile.block_dim, profile.size
    init = initial_codebook(d, k, n)
    samples = sample_canonical(d, k, profile.train_samples, stream(profile.seed, STREAM_TRAINING))
    restart_rng = stream(profile.seed, STREAM_RESTARTS)
    best, best_mse = init, distortion(samples, init)
    for r in range(profile.restarts):
        cb = init if r == 0 else init @ random_orthogonal(k, restart_rng)
        for _ in range(profile.iterations):
            cb, _ = lloyd_step(samples, cb)
        mse = distortion(samples, cb)
        if mse < best_mse:
            best, best_mse = cb, mse
    return np.ascontiguousarray(best)


def d_unit(codebook: np.ndarray, d: int, n_vectors: int, rng: np.random.Generator,
           chunk: int = 8192) -> float:
    """D_unit = E||u - u_hat||^2 over n_vectors fresh uniform unit vectors (docs/method.md §4)."""
    k = codebook.shape[1]
    total = 0.0
    for start in range(0, n_vectors, chunk):
        m = min(chunk, n_vectors - start)
        u = rng.standard_normal((m, d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        _, dist = nearest(u.reshape(-1, k), codebook, want_distance=True)
        total += float(dist.sum())
    return total / n_vectors
