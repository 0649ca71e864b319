"""The canonical source (docs/method.md §2): a k-block of a uniform point on S^(d-1).

X = R * V with R^2 ~ Beta(k/2, (d-k)/2) and V uniform on S^(k-1), independent. Its law depends
only on (d, k), which is why one codebook per (d, k, N) serves every model.
"""

from __future__ import annotations

import numpy as np


def sample_canonical(d: int, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n samples of the canonical source; returns (n, k) float64."""
    r2 = rng.beta(k / 2.0, (d - k) / 2.0, size=n)
    v = rng.standard_normal((n, k))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v * np.sqrt(r2)[:, None]


def sample_unit_vectors(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points uniform on S^(d-1); (n, d) float64."""
    u = rng.standard_normal((n, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return u
