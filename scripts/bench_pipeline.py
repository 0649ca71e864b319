"""End-to-end speed and memory of `fibquant compress` / `decompress` (run by `make bench`).

    .venv/bin/python scripts/bench_pipeline.py [--quick] [--json PATH]

Prints, in one run and on the same data (the sample dump with its layers repeated):
1. compress / decompress throughput in MB/s of fp16 KV input for every --bits preset, through
   the whole pipeline (pre-pass, encode, digests, file write / verify, decode, write), next to
   the core encoder alone, the scalar baseline (same norm + rotation, Lloyd-Max per coordinate)
   and the gguf package's Q4_0 quantizer (quantize / dequantize of the same K and V);
   the figure that counts is the ratio to Q4_0, since this machine is shared and noisy;
2. peak RSS of compress and decompress for dumps of 1x, 4x, 16x and 64x the sample (more
   layers; fresh processes), to show that memory stays flat as the dump grows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fibquant_cli.compressor import compress  # noqa: E402
from fibquant_cli.core.codec import FibQuantizer, default_rotation  # noqa: E402
from fibquant_cli.core.params import Profile  # noqa: E402
from fibquant_cli.core.scalar import ScalarQuantizer  # noqa: E402
from fibquant_cli.pipeline import decompress  # noqa: E402
from fibquant_cli.spec import BITS_PRESETS, CompressSpec  # noqa: E402

SAMPLE = ROOT / "sample_data" / "kv_sample.safetensors"
REPEATS = 3


def scaled_dump(times: int, directory: Path) -> Path:
    out = directory / f"kv_x{times}.safetensors"
    if times == 1:
        out.write_bytes(SAMPLE.read_bytes())
        out.with_suffix("").with_suffix(".manifest.json").write_bytes(
            SAMPLE.with_suffix("").with_suffix(".manifest.json").read_bytes())
    else:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "scale_dump.py"), str(SAMPLE),
                        str(out), "--times", str(times)], check=True)
    return out


def kv_vectors(path: Path) -> tuple[np.ndarray, int]:
    """Every K and V head vector the manifest names, (n, d) in the source dtype, and its bytes."""
    from safetensors.numpy import load_file

    manifest = json.loads(path.with_name(path.name.removesuffix(".safetensors")
                                         + ".manifest.json").read_text())
    names = [n for e in manifest["entries"] for n in e["tensors"]]
    arrays = load_file(path)
    x = np.concatenate([arrays[n].reshape(-1, arrays[n].shape[-1]) for n in names])
    return x, x.nbytes


def best(fn):
    times, result = [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def throughput(dump: Path, workdir: Path, points) -> list[dict]:
    x16, mb = kv_vectors(dump)
    mb /= 1e6
    x = x16.astype(np.float32)
    rows = []
    try:
        import gguf

        q4 = gguf.GGMLQuantizationType.Q4_0
        enc, packed = best(lambda: gguf.quants.quantize(x, q4))
        dec, _ = best(lambda: gguf.quants.dequantize(packed, q4))
        q4_row = {"codec": "gguf Q4_0", "compress_MBps": mb / enc,
                  "decompress_MBps": mb / dec}
    except ImportError:
        q4_row = None
    for label, k, n in points:
        spec = CompressSpec(key=(k, n), value=(k, n))
        out = workdir / "b.fq.safetensors"
        c_s, _ = best(lambda: compress(dump, output=out, spec=spec, force=True, attention=False,
                                       jobs=1))
        c2_s, _ = best(lambda: compress(dump, output=out, spec=spec, force=True,
                                        attention=False, jobs=2))
        d_s, _ = best(lambda: decompress(out, output=workdir / "b.restored.safetensors",
                                         force=True))
        q = FibQuantizer.from_profile(Profile(64, k, n))
        e_s, (codes, norms) = best(lambda: q.encode(x16))
        rows.append({"codec": f"fibquant {label} ({k},{n})", "compress_MBps": mb / c_s,
                     "compress_2jobs_MBps": mb / c2_s,
                     "decompress_MBps": mb / d_s, "core_encode_MBps": mb / e_s,
                     "file_bytes": out.stat().st_size})
    for bits in (4, 3, 2, 1):
        sq = ScalarQuantizer(64, bits, default_rotation(Profile(64, 2, 4)).astype(np.float32))
        e_s, (codes, norms) = best(lambda: sq.encode(x16))
        d_s, _ = best(lambda: sq.decode(codes, norms))
        rows.append({"codec": f"scalar {bits}-bit (core)",
                     "compress_MBps": mb / e_s, "decompress_MBps": mb / d_s})
    if q4_row:
        rows.append(q4_row)
        for r in rows:
            r["compress_vs_q4_0"] = r["compress_MBps"] / q4_row["compress_MBps"]
            if "compress_2jobs_MBps" in r:
                r["compress_2jobs_vs_q4_0"] = r["compress_2jobs_MBps"] / q4_row["compress_MBps"]
            r["decompress_vs_q4_0"] = r["decompress_MBps"] / q4_row["decompress_MBps"]
    return rows


RSS_SNIPPET = """
import resource, sys
from fibquant_cli.compressor import compress
from fibquant_cli.pipeline import decompress
src, out, rest, what = sys.argv[1:5]
if what == "compress":
    compress(src, output=out, force=True, attention=False, jobs=1)
