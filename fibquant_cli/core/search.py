"""Choosing the nearest-codeword searcher for a codebook, and sharing it (docs/method.md §9).

The searchers themselves: ``fastsearch`` (the matmul for any k, the lookup grid for k = 2) and
``pivots`` (large codebooks).
"""

from __future__ import annotations

import hashlib

import numpy as np

from fibquant_cli.core.fastsearch import (
    BUDGET_BYTES,
    F32_SAFE_FRACTION,
    GRID_MAX_SIZE,
    UNIT_ROUNDOFF_F32,
    GridSearcher,
    MatmulSearcher,
    Searcher,
)
from fibquant_cli.core.pivots import PIVOT_MIN_SIZE, PivotSearcher


def make_searcher(codebook: np.ndarray) -> Searcher:
    """The fastest searcher for a codebook (N, k); see the module docstring for the methods.

    Example
    -------
    >>> searcher = make_searcher(codebook)          # once per codebook
    >>> codes = searcher.nearest(y.reshape(-1, k))  # y float32 -> codes (m,) uint32
    """
    cb = np.asarray(codebook)
    if cb.ndim != 2 or cb.shape[0] < 1 or cb.shape[1] < 1:
        raise ValueError(f"expected a (N, k) codebook, got shape {cb.shape}")
    n, k = cb.shape
    if k == 2 and n <= GRID_MAX_SIZE:
        return GridSearcher(cb, lazy=True)
    if n >= PIVOT_MIN_SIZE:
        return PivotSearcher(cb)
    return MatmulSearcher(cb, exact=not float32_is_safe(cb))


def float32_is_safe(codebook: np.ndarray) -> bool:
    """Whether float32 scores of the origin-centred matmul swap codes on < 0.1% of blocks.

    A block at distance t from the bisector of two codewords delta apart has a score gap
    t * delta; with rounding error e ~ (k + 3) u ||c||^2 the gap is unresolved for t < e/delta,
    a fraction about e / delta^2 of the blocks. FibQuant codebooks are 1e-4 or less; a
    codebook with near-duplicate codewords is not, and gets the exact search.
    """
    cb = np.asarray(codebook, dtype=np.float64)
    n, k = cb.shape
    if n < 2:
        return True
    sq = np.einsum("ij,ij->i", cb, cb)
    closest = np.inf
    rows = max(1, BUDGET_BYTES // (8 * n))
    for a in range(0, n, rows):
        d2 = sq[a:a + rows, None] - 2.0 * cb[a:a + rows] @ cb.T + sq[None, :]
        d2[np.arange(len(d2)), np.arange(a, a + len(d2))] = np.inf
        closest = min(closest, float(d2.min()))
    rounding = 2.0 * (k + 3) * UNIT_ROUNDOFF_F32 * 1.5 * float(sq.max())
    return closest > 0 and rounding / closest < F32_SAFE_FRACTION


def searcher_for(quantizer) -> Searcher:
    """The searcher of ``quantizer.codebook``, shared by every quantizer with the same codebook.

    Searchers are kept per process, keyed by the codebook's bytes (a sweep or a batch builds
    many quantizers over a few codebooks, and a grid's table is worth building once), and on the
    quantizer itself so the key is computed once. The quantizer may be a frozen dataclass: the
    searcher is stored with object.__setattr__ beside the codebook it was built from.
    """
    cached = quantizer.__dict__.get("_searcher")
    if cached is None or cached[0] is not quantizer.codebook:
        cb = np.ascontiguousarray(quantizer.codebook, dtype=np.float32)
        key = (cb.shape, hashlib.blake2b(cb.tobytes(), digest_size=16).digest())
        searcher = _SHARED.get(key)
        if searcher is None:
            if len(_SHARED) >= SHARED_SEARCHERS:
                _SHARED.pop(next(iter(_SHARED)))
            searcher = _SHARED[key] = make_searcher(quantizer.codebook)
        cached = (quantizer.codebook, searcher)
        object.__setattr__(quantizer, "_searcher", cached)
    return cached[1]


SHARED_SEARCHERS = 16
_SHARED: dict = {}
