"""End-to-end speed and memory of `fibquant compress` / `decompress` (run by `make bench`).

    .venv/bin/python scripts/bench_pipeline.py [--quick] [--json PATH]

Prints, in one run:
1. compress / decompress throughput in MB/s of fp16 KV input for every --bits preset and the
   large (4, 4096) codebook, through the whole pipeline (pre-pass, encode, error statistics,
   digests, file write and fsync; decompress: verify, decode, write), with 1 encoder thread
   and with the automatic choice (2 threads for dumps of 16 MB of KV or more), next to the
   core encoder alone, the scalar baseline (same norm + rotation, Lloyd-Max per coordinate)
   and the gguf package's Q4_0 quantizer (quantize / dequantize of the same K and V).
   Two dumps, both K and V only, so every codec sees the same bytes: the sample with its
   tokens repeated 16x (long context: 8 tensors of 2.4 MB) and with its layers repeated 16x
   (128 tensors of 147 KB, where per-tensor costs show).
   The machine is shared and noisy (a burst of load can halve a timing), so the timings are
   interleaved: every round times Q4_0 and each fibquant variant once, in turn, and each
   figure is the best of its rounds; the ratios, not the MB/s, are the figures to read.
2. peak RSS of compress and decompress (fresh processes, default jobs) for the sample grown
   1x to 256x by layers (more tensors of the same size: memory should stay flat, but for a
   little per-tensor metadata) and 4x and 16x by tokens (larger tensors: memory may grow with
   the largest tensor, about twice it at most).
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

from fibquant_cli.core.codec import default_rotation  # noqa: E402
from fibquant_cli.core.params import Profile  # noqa: E402
from fibquant_cli.core.scalar import ScalarQuantizer  # noqa: E402
from fibquant_cli.ops.compress import compress  # noqa: E402
from fibquant_cli.ops.decompress import decompress  # noqa: E402
from fibquant_cli.ops.spec import BITS_PRESETS, CompressSpec  # noqa: E402
from fibquant_cli.storage.codebook_cache import quantizer_for  # noqa: E402

SAMPLE = ROOT / "sample_data" / "kv_sample.safetensors"
ROUNDS = 5
SLOW_ROUNDS = 2  # (4, 4096) encodes at a few MB/s: fewer rounds keep the run short


def scaled_dump(times: int, directory: Path, axis: str = "layers", kv_only: bool = False) -> Path:
    out = directory / f"kv_{axis}_x{times}{'_kv' if kv_only else ''}.safetensors"
    if times == 1 and not kv_only:
        out.write_bytes(SAMPLE.read_bytes())
        out.with_suffix("").with_suffix(".manifest.json").write_bytes(
            SAMPLE.with_suffix("").with_suffix(".manifest.json").read_bytes())
    else:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "scale_dump.py"), str(SAMPLE),
                        str(out), "--times", str(times), "--axis", axis]
                       + (["--kv-only"] if kv_only else []), check=True)
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


def interleaved(tasks: dict, rounds: int) -> dict:
    """Best time of each task over ``rounds`` rounds, the tasks taking turns in every round."""
    best = {}
    for _ in range(rounds):
        for key, fn in tasks.items():
            start = time.perf_counter()
            fn()
            best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)
    return best


def throughput(dump: Path, workdir: Path, points, rounds: int) -> list[dict]:
    """One row per codec; fibquant rows carry ratios to the Q4_0 timed in the same rounds."""
    x16, mb = kv_vectors(dump)
    mb /= 1e6
    x = x16.astype(np.float32)
    try:
        import gguf
    except ImportError:
        gguf = None
    rows = []
    out, restored = workdir / "b.fq.safetensors", workdir / "b.restored.safetensors"
    for label, k, n in points:
        spec = CompressSpec(key=(k, n), value=(k, n))
        q = quantizer_for(Profile(64, k, n))
        tasks = {
            "c1": lambda: compress(dump, output=out, spec=spec, force=True, attention=False,
                                   jobs=1),
            "c_auto": lambda: compress(dump, output=out, spec=spec, force=True,
                                       attention=False, jobs=0),
            "d": lambda: decompress(out, output=restored, force=True),
            "core": lambda: q.encode(x16),
        }
        if gguf is not None:
            q4 = gguf.GGMLQuantizationType.Q4_0
            tasks = {"q4": lambda: gguf.quants.quantize(x, q4), **tasks}
        t = interleaved(tasks, SLOW_ROUNDS if n > 1024 else rounds)
        jobs = compress(dump, output=out, spec=spec, force=True, attention=False, jobs=0).jobs
        row = {"codec": f"fibquant {label} ({k},{n})", "compress_MBps": mb / t["c1"],
               "compress_auto_MBps": mb / t["c_auto"], "auto_jobs": jobs,
               "decompress_MBps": mb / t["d"], "core_encode_MBps": mb / t["core"],
               "decompress_vs_compress_auto": t["c_auto"] / t["d"],
               "decompress_vs_compress_1job": t["c1"] / t["d"],
               "file_bytes": out.stat().st_size}
        if "q4" in t:
            row["q4_0_MBps"] = mb / t["q4"]
            row["compress_vs_q4_0"] = t["q4"] / t["c1"]
            row["compress_auto_vs_q4_0"] = t["q4"] / t["c_auto"]
            row["core_vs_q4_0"] = t["q4"] / t["core"]
        rows.append(row)
    for bits in (4, 3, 2, 1):
        sq = ScalarQuantizer(64, bits, default_rotation(Profile(64, 2, 4)).astype(np.float32))
        codes, norms = sq.encode(x16)
        t = interleaved({"e": lambda: sq.encode(x16), "d": lambda: sq.decode(codes, norms)},
                        rounds)
        rows.append({"codec": f"scalar {bits}-bit (core)", "core_encode_MBps": mb / t["e"],
                     "decompress_MBps": mb / t["d"]})
    if gguf is not None:
        packed = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
        t = interleaved({"e": lambda: gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0),
                         "d": lambda: gguf.quants.dequantize(packed,
                                                             gguf.GGMLQuantizationType.Q4_0)},
                        rounds)
        rows.append({"codec": "gguf Q4_0 (quantize / dequantize)", "core_encode_MBps": mb / t["e"],
                     "decompress_MBps": mb / t["d"]})
    return rows


def speed_table(title: str, rows: list[dict]) -> Table:
    t = Table(title=title)
    cols = [("codec", "codec", ""), ("1 job", "compress_MBps", ""),
            ("auto jobs", "compress_auto_MBps", ""), ("decompress", "decompress_MBps", ""),
            ("core encode", "core_encode_MBps", ""), ("Q4_0 same rounds", "q4_0_MBps", ""),
            ("1 job / Q4_0", "compress_vs_q4_0", "x"), ("auto / Q4_0", "compress_auto_vs_q4_0", "x"),
            ("decompress / auto", "decompress_vs_compress_auto", "x"),
            ("decompress / 1 job", "decompress_vs_compress_1job", "x")]
    for head, _, _ in cols:
        t.add_column(head, justify="left" if head == "codec" else "right")
    for r in rows:
        t.add_row(*[r["codec"]] + [f"{r[key]:.2f}{unit}" if key in r else ""
                                   for _, key, unit in cols[1:]])
    return t


RSS_SNIPPET = """
import resource, sys
from fibquant_cli.ops.compress import compress
from fibquant_cli.ops.decompress import decompress
src, out, rest, what = sys.argv[1:5]
if what == "compress":
    compress(src, output=out, force=True, attention=False)  # default jobs, as a user runs it
