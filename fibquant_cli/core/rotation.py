"""The shared Haar rotation (docs/method.md §1)."""

from __future__ import annotations

import numpy as np


def haar_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random d x d orthogonal matrix: Gaussian -> QR -> flip column j where R[j, j] < 0."""
    g = rng.standard_normal((d, d))
    q, r = np.linalg.qr(g)
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return q * signs[None, :]
