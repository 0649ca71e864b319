"""Error statistics of a reconstruction, accumulated over chunks of vectors."""

from __future__ import annotations

import numpy as np


class ErrorAccumulator:
    """Sums ||x - x_hat||^2, ||x||^2 and per-vector cosines over chunks."""

    def __init__(self) -> None:
        self.err = self.energy = self.cos_sum = 0.0
        self.cos_min = 1.0
        self.cos_count = 0

    def add(self, x: np.ndarray, x_hat: np.ndarray) -> None:
        """x, x_hat (n, d): row sums in float32 (d terms each), totals in float64."""
        x = x.astype(np.float32, copy=False)
        x_hat = x_hat.astype(np.float32, copy=False)
        diff = x - x_hat
        ee = np.einsum("ij,ij->i", diff, diff)
        self.err += float(ee.sum(dtype=np.float64))
        xx = np.einsum("ij,ij->i", x, x)
        self.energy += float(xx.sum(dtype=np.float64))
        hh = np.einsum("ij,ij->i", x_hat, x_hat)
        ok = (xx > 0) & (hh > 0)
        xx, hh, ee = (v[ok].astype(np.float64) for v in (xx, hh, ee))
        # x . x_hat = (|x|^2 + |x_hat|^2 - |x - x_hat|^2) / 2: one pass fewer over the vectors.
        cos = np.clip((xx + hh - ee) / (2.0 * np.sqrt(xx * hh)), -1.0, 1.0)
        if cos.size:
            self.cos_sum += float(cos.sum())
            self.cos_min = min(self.cos_min, float(cos.min()))
            self.cos_count += cos.size

    @classmethod
    def merge(cls, parts) -> ErrorAccumulator:
        out = cls()
        for part in parts:
            out.err += part.err
            out.energy += part.energy
            out.cos_sum += part.cos_sum
            out.cos_count += part.cos_count
            out.cos_min = min(out.cos_min, part.cos_min)
        return out

    @property
    def rel_mse(self) -> float:
        return self.err / self.energy if self.energy > 0 else 0.0

    @property
    def cos_mean(self) -> float:
        return self.cos_sum / self.cos_count if self.cos_count else 1.0
