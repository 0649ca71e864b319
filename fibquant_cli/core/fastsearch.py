"""Fast nearest-codeword search (spec section 1, step 4): the encoder's inner loop.

Glossary
--------
block      one row y (k,) of the (m, k) float32 array handed to a searcher.
code       the index of the nearest codeword of a block: squared L2, ties -> lowest index.
exact      a searcher is exact when its codes equal those of ``codebook.nearest_bruteforce``
           (float64 distances ||y - c||^2, first minimum) for every block; the only
           disagreements left are distances equal to within float64 rounding (~1e-16).
score      <y, c> - ||c||^2 / 2; the nearest codeword has the largest score.

Methods (``make_searcher`` picks one from (N, k))
-------------------------------------------------
MatmulSearcher  any k, exact. Scores of a cache-sized chunk of blocks in one float32 matmul
                against the codebook augmented with a -||c||^2/2 row, then argmax. A block
                whose best two scores are closer than the rounding bound of the float32
                scores is re-checked in float64, so float32 never changes a code.
GridSearcher    k = 2, exact. A G x G grid over a square holding the codebook: a cell whose
                four corners share their nearest codeword lies inside that codeword's
                (convex) Voronoi cell, so its blocks are coded by one table lookup; the other
                cells keep the few codewords that can be nearest somewhere in them and are
                searched exhaustively among those. Blocks outside the square go to a
                MatmulSearcher.
"""

from __future__ import annotations

import math

import numpy as np

# Blocks per chunk: the (rows, N) float32 scores of a 256-codeword codebook (4 MiB at 4096
# rows) stay in the L2 cache between the matmul and the argmax.
CHUNK_BYTES = 4 * 2**20
MIN_CHUNK_ROWS = 256
# Largest temporary of a float64 re-check or of a build step, in bytes.
BUDGET_BYTES = 32 * 2**20
UNIT_ROUNDOFF_F32 = 2.0**-24
# Safety factor on the float32 rounding bound of the scores (the bound itself is rigorous).
ROUNDING_SAFETY = 4.0

# Grid geometry (k = 2): cells per side, and the square's half-width relative to the largest
# codeword norm. Outside the codebook the Voronoi cells are wide, so extending the square costs
# little, while every block left outside pays for the matmul fallback.
GRID_SIDE = 1024
COARSE_SIDE = 32
GRID_REACH = 1.5
GRID_ROWS = 65536


def brute_nearest_f64(y: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Exact codes by full float64 distances, as ``nearest_bruteforce``, with bounded memory.

    y (m, k) float, codebook (N, k) float64; returns codes (m,) uint32.
    """
    m, k = y.shape
    n = codebook.shape[0]
    rows = max(1, BUDGET_BYTES // (16 * n * k))
    codes = np.empty(m, dtype=np.uint32)
    for start in range(0, m, rows):
        diff = y[start:start + rows, None, :].astype(np.float64) - codebook[None, :, :]
        codes[start:start + rows] = np.argmin(np.einsum("mnk,mnk->mn", diff, diff), axis=1)
    return codes


class MatmulSearcher:
    """Exact search of any codebook: float32 scores by matmul, float64 re-check of near ties.

    Parameters
    ----------
    codebook : (N, k) float array
    """

    method = "matmul"
    exact = True

    def __init__(self, codebook: np.ndarray):
        cb = np.ascontiguousarray(codebook, dtype=np.float64)
        n, k = cb.shape
        self.codebook = cb
        half_sq = 0.5 * np.einsum("ij,ij->i", cb, cb)
        # scores = [y, 1] @ aug: one matmul, no separate pass to subtract ||c||^2/2.
        self._aug = np.vstack([cb.T, -half_sq[None, :]]).astype(np.float32)
        self._rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * n))
        # |fl32(score) - score| <= gamma_{k+1} (|y||c| + ||c||^2/2) + u (|y||c| + ||c||^2/2)
        # (rounding of the products' sum, then of c and ||c||^2/2 to float32); two scores
        # closer than twice that may be out of order.
        c_max = float(np.sqrt(2.0 * half_sq.max())) if n else 0.0
        u = UNIT_ROUNDOFF_F32
        gamma = (k + 1) * u / (1.0 - (k + 1) * u)
        self._tol_slope = 2.0 * ROUNDING_SAFETY * (gamma + 2 * u) * c_max
        self._tol_offset = 2.0 * ROUNDING_SAFETY * (gamma + 2 * u) * c_max * c_max / 2.0

    def nearest(self, y: np.ndarray) -> np.ndarray:
        """codes (m,) uint32 of y (m, k) float32."""
        y = np.asarray(y)
        m, k = y.shape
        codes = np.empty(m, dtype=np.uint32)
        rows = min(self._rows, max(m, 1))
        y_aug = np.empty((rows, k + 1), dtype=np.float32)
        y_aug[:, k] = 1.0
        scores = np.empty((rows, self._aug.shape[1]), dtype=np.float32)
        for start in range(0, m, rows):
            stop = min(m, start + rows)
            r = stop - start
            block = y[start:stop]
            y_aug[:r, :k] = block
            sc = np.matmul(y_aug[:r], self._aug, out=scores[:r])
            best = np.argmax(sc, axis=1)
            idx = np.arange(r)
            top = sc[idx, best]
            sc[idx, best] = -np.inf
            runner_up = np.max(sc, axis=1)
            # One bound per chunk: sqrt(k) max|y_i| >= ||y|| for every block of the chunk.
            y_bound = math.sqrt(k) * float(np.max(np.abs(block))) if r else 0.0
            close = np.flatnonzero(top - runner_up <= self._tol_slope * y_bound + self._tol_offset)
            codes[start:stop] = best
            if close.size:
                codes[start + close] = brute_nearest_f64(block[close], self.codebook)
        return codes