else:
    decompress(out, output=rest, force=True)
# ru_maxrss survives exec on Linux (it would report the bench's own peak): read VmHWM.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(dumps: dict[int, Path], workdir: Path) -> list[dict]:
    rows = []
    for times, dump in dumps.items():
        out, rest = workdir / f"r{times}.fq.safetensors", workdir / f"r{times}.restored.safetensors"
        row = {"times": times, "dump_MB": dump.stat().st_size / 1e6}
        for what in ("compress", "decompress"):
            res = subprocess.run([sys.executable, "-c", RSS_SNIPPET, str(dump), str(out),
                                  str(rest), what], check=True, capture_output=True, text=True)
            row[f"{what}_peak_MB"] = int(res.stdout.strip().splitlines()[-1]) / 1024
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller dumps (smoke test)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 170)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fibquant-bench-") as tmp:
        tmp = Path(tmp)
        sizes = (1, 2, 4) if args.quick else (1, 4, 16, 64)
        dumps = {t: scaled_dump(t, tmp) for t in sizes}
        speed_dump = dumps[sizes[2]]
        points = [(f"--bits {b:g}", *BITS_PRESETS[b]) for b in (4, 3, 2, 1, 0.5)]
        points.append(("3 bits, k=4", 4, 4096))  # the large codebook the fast search allows
        speed = throughput(speed_dump, tmp, points)
        t = Table(title=f"compress / decompress throughput, MB/s of fp16 KV input "
                        f"({speed_dump.name}: {kv_vectors(speed_dump)[1] / 1e6:.1f} MB of KV), "
                        f"best of {REPEATS}")
        for col in ("codec", "compress MB/s", "compress 2 jobs", "decompress MB/s",
                    "core encode MB/s", "compress / Q4_0", "2 jobs / Q4_0", "decompress / Q4_0",
                    "decompress / compress"):
            t.add_column(col, justify="left" if col == "codec" else "right")
        for r in speed:
            fmt = lambda key, unit="": f"{r[key]:.2f}{unit}" if key in r else ""  # noqa: E731
            t.add_row(r["codec"], fmt("compress_MBps"), fmt("compress_2jobs_MBps"),
                      fmt("decompress_MBps"), fmt("core_encode_MBps"),
                      fmt("compress_vs_q4_0", "x"), fmt("compress_2jobs_vs_q4_0", "x"),
                      fmt("decompress_vs_q4_0", "x"),
                      f"{r['decompress_MBps'] / r['compress_MBps']:.1f}x")
        console.print(t)
        rss = peak_rss(dumps, tmp)
        t = Table(title="peak RSS (fresh process each) against dump size")
        for col in ("dump", "size MB", "compress peak MB", "decompress peak MB"):
            t.add_column(col, justify="right")
        for r in rss:
            t.add_row(f"{r['times']}x sample", f"{r['dump_MB']:.1f}", f"{r['compress_peak_MB']:.0f}",
                      f"{r['decompress_peak_MB']:.0f}")
        console.print(t)
    total = time.perf_counter() - start
    console.print(f"total run time {total:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"throughput": speed, "rss": rss, "seconds": total},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
