"""Nearest-codeword search for large codebooks (N >= 1024): pivots and sorted prefixes
(docs/method.md §9). Exact: a codeword is skipped only when a bound proves it farther."""

from __future__ import annotations

import math

import numpy as np

from fibquant_cli.core.fastsearch import BUDGET_BYTES, CHUNK_BYTES, MatmulSearcher, brute_nearest_f64, rebuild

# About 4 sqrt(N) pivots (measured best for N = 1024 .. 4096), prefixes of 16, 32, ...
# codewords, chunks of blocks as large as the budget allows (bigger groups), the sorted lists
# (M, N) int32 within PIVOT_TABLE_BYTES and the pivot-centred columns kept for reuse within
# PIVOT_COLUMNS_BYTES.
PIVOTS_PER_ROOT = 4.0
PIVOT_MIN_SIZE = 1024  # measured: 1.3x faster than matmul at (4, 1024), 0.6x at (4, 256)
PIVOT_MIN_PREFIX = 16
PIVOT_MIN_ROWS = 4096
PIVOT_BYTES_PER_ROW = 40  # per coordinate (+1) of a block: float64 copies, float32 scores
PIVOT_TABLE_BYTES = 64 * 2**20
PIVOT_COLUMNS_BYTES = 32 * 2**20
PIVOT_SLACK = 1e-6
PIVOT_LLOYD_STEPS = 10

def choose_pivots(codebook: np.ndarray, count: int) -> np.ndarray:
    """Indices of about ``count`` codewords spread like the codebook: Lloyd on the codewords,
    snapped to their nearest codeword. Deterministic; (M,) int64 unique, M <= count."""
    n, k = codebook.shape
    if count >= n:
        return np.arange(n)
    centers = codebook[np.linspace(0, n - 1, count).astype(np.int64)].copy()
    words = codebook.astype(np.float32)
    for _ in range(PIVOT_LLOYD_STEPS):
        owner = MatmulSearcher(centers).nearest(words)
        counts = np.bincount(owner, minlength=count)
        filled = counts > 0
        for j in range(k):
            sums = np.bincount(owner, weights=codebook[:, j], minlength=count)
            centers[filled, j] = sums[filled] / counts[filled]
    return np.unique(brute_nearest_f64(centers, codebook)).astype(np.int64)


