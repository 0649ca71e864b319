"""What each lever of the transform codec buys: attention cosine at fixed ratios, ablated.

Runs ``fibquant compress --basis`` (the product's own code) on a dump with a basis fitted on a
*different* text, then again with one lever at a time switched off:

* RoPE not undone (a basis from ``calibrate --no-rope-undo``);
* no attention sink (``--keep-first 0``);
* no sensitivity weights (each layer and role counts by its relative error);
* no query weights (a key column's error counts by its variance alone);
* no cross-layer allocation (every layer and role gets the same bits per row);
* scalar Lloyd-Max coefficients instead of the 2-D VQ codebooks (whole bits per component);
* no exceptions (coefficients beyond the codebooks' reach clipped);

and reports, for the full codec, what an entropy stage (zstd over each layer's codes) would
add. Ratios are all inclusive (the model-level basis is not counted: it is a model file).

    python scripts/transform_study.py CALIB_DUMP EVAL_DUMP [--ratios 5,8,12,16] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fibquant_cli.core import transform as T
from fibquant_cli.ops import calibrate as cal
from fibquant_cli.ops import transform as tc
from fibquant_cli.ops.compress import compress
from fibquant_cli.ops.spec import resolve_spec


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def scalar_tables() -> T.Tables:
    """Whole-bit scalar Lloyd-Max per component, written as 2-D product codebooks so the
    codec runs unchanged: a pair at width 2b is two b-bit Lloyd-Max indices."""
    base = T.tables()
    vq, delta = {}, {0: 1.0}
    for w in range(2, T.VQ_MAX_WIDTH + 1, 2):
        levels = T.lloyd_max_gaussian(2 ** (w // 2))
        grid = np.stack(np.meshgrid(levels, levels, indexing="ij"), -1).reshape(-1, 2)
        vq[w] = grid.astype(np.float32)
        rng = np.random.default_rng(5)
        x = rng.standard_normal(2**20)
        edges = (levels[1:] + levels[:-1]) / 2
        delta[w] = float(((x - levels[np.searchsorted(edges, x)]) ** 2).mean())
    for w in T.SCALAR_WIDTHS:
        delta[w] = base.delta[w]
    # odd widths are absent from delta, so the allocator never picks them
    return T.Tables({**{w: base.vq[w] for w in range(1, T.VQ_MAX_WIDTH + 1, 2)}, **vq},
                    base.scalar, delta)


@contextlib.contextmanager
def scalar_coefficients():
    tab = scalar_tables()
    T._searcher.cache_clear()
    with patched(T, "tables", functools.cache(lambda: tab)):
        yield
    T._searcher.cache_clear()


@contextlib.contextmanager
def equal_bits_per_matrix():
    """Each matrix's own greedy order, interleaved so every matrix spends the same bits."""
    greedy = T.greedy_steps

    def interleaved(variances, weights, delta=None, open_bits=None):
        merged = []
        offset = 0
        hull = None
        for i, v in enumerate(variances):
            own = greedy([v], [1.0], delta, None if open_bits is None else [open_bits[i]])
            hull = own.hull
            spent = np.cumsum(own.hull[own.to] - own.hull[own.step])
            merged += [(s, offset + p, h, t)
                       for s, p, h, t in zip(spent, own.pair, own.step, own.to)]
            offset += len(v) // 2
        merged.sort(key=lambda x: (x[0], x[1]))
        pair, step, to = (np.array([m[i] for m in merged], dtype=np.int64) for i in (1, 2, 3))
        return T.Steps(pair, step, to, hull, [len(v) // 2 for v in variances])

    with patched(T, "greedy_steps", interleaved):
        yield


@contextlib.contextmanager
def no_sensitivity():
    orig = tc.weights

    def relative(mats, basis, dump):
        return [1.0 / float((m.stats.scale.astype(np.float64) ** 2).sum()) for m in mats]

    with patched(tc, "weights", relative):
        yield
    del orig


@contextlib.contextmanager
def no_query_weights():
    with patched(tc, "query_weight", lambda m, basis, dump: 1.0):
        yield


@contextlib.contextmanager
def no_exceptions():
    with patched(T, "TAU", float("inf")):
        yield


def zstd_gain(path: Path) -> float:
    """Codes bytes over their zstd-19 size, layer by layer (what an entropy stage would
    save on the codes, the rest of the file unchanged); zlib-9 if zstandard is missing."""
    from safetensors import safe_open

    try:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=19)
    except ImportError:
        import zlib

        cctx = type("Zlib", (), {"compress": staticmethod(lambda b: zlib.compress(b, 9))})()
    raw = packed = 0
    with safe_open(str(path), "np") as f:
        for name in f.keys():
            if name.endswith("/codes"):
                data = f.get_tensor(name).tobytes()
                raw += len(data)
                packed += min(len(data), len(cctx.compress(data)))
    return raw / max(packed, 1)


def run(dump: Path, basis: Path, ratio: float, out: Path, keep_first: int = 1) -> dict:
    spec = resolve_spec(basis=str(basis), ratio=ratio, keep_first=keep_first)
    start = time.perf_counter()
    rep = compress(dump, output=out, spec=spec, force=True, max_queries=1 << 20)
    layers = [x["cosine_mean"] for x in rep.attention.layers]
    return {"ratio": rep.total.ratio, "cosine": rep.attention.overall["cosine_mean"],
            "p1": rep.attention.overall["cosine_p1"], "worst_layer": min(layers),
            "rel_mse": rep.total.rel_mse, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("calib", type=Path)
    ap.add_argument("dump", type=Path)
    ap.add_argument("--ratios", default="5,8,12,16")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    with tempfile.TemporaryDirectory(prefix="fibquant-study-") as tmp:
        tmp = Path(tmp)
        basis, plain = tmp / "undo.basis.safetensors", tmp / "plain.basis.safetensors"
        cal.calibrate([args.calib], output=basis)
        cal.calibrate([args.calib], output=plain, rope_undo=False)
        variants = [("transform (all levers)", basis, 1, contextlib.nullcontext),
                    ("RoPE not undone", plain, 1, contextlib.nullcontext),
                    ("no attention sink", basis, 0, contextlib.nullcontext),
                    ("no sensitivity weights", basis, 1, no_sensitivity),
                    ("no query weights on keys", basis, 1, no_query_weights),
                    ("equal bits per layer and role", basis, 1, equal_bits_per_matrix),
                    ("scalar Lloyd-Max coefficients", basis, 1, scalar_coefficients),
                    ("no exceptions", basis, 1, no_exceptions)]
        results = []
        for name, b, kf, ctx in variants:
            for ratio in ratios:
                out = tmp / "point.fq.safetensors"
                with ctx():
                    res = {"variant": name, "target": ratio, **run(args.dump, b, ratio, out, kf)}
                if name.startswith("transform"):
                    res["zstd_codes_gain"] = zstd_gain(out)
                results.append(res)
                extra = (f"  zstd on codes x{res['zstd_codes_gain']:.3f}"
                         if "zstd_codes_gain" in res else "")
                print(f"{name:32s} {res['ratio']:6.2f}x  cosine {res['cosine']:.4f}  worst layer "
                      f"{res['worst_layer']:.3f}  p1 {res['p1']:.3f}{extra}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
