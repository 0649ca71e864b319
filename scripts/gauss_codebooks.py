"""Make fibquant_cli/codebooks/gauss_v1.npz: the transform codec's coefficient quantizers.

For each width w = 1..VQ_MAX_WIDTH, the 2-D Gaussian codebook with 2**w codewords: the
radial-angular spiral (core.transform.spiral_codebook) refined by Lloyd on a fixed sample of
unit 2-D Gaussians; for each scalar width, the exact Lloyd-Max levels of a unit Gaussian.
``delta`` is each width's MSE per component, measured on an independent sample. Deterministic
for a given numpy; the file is what files and tests rely on, not this script's rerun.

    python scripts/gauss_codebooks.py            # writes the npz (about 2 minutes)
"""

from __future__ import annotations

import sys
import time

import numpy as np

from fibquant_cli.core import transform as T
from fibquant_cli.core.search import make_searcher

TRAIN, EVAL, ITERATIONS = 2**19, 2**21, 60


def nearest(y: np.ndarray, cb: np.ndarray) -> np.ndarray:
    scale = 1.0 / (1.05 * float(np.sqrt((cb * cb).sum(axis=1).max())))
    return make_searcher(cb * scale).nearest((y * scale).astype(np.float32)).astype(np.intp)


def lloyd(n: int, x: np.ndarray) -> np.ndarray:
    cb = T.spiral_codebook(n)
    for _ in range(ITERATIONS):
        idx = nearest(x, cb)
        count = np.bincount(idx, minlength=n)
        for k in range(2):
            s = np.bincount(idx, weights=x[:, k], minlength=n)
            cb[count > 0, k] = s[count > 0] / count[count > 0]
    return cb


def main() -> None:
    rng = np.random.default_rng(20261201)
    x = rng.standard_normal((TRAIN, 2))
    ev = rng.standard_normal((EVAL, 2))
    out, delta = {}, [1.0]
    for w in range(1, T.VQ_MAX_WIDTH + 1):
        t0 = time.perf_counter()
        cb = lloyd(2**w, x).astype(np.float32)
        out[f"vq{w}"] = cb
        err = ev - cb[nearest(ev, cb.astype(np.float64))]
        delta.append(float((err * err).mean()))
        print(f"vq{w}: delta {delta[-1]:.6f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    for w in T.SCALAR_WIDTHS:
        levels = T.lloyd_max_gaussian(2 ** (w // 2)).astype(np.float32)
        out[f"scalar{w // 2}"] = levels
        edges = (levels[1:] + levels[:-1]) / 2.0
        err = ev.reshape(-1) - levels[np.searchsorted(edges, ev.reshape(-1))]
        delta.append(float((err * err).mean()))
        print(f"scalar{w // 2}: delta {delta[-1]:.7f}", file=sys.stderr)
    np.savez(T.TABLES_PATH, delta=np.array(delta), **out)
    print(f"wrote {T.TABLES_PATH}", file=sys.stderr)


if __name__ == "__main__":
    main()