else:
    decompress(out, output=rest, force=True)
# ru_maxrss survives exec on Linux (it would report the bench's own peak): read VmHWM.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(dumps: list[tuple[str, Path]], workdir: Path) -> list[dict]:
    from fibquant_cli.formats.stfile import read_header

    rows = []
    for label, dump in dumps:
        out, rest = workdir / "r.fq.safetensors", workdir / "r.restored.safetensors"
        tensors = read_header(dump).tensors.values()
        row = {"dump": label, "dump_MB": dump.stat().st_size / 1e6, "tensors": len(tensors),
               "largest_tensor_MB": max(t.n_bytes for t in tensors) / 1e6}
        for what in ("compress", "decompress"):
            res = subprocess.run([sys.executable, "-c", RSS_SNIPPET, str(dump), str(out),
                                  str(rest), what], check=True, capture_output=True, text=True)
            row[f"{what}_peak_MB"] = int(res.stdout.strip().splitlines()[-1]) / 1024
        rows.append(row)
    return rows


def main(argv=None) -> int:
    from fibquant_cli.ops import process

    process.start()  # as the command line does at start-up
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller dumps, fewer rounds (smoke test)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    start = time.perf_counter()
    times, rounds = (2, 2) if args.quick else (16, ROUNDS)
    with tempfile.TemporaryDirectory(prefix="fibquant-bench-") as tmp:
        tmp = Path(tmp)
        long_dump = scaled_dump(times, tmp, "tokens", kv_only=True)
        many_dump = scaled_dump(times, tmp, "layers", kv_only=True)
        points = [(f"--bits {b:g}", *BITS_PRESETS[b]) for b in (4, 3, 2, 1, 0.5)]
        points.append(("3 bits, k=4", 4, 4096))  # the large codebook the fast search allows
        speed = throughput(long_dump, tmp, points, rounds)
        mb = kv_vectors(long_dump)[1] / 1e6
        console.print(speed_table(
            f"long context ({long_dump.name}: sample tokens x{times}, {mb:.1f} MB of K and V in "
            f"8 tensors): MB/s of fp16 KV input, best of {rounds} interleaved rounds", speed))
        many = throughput(many_dump, tmp, [("--bits 3", *BITS_PRESETS[3])], rounds)
        console.print(speed_table(
            f"many small tensors ({many_dump.name}: sample layers x{times}, {mb:.1f} MB of K "
            f"and V in {8 * times} tensors), --bits 3", many[:1] + many[-1:]))
        layer_sizes, token_sizes = ((1, 2, 4), (2,)) if args.quick else ((1, 4, 16, 64, 256),
                                                                           (4, 16))
        dumps = [(f"layers x{t}", scaled_dump(t, tmp)) for t in layer_sizes]
        dumps += [(f"tokens x{t}", scaled_dump(t, tmp, "tokens")) for t in token_sizes]
        rss = peak_rss(dumps, tmp)
        t = Table(title="peak RSS (fresh process each, default jobs) against dump size: the sample "
                        "grown by layers (more tensors) and by tokens (larger tensors)")
        for col in ("dump", "size MB", "tensors", "largest tensor MB", "compress peak MB",
                    "decompress peak MB"):
            t.add_column(col, justify="right")
        for r in rss:
            t.add_row(r["dump"], f"{r['dump_MB']:.1f}", str(r["tensors"]),
                      f"{r['largest_tensor_MB']:.2f}", f"{r['compress_peak_MB']:.0f}",
                      f"{r['decompress_peak_MB']:.0f}")
        console.print(t)
    total = time.perf_counter() - start
    console.print(f"total run time {total:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"long_context": speed, "many_tensors": many, "rss": rss,
                                         "seconds": total}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
