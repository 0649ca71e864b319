"""FibQuant encode / decode over arrays of head vectors (docs/method.md §1).

Glossary
--------
x       (n, d) head vectors, any float dtype.
norm    nu = ||x||_2 per vector, (n,) float32 (the container decides how wide it is stored).
u, y    u = x / nu on the unit sphere; y = Pi u, the rotated vector (rows: y = u @ Pi.T).
block   k consecutive coordinates of y; a vector has d/k of them.
code    (n, d/k) uint32, each the index of a block's nearest codeword.

Decode: y_hat = gathered codewords; x_hat = nu * Pi.T y_hat (rows: nu * (y_hat @ Pi)).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fibquant_cli.core.codebook import STREAM_ROTATION, stream
from fibquant_cli.core.params import Profile
from fibquant_cli.core.rotation import haar_rotation
from fibquant_cli.core.search import searcher_for
from fibquant_cli.errors import InvalidInputError

# Rows of x handled at once; together with the search budget this bounds every temporary.
ROW_CHUNK = 16384


def check_finite(x: np.ndarray, rows: np.ndarray, row_offset: int = 0) -> None:
    """Raise InvalidInputError naming the first row (and column) of x holding NaN or Inf.

    ``rows`` are the row numbers of x's rows (x may be a selection of a chunk's rows).
    """
    bad = ~np.isfinite(x)
    if bad.any():
        r, col = np.argwhere(bad)[0]
        raise InvalidInputError(
            f"row {rows[r] + row_offset} is not finite ({x[r, col]} at column {col})"
        )


# Below this a float32 sum of squares may have underflowed: such rows go through float64.
TINY_NORM = 1e-15
F32_MAX = float(np.finfo(np.float32).max)


def normalize(chunk: np.ndarray, row_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(norms (n,) float32, unit rows (n, d) float32) of a chunk; zero rows stay zero.

    Computed in float32 (the fast path); rows whose squared norm could have overflowed or
    underflowed there are redone in float64. NaN/Inf, or a norm beyond float32, raise.
    """
    x = chunk.astype(np.float32, copy=False)
    nu = np.sqrt(np.einsum("ij,ij->i", x, x))
    odd = ~np.isfinite(nu) | (nu < TINY_NORM)
    safe = np.where(odd | (nu == 0), 1.0, nu).astype(np.float32)
    u = x / safe[:, None]
    if odd.any():
        rows = np.flatnonzero(odd)
        # NaN/Inf anywhere in a row makes its norm non-finite: only these rows need a look.
        check_finite(chunk[rows], rows, row_offset)
        nu64 = row_norms(chunk[rows])
        if (nu64 > F32_MAX).any():
            bad = int(rows[np.argmax(nu64 > F32_MAX)]) + row_offset
            raise InvalidInputError(f"row {bad}: vector norm beyond the float32 range")
        nu[rows] = nu64
        u[rows] = (chunk[rows].astype(np.float64) / np.where(nu64 > 0, nu64, 1.0)[:, None])
    return nu.astype(np.float32, copy=False), u


def row_norms(x: np.ndarray) -> np.ndarray:
    """||x||_2 per row, computed in float64 so f32 input cannot overflow; (n,) float64."""
    x64 = x.astype(np.float64, copy=False)
    return np.sqrt(np.einsum("ij,ij->i", x64, x64))


@dataclass(frozen=True, eq=False)
class FibQuantizer:
    """A ready-to-use FibQuant codec: profile, trained codebook (N, k) and rotation (d, d)."""

    profile: Profile
    codebook: np.ndarray
    rotation: np.ndarray

    @property
    def bits_per_vector(self) -> int:
        return self.profile.bits_per_vector

    @property
    def rate_bits(self) -> float:
        return self.profile.rate_bits

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Encode x (n, d) into codes (n, d/k) uint32 and norms (n,) float32.

        Zero vectors get norm 0 (their codes are those of the zero block); NaN/Inf raise.
        """
        x = np.asarray(x)
        d, k = self.profile.head_dim, self.profile.block_dim
        if x.ndim != 2 or x.shape[1] != d:
            raise InvalidInputError(f"expected vectors of shape (n, {d}), got {x.shape}")
        n = x.shape[0]
        codes = np.empty((n, d // k), dtype=np.uint32)
        norms = np.empty(n, dtype=np.float32)
        rot_t = self.rotation.T.astype(np.float32)
        searcher = searcher_for(self)  # built once per quantizer (core/search.py)
        for start in range(0, n, ROW_CHUNK):
            chunk = x[start:start + ROW_CHUNK]
            nu, u = normalize(chunk, start)
            y = u @ rot_t
            block_codes = searcher.nearest(y.reshape(-1, k))
            codes[start:start + len(chunk)] = block_codes.reshape(-1, d // k)
            norms[start:start + len(chunk)] = nu
        return codes, norms

    def decode(self, codes: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """Decode codes (n, d/k) and norms (n,) back to x_hat (n, d) float32.

        Rows are decoded in blocks of ``DECODE_ROWS`` counted from the first row, always with
        the same matrix shapes, so a row's value depends only on its block (BLAS may order a
        dot product differently for another matrix size). Random access decodes the aligned
        blocks around a range and gets exactly the values of a full decode.
        """
        out = np.empty((codes.shape[0], self.profile.head_dim), dtype=np.float32)
        for start, stop, block in self.decode_blocks(codes, norms):
            out[start:stop] = block
        return out

    def decode_blocks(self, codes: np.ndarray, norms: np.ndarray):
        """Yield (start, stop, x_hat rows start:stop as float32) for each ``DECODE_ROWS`` block.

        The block is one scratch array reused for every block (a cache-sized working set for
        the caller's next steps): use or copy it before asking for the next one.
        """
        d = self.profile.head_dim
        n = codes.shape[0]
        # codes: an array (n, d/k), or an object whose rows(start, stop) unpacks those rows
        # on demand (a packed stream decoded block by block: no whole layer of indices).
        rows = codes.rows if hasattr(codes, "rows") else (lambda a, b: codes[a:b])
        rot = self.rotation.astype(np.float32, copy=False)
        cb = self.codebook.astype(np.float32, copy=False)
        norms = norms.astype(np.float32, copy=False)
        scratch = np.empty((min(n, DECODE_ROWS), d), dtype=np.float32)
        for start in range(0, n, DECODE_ROWS):
            stop = min(n, start + DECODE_ROWS)
            block = scratch[:stop - start]
            # take along axis 0 is about 3x faster than cb[codes] (fancy indexing).
            y_hat = np.take(cb, rows(start, stop), axis=0).reshape(stop - start, d)
            np.matmul(y_hat, rot, out=block)
            block *= norms[start:stop, None]
            yield start, stop, block

    @functools.cached_property  # a frozen dataclass still has a __dict__ to cache in
    def max_decoded_norm(self) -> float:
        """An upper bound on ||y_hat|| (so on every |x_hat_i| / nu): sqrt(d/k) max ||c||."""
        cb = self.codebook.astype(np.float64)
        return float(np.sqrt(self.profile.blocks_per_vector * np.einsum("ij,ij->i", cb, cb).max()))


DECODE_ROWS = 4096


def default_rotation(profile: Profile) -> np.ndarray:
    """The profile's shared Haar rotation, from its own random stream."""
    return haar_rotation(profile.head_dim, stream(profile.seed, STREAM_ROTATION))
