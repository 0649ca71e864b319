"""Measure FibQuant against the scalar baseline: distortion (spec section 4) and throughput.

Run by ``make bench``:
    .venv/bin/python scripts/bench.py [--quick] [--json PATH]

Prints measurements, not assertions:
1. D_unit at d = 64 of the initial and the trained codebook on fresh unit vectors (a stream
   the training never used), next to the spec's reference, the measured scalar Lloyd-Max
   baseline at the same whole-bit rate, and the Shannon bound 2^(-2b).
2. Encode / decode throughput (MB/s of fp16 input) of FibQuantizer and ScalarQuantizer at the
   same rate, with the relative MSE of each.
Every number comes from the core (fibquant_cli.core); this script only times and tabulates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

try:
    import fibquant_cli  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fibquant_cli.core import codebook
from fibquant_cli.core.codec import default_rotation
from fibquant_cli.core.params import Profile
from fibquant_cli.core.scalar import ScalarQuantizer, scalar_d_unit_theory
from fibquant_cli.core.source import sample_unit_vectors
from fibquant_cli.storage import codebook_cache as cache
from fibquant_cli.storage.codebook_cache import quantizer_for

HEAD_DIM = 64
SEED = 0  # profile seed of the shipped codebooks
# Spec section 4, D_unit FibQuant (measured) at d = 64; (3, 64) is left out: 3 does not divide 64.
REFERENCE_D_UNIT = {
    (2, 4): 0.358, (2, 16): 0.105, (2, 64): 0.0292, (2, 256): 0.0076,
    (4, 256): 0.0956, (8, 256): 0.318, (8, 16): 0.599, (32, 128): 0.801,
    (2, 1024): None, (4, 4096): None,  # shipped beyond the spec's table (no reference value)
}
THROUGHPUT_POINTS = [(2, 64), (4, 256), (8, 256), (4, 4096)]  # b = 3, 2, 1, 3
INPUT_STREAM = 100  # purpose id of the throughput input, distinct from the core's streams 1..4
FP16_BYTES = 2
REPEATS = 3
FULL = {"eval_vectors": 100_000, "speed_vectors": 200_000}
QUICK = {"eval_vectors": 10_000, "speed_vectors": 20_000}


# --- small helpers ----------------------------------------------------------------------------
def db(ratio: float) -> float:
    return 10.0 * math.log10(ratio)


def whole_bits(rate: float) -> int | None:
    return int(round(rate)) if abs(rate - round(rate)) < 1e-12 and rate >= 1 else None


def profile_of(k: int, n: int) -> Profile:
    return Profile(HEAD_DIM, k, n, seed=SEED)


def codebook_on_disk(profile: Profile) -> bool:
    """True when load_or_build would load (not train) the codebook."""
    name = cache.entry_name(profile)
    return (cache.SHIPPED_DIR / name).exists() or (cache.cache_dir() / name).exists()


def eval_rng() -> np.random.Generator:
    """The held-out stream: a fresh generator gives the same vectors to every measurement."""
    return codebook.stream(SEED, codebook.STREAM_EVALUATION)


def relative_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    x64 = x.astype(np.float64)
    err = x64 - x_hat.astype(np.float64)
    return float(np.einsum("ij,ij->", err, err) / np.einsum("ij,ij->", x64, x64))


def best_time(fn, repeats: int = REPEATS):
    """(best seconds over ``repeats`` calls, result of the last call)."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


