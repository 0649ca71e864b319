"""Batch throughput: `fibquant batch compress` with 1 and 2 workers next to `make compress-all`.

    .venv/bin/python scripts/bench_batch.py [--dumps 8] [--times 48] [--rounds 3]

Makes a folder of ``--dumps`` dumps (the sample grown ``--times`` by layers,
``scripts/scale_dump.py``) in a temporary folder and times, in each round and in this order,
whole commands as a user runs them (cluster start-up and worker imports included):
``fibquant batch compress --workers 1``, ``--workers 2``, ``make -j1 compress-all`` and
``make -j2 compress-all``, all ``--bits 3 --no-attention``. Reports the best round of each, the
ratio 2 workers / 1 worker, whether every output is byte-identical across the four, a rerun (all
skipped), a run with one corrupt dump added, and one large dump encoded whole or as layer ranges
on 2 workers. Other jobs on the machine take cores from the 2-worker runs first, so it also
measures how many cores were free (``free_cores``). Prints plain text; measures only
(``bench_report.py`` writes the page).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SAMPLE = ROOT / "sample_data" / "kv_sample.safetensors"
FLAGS = ("--bits", "3", "--no-attention")


def run(cmd: list[str], ok_codes=(0,)) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode not in ok_codes:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"bench_batch: {' '.join(cmd[:3])} ... exited {res.returncode}")
    return seconds, res


SPIN = "x = 0\nfor i in range(15_000_000):\n    x += i\n"


def free_cores() -> float:
    """Cores this run really had: 2 x (time of one CPU-bound process / time of two at once).
    2.0 on an idle 2-core machine; about 1 when other jobs hold a core (then no parallel
    speed-up can show)."""
    one, _ = run([sys.executable, "-c", SPIN])
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(2)]
    for p in procs:
        p.wait()
    return 2 * one / (time.perf_counter() - start)


def make_dump(out: Path, times: int) -> None:
    run([sys.executable, "scripts/scale_dump.py", str(SAMPLE), str(out), "--times", str(times)])


def make_folder(folder: Path, base: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        shutil.copyfile(base, folder / f"kv{i}.safetensors")
        shutil.copyfile(base.with_name(base.name.replace(".safetensors", ".manifest.json")),
                        folder / f"kv{i}.manifest.json")


def batch_cmd(source: Path, out: Path, workers: int, *extra: str) -> list[str]:
    return [str(BIN / "fibquant"), "batch", "compress", str(source), str(out), "--workers",
            str(workers), *FLAGS, *extra]


def make_cmd(source: Path, out: Path, jobs: int) -> list[str]:
    return ["make", f"-j{jobs}", "--no-print-directory", "compress-all", f"DIR={source}",
            f"OUT={out}", "BITS=3"]


def outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.fq.safetensors"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dumps", type=int, default=8)
    ap.add_argument("--times", type=int, default=48, help="grow the sample's layers this much")
    ap.add_argument("--large-times", type=int, default=128,
                    help="the one large dump: the sample's layers grown this much")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fibquant-bench-batch-"))
    try:
        return _bench(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(tmp: Path, args) -> int:
    base = tmp / "base.safetensors"
    make_dump(base, args.times)
    source = tmp / "in"
    make_folder(source, base, args.dumps)
    total_mb = args.dumps * base.stat().st_size / 1e6
    runs = {
        "fibquant batch compress --workers 1": lambda out: batch_cmd(source, out, 1),
        "fibquant batch compress --workers 2": lambda out: batch_cmd(source, out, 2),
        "make -j1 compress-all": lambda out: make_cmd(source, out, 1),
        "make -j2 compress-all": lambda out: make_cmd(source, out, 2),
    }
    best = {name: float("inf") for name in runs}
    cores_before = free_cores()
    for r in range(args.rounds):
        for i, (name, cmd) in enumerate(runs.items()):
            out = tmp / f"out{i}"
            shutil.rmtree(out, ignore_errors=True)
            seconds, _ = run(cmd(out))
            best[name] = min(best[name], seconds)
            print(f"bench_batch: round {r + 1}: {name}: {seconds:.2f} s", file=sys.stderr)
    cores_after = free_cores()
    files = [outputs(tmp / f"out{i}") for i in range(len(runs))]
    identical = len(files[0]) == args.dumps and all(f == files[0] for f in files[1:])

    rerun_s, res = run(batch_cmd(source, tmp / "out1", 2, "--json"))
    rerun = json.loads(res.stdout)["counts"]

    bad_source = tmp / "with-bad"
    shutil.copytree(source, bad_source, copy_function=os.link)
    data = base.read_bytes()
    (bad_source / "bad.safetensors").write_bytes(data[: len(data) // 3])  # truncated
    shutil.copyfile(source / "kv0.manifest.json", bad_source / "bad.manifest.json")
    bad_s, res = run(batch_cmd(bad_source, tmp / "out-bad", 2, "--json"), ok_codes=(3,))
    bad = json.loads(res.stdout)
    failed = [t for t in bad["tasks"] if t["status"] == "failed"]

    one = tmp / "one"
    one.mkdir()
    make_dump(one / "large.safetensors", args.large_times)
    large_mb = (one / "large.safetensors").stat().st_size / 1e6
    whole_s, _ = run(batch_cmd(one, tmp / "whole", 2, "--split-mb", "100000"))
    split_s, res = run(batch_cmd(one, tmp / "split", 2, "--split-mb", "32", "--json"))
    ranges = json.loads(res.stdout)["tasks"][0]["ranges"]
    split_same = outputs(tmp / "whole") == outputs(tmp / "split")

    one_w = best["fibquant batch compress --workers 1"]
    print(f"Batch throughput: {args.dumps} dumps of {base.stat().st_size / 1e6:.1f} MB "
          f"({total_mb:.0f} MB in all), {' '.join(FLAGS)}, best of {args.rounds} rounds; "
          "wall time of the whole command (cluster start-up included)")
    print(f"cores free for this run (2 CPU-bound processes vs 1; 2.00 = both): "
          f"{cores_before:.2f} before, {cores_after:.2f} after")
    print()
    print(f"| {'run':<37} | {'wall s':>7} | {'MB/s':>6} | {'/ batch 1 worker':>16} |")
    print(f"|{'-' * 39}|{'-' * 9}|{'-' * 8}|{'-' * 18}|")
    for name, seconds in best.items():
        print(f"| {name:<37} | {seconds:7.2f} | {total_mb / seconds:6.1f} | "
              f"{seconds / one_w:16.2f} |")
    print()
    ratio = best["fibquant batch compress --workers 2"] / one_w
    print(f"batch 2 workers / 1 worker: {ratio:.2f} (wall time)")
    print(f"make -j2 / batch 2 workers: "
          f"{best['make -j2 compress-all'] / best['fibquant batch compress --workers 2']:.2f}")
    print(f"outputs byte-identical across the four runs: {'yes' if identical else 'NO'} "
          f"({len(files[0])} files)")
    print(f"rerun (2 workers): {rerun['skipped']} of {args.dumps} skipped, {rerun['done']} done, "
          f"{rerun_s:.2f} s")
    print(f"with a corrupt dump added (2 workers): exit 3, {bad['counts']['done']} done, "
          f"{len(failed)} failed in {bad_s:.2f} s: {failed[0]['name'] if failed else '-'}: "
          f"{(failed[0]['error'] or '').replace(str(tmp), '.') if failed else '-'}")
    print(f"one large dump ({large_mb:.0f} MB), 2 workers: whole {whole_s:.2f} s, as {ranges} "
          f"layer ranges {split_s:.2f} s ({split_s / whole_s:.2f}x); same bytes: "
          f"{'yes' if split_same else 'NO'}")
    return 0 if identical and split_same else 1


if __name__ == "__main__":
    sys.exit(main())