class PivotSearcher:
    """Search of a large codebook, pruned without loss by the triangle inequality.

    The pivots are M of the codewords. If g is a block's nearest pivot, at distance r, the
    block's nearest codeword lies in the ball B(y, r) (g itself is a codeword), hence in
    B(g, 2r): among the codewords sorted by distance from g, a prefix. Blocks are grouped by
    pivot and by prefix length (rounded up to 16, 32, ...) and each group is scored by one
    float32 matmul against its prefix, in coordinates centred on the pivot. Near-exact (float32
    scores, ties in prefix order), and more precise than MatmulSearcher on dense codebooks.

    Parameters
    ----------
    codebook : (N, k) float array
    pivots : int, keyword-only; M, default about 4 sqrt(N), capped by PIVOT_TABLE_BYTES.
    """

    method = "pivot"

    def __init__(self, codebook: np.ndarray, *, pivots: int | None = None):
        cb = np.ascontiguousarray(codebook, dtype=np.float64)
        n = cb.shape[0]
        self.codebook = cb
        self._requested_pivots = pivots
        if pivots is None:
            pivots = int(round(PIVOTS_PER_ROOT * math.sqrt(n)))
        pivots = max(1, min(pivots, n, PIVOT_TABLE_BYTES // (4 * n)))
        self.pivot_index = choose_pivots(cb, pivots)
        self.pivots = cb[self.pivot_index]
        self.pivot_search = MatmulSearcher(self.pivots)
        m = len(self.pivot_index)
        sizes = [s for s in (PIVOT_MIN_PREFIX << i for i in range(32)) if s < n] + [n]
        self.sizes = np.array(sizes, dtype=np.int64)
        # edge[j, b]: distance from pivot j of the first codeword beyond prefix b (inf past
        # the end), shrunk by PIVOT_SLACK for the rounding of the matmul form below, so that
        # a codeword on the boundary is never cut off.
        self.order = np.empty((m, n), dtype=np.int32)
        edge = np.full((m, len(sizes)), np.inf)
        inner = self.sizes < n
        sq = np.einsum("nk,nk->n", cb, cb)
        step = max(1, BUDGET_BYTES // (24 * n))
        for a in range(0, m, step):
            g = self.pivots[a:a + step]
            dist = np.sqrt(np.maximum(0.0, np.einsum("mk,mk->m", g, g)[:, None]
                                      - 2.0 * g @ cb.T + sq[None, :]))
            order = np.argsort(dist, axis=1, kind="stable")
            self.order[a:a + step] = order
            edge[a:a + step, inner] = np.take_along_axis(dist, order[:, self.sizes[inner]], 1)
        self.edge = edge * (1.0 - PIVOT_SLACK) - PIVOT_SLACK * math.sqrt(float(sq.max()))
        self._key_dtype = np.uint16 if m * len(sizes) <= 2**16 else np.int64
        self._local: list[np.ndarray | None] = [None] * m
        self._local_bytes = 0

    def __reduce__(self):
        return (rebuild, (PivotSearcher, self.codebook, {"pivots": self._requested_pivots}))

    def _columns(self, j: int, size: int) -> np.ndarray:
        """(k + 1, size) float32 [c - g; -||c - g||^2 / 2] of pivot j's first ``size`` words.

        Scores relative to the pivot have the size of the local distances, not of the norms,
        so float32 keeps ~7 digits of the gaps between nearby codewords. Each pivot keeps its
        longest prefix so far, within PIVOT_COLUMNS_BYTES for all pivots together.
        """
        have = self._local[j]
        if have is not None and have.shape[1] >= size:
            return have[:, :size]
        local = self.codebook[self.order[j, :size]] - self.pivots[j]
        cols = np.empty((local.shape[1] + 1, size), dtype=np.float32)
        cols[:-1] = local.T
        cols[-1] = -0.5 * np.einsum("nk,nk->n", local, local)
        grow = cols.nbytes - (0 if have is None else have.nbytes)
        if self._local_bytes + grow <= PIVOT_COLUMNS_BYTES:
            self._local[j] = cols
            self._local_bytes += grow
        return cols

    def nearest(self, y: np.ndarray) -> np.ndarray:
        """codes (m,) uint32 of y (m, k) float32."""
        y = np.asarray(y)
        codes = np.empty(len(y), dtype=np.uint32)
        rows = max(PIVOT_MIN_ROWS, BUDGET_BYTES // (PIVOT_BYTES_PER_ROW * (y.shape[1] + 1)))
        for start in range(0, len(y), rows):
            block = y[start:start + rows]
            codes[start:start + len(block)] = self._nearest_chunk(block)
        return codes

    def _nearest_chunk(self, y: np.ndarray) -> np.ndarray:
        m, k = y.shape
        pivot = self.pivot_search.nearest(y).astype(np.int64)
        y_sorted = y.astype(np.float64)
        diff = y_sorted - self.pivots[pivot]
        reach = 2.0 * np.sqrt(np.einsum("ij,ij->i", diff, diff))
        # The prefix index: how many edges (non-decreasing, the last inf) lie within reach.
        prefix = np.zeros(m, dtype=np.int64)
        for b in range(len(self.sizes) - 1):
            prefix += self.edge[pivot, b] <= reach
        key = (pivot * len(self.sizes) + prefix).astype(self._key_dtype)
        rows = np.argsort(key, kind="stable")  # a radix sort for 16-bit keys
        key = key[rows]
        cuts = np.flatnonzero(key[1:] != key[:-1]) + 1
        y_sorted = y_sorted[rows]
        y_aug = np.empty((m, k + 1), dtype=np.float32)
        y_aug[:, k] = 1.0
        found = np.empty(m, dtype=np.uint32)
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), m]):
            j, size_index = divmod(int(key[a]), len(self.sizes))
            cand = self.order[j, :self.sizes[size_index]]
            cols = self._columns(j, len(cand))
            y_aug[a:b, :k] = y_sorted[a:b] - self.pivots[j]
            step = max(1, CHUNK_BYTES // (4 * len(cand)))
            for lo in range(a, b, step):
                hi = min(b, lo + step)
                found[lo:hi] = cand[np.argmax(y_aug[lo:hi] @ cols, axis=1)]
        codes = np.empty(m, dtype=np.uint32)
        codes[rows] = found
        return codes