# --- machine facts ----------------------------------------------------------------------------
def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info

        pools = [f"{p.get('internal_api')} {p.get('version')} ({p.get('num_threads')} threads)"
                 for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            return "; ".join(pools)
    except ImportError:
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception as err:  # show_config's layout is not a stable API
        return f"unknown ({type(err).__name__})"


def machine_facts() -> dict:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas_info(),
        "nproc": affinity or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# --- 1. distortion ----------------------------------------------------------------------------
_scalar_cache: dict[int, float] = {}


def scalar_d_unit(bits: int, n_vectors: int) -> float:
    """Measured D_unit of ScalarQuantizer on the held-out unit vectors."""
    if bits not in _scalar_cache:
        u = sample_unit_vectors(HEAD_DIM, n_vectors, eval_rng())
        q = ScalarQuantizer(HEAD_DIM, bits, default_rotation(profile_of(2, 4)))
        u_hat = q.decode(*q.encode(u)).astype(np.float64)
        _scalar_cache[bits] = float(np.einsum("ij,ij->", u - u_hat, u - u_hat) / n_vectors)
    return _scalar_cache[bits]


def distortion_row(k: int, n: int, n_vectors: int, allow_training: bool) -> dict:
    profile = profile_of(k, n)
    rate = profile.rate_bits
    row = {"k": k, "N": n, "b": rate, "reference": REFERENCE_D_UNIT[(k, n)],
           "shannon": 2.0 ** (-2.0 * rate), "eval_vectors": n_vectors}
    row["initial"] = codebook.d_unit(codebook.initial_codebook(HEAD_DIM, k, n), HEAD_DIM,
                                     n_vectors, eval_rng())
    row["trained"], row["origin"] = None, "missing (not trained in --quick)"
    if allow_training or codebook_on_disk(profile):
        trained, origin = cache.load_or_build(profile)
        row["origin"] = f"{origin.kind} {origin.seconds:.1f}s"
        row["trained"] = codebook.d_unit(trained, HEAD_DIM, n_vectors, eval_rng())
    best = row["trained"] if row["trained"] is not None else row["initial"]
    row["gap_db"] = db(best / row["shannon"])
    bits = whole_bits(rate)
    row["scalar"] = scalar_d_unit(bits, n_vectors) if bits else None
    row["scalar_theory"] = scalar_d_unit_theory(HEAD_DIM, bits) if bits else None
    row["gain_db"] = db(row["scalar"] / best) if bits else None
    return row


def distortion_table(rows: list[dict]) -> Table:
    t = Table(title=f"D_unit at d = {HEAD_DIM} on {rows[0]['eval_vectors']:,} held-out unit "
                    "vectors (gain/gap use the trained codebook when present)")
    for col in ("k", "N", "b", "initial", "trained", "spec ref", "scalar", "scalar theory",
                "gain dB", "2^-2b", "gap dB", "codebook"):
        t.add_column(col, justify="left" if col == "codebook" else "right")
    fmt = lambda v, f="{:.4f}": "—" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        t.add_row(str(r["k"]), str(r["N"]), f"{r['b']:.3g}", fmt(r["initial"]), fmt(r["trained"]),
                  fmt(r["reference"]), fmt(r["scalar"]), fmt(r["scalar_theory"]),
                  fmt(r["gain_db"], "{:+.2f}"), fmt(r["shannon"]), fmt(r["gap_db"], "{:+.2f}"),
                  r["origin"])
    return t


# --- 2. throughput ----------------------------------------------------------------------------
def measure_codec(name: str, quantizer, x: np.ndarray) -> dict:
    mb = x.shape[0] * x.shape[1] * FP16_BYTES / 1e6
    enc_s, (codes, norms) = best_time(lambda: quantizer.encode(x))
    dec_s, x_hat = best_time(lambda: quantizer.decode(codes, norms))
    return {"codec": name, "encode_s": enc_s, "decode_s": dec_s, "encode_MBps": mb / enc_s,
            "decode_MBps": mb / dec_s, "rel_mse": relative_mse(x, x_hat),
            "bits_per_vector": quantizer.bits_per_vector}


def throughput_rows(k: int, n: int, x: np.ndarray, allow_training: bool) -> list[dict]:
    profile = profile_of(k, n)
    bits = whole_bits(profile.rate_bits)
    if not (allow_training or codebook_on_disk(profile)):
        return []
    fib = measure_codec(f"fib k={k} N={n}", quantizer_for(profile), x)
    scalar = measure_codec(f"scalar {bits}-bit",
                           ScalarQuantizer(HEAD_DIM, bits, default_rotation(profile)), x)
    for row in (fib, scalar):
        row.update({"k": k, "N": n, "b": bits, "n_vectors": x.shape[0]})
    fib["encode_ratio"] = fib["encode_MBps"] / scalar["encode_MBps"]
    fib["decode_ratio"] = fib["decode_MBps"] / scalar["decode_MBps"]
    return [fib, scalar]


def throughput_table(rows: list[dict], n_vectors: int) -> Table:
    t = Table(title=f"Throughput at d = {HEAD_DIM}: {n_vectors:,} fp16 vectors "
                    f"({n_vectors * HEAD_DIM * FP16_BYTES / 1e6:.1f} MB), best of {REPEATS}")
    for col in ("codec", "b", "bits/vec", "encode MB/s", "decode MB/s", "enc fib/scalar",
                "dec fib/scalar", "rel MSE"):
        t.add_column(col, justify="left" if col == "codec" else "right")
    for r in rows:
        ratio = lambda key: f"{r[key]:.2f}×" if key in r else ""  # noqa: E731
        t.add_row(r["codec"], str(r["b"]), str(r["bits_per_vector"]), f"{r['encode_MBps']:.1f}",
                  f"{r['decode_MBps']:.1f}", ratio("encode_ratio"), ratio("decode_ratio"),
                  f"{r['rel_mse']:.4f}")
    return t


# --- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="few vectors, no codebook training (smoke test, < 30 s)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every number as JSON")
    p.add_argument("--eval-vectors", type=int, help="held-out unit vectors for D_unit")
    p.add_argument("--speed-vectors", type=int, help="fp16 vectors for the throughput runs")
    return p.parse_args(argv)


def print_machine(console: Console, facts: dict, sizes: dict, quick: bool) -> None:
    console.print(f"[bold]fibquant bench[/bold] ({'quick' if quick else 'full'})  "
                  f"python {facts['python']}  numpy {facts['numpy']}  BLAS {facts['blas']}  "
                  f"nproc {facts['nproc']} (cpu_count {facts['cpu_count']})  {facts['platform']}")
    if facts["load_average"]:
        console.print("load average at start (1/5/15 min): "
                      + " / ".join(f"{v:.2f}" for v in facts["load_average"])
                      + "  (timings are noisy when other jobs share the cores)")
    console.print(f"eval vectors {sizes['eval_vectors']:,}  speed vectors "
                  f"{sizes['speed_vectors']:,}  codebook cache {cache.cache_dir()}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fibquant_cli.ops import process

    process.start()  # as the command line does at start-up
    start = time.perf_counter()
    sizes = dict(QUICK if args.quick else FULL)
    sizes["eval_vectors"] = args.eval_vectors or sizes["eval_vectors"]
    sizes["speed_vectors"] = args.speed_vectors or sizes["speed_vectors"]
    console = Console(width=None if sys.stdout.isatty() else 170)
    facts = machine_facts()
    print_machine(console, facts, sizes, args.quick)

    dist = [distortion_row(k, n, sizes["eval_vectors"], not args.quick)
            for k, n in REFERENCE_D_UNIT]
    console.print(distortion_table(dist))

    x = np.random.default_rng([SEED, INPUT_STREAM]).standard_normal(
        (sizes["speed_vectors"], HEAD_DIM)).astype(np.float16)
    speed = [row for k, n in THROUGHPUT_POINTS for row in throughput_rows(k, n, x, not args.quick)]
    console.print(throughput_table(speed, sizes["speed_vectors"]))

    total = time.perf_counter() - start
    console.print(f"total run time {total:.1f} s")
    if args.json:
        report = {"mode": "quick" if args.quick else "full", "machine": facts, "sizes": sizes,
                  "distortion": dist, "throughput": speed, "total_seconds": total}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
