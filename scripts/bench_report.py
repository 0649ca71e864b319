"""Run the benchmarks and write their output to docs/benchmarks.md (run by ``make bench``).

    .venv/bin/python scripts/bench_report.py [--output PATH]

Runs ``scripts/bench.py``, ``scripts/bench_pipeline.py``, ``scripts/bench_transform.py`` and
``scripts/bench_batch.py`` with this Python, captures their stdout and writes one Markdown page:
how to regenerate it, the date, the commit, the CPU, each script's output in a fenced block, and
a fixed note on how to read the tables. The page is written only when every script succeeds
(temporary file, then ``os.replace``). This script does no measuring itself.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("scripts/bench.py", "scripts/bench_pipeline.py", "scripts/bench_transform.py",
           "scripts/bench_batch.py")
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
# Rich takes the table width from COLUMNS when stdout is not a terminal. (bench.py and
# bench_pipeline.py set their own width, 170 and 200, in that case; COLUMNS covers others.)
COLUMNS = "160"

HOW_TO_READ = """\
## How to read it

The machine that ran this may be shared with other jobs, so single timings move from run to
run. Read ratios taken within one run; do not compare MB/s across runs or machines. The load
averages in the header say how busy the machine was: above the number of cores, other jobs
took CPU time and every MB/s is low. `bench_pipeline.py` interleaves its codecs round by round,
so its ratios resist load; `bench.py` times each codec on its own (best of 3), so its speed
ratios are more exposed to it.

* **Distortion table** (`bench.py`). `D_unit` is the mean squared error of a unit vector
  after encode and decode, measured on fresh vectors the training never saw. `initial` is the
  codebook before Lloyd–Max, `trained` after it, `spec ref` the reference value of
  docs/method.md §4. `scalar` is the per-coordinate Lloyd–Max baseline at the same whole
  number of bits (measured; `scalar theory` is its exact value). `gain dB` is
  10·log10(scalar / trained): positive means FibQuant has less error at the same rate.
  `2^-2b` is the Shannon bound and `gap dB` the distance to it. Distortion does not depend on
  the machine or the load: these columns should repeat to the printed digits.
* **Throughput table** (`bench.py`). MB/s of fp16 input through the numpy core only (no
  files). `enc fib/scalar` and `dec fib/scalar` compare FibQuant with the scalar baseline at
  the same bits per vector, timed in the same run. `rel MSE` is Σ‖x − x̂‖² / Σ‖x‖² over all
  vectors.
* **Pipeline tables** (`bench_pipeline.py`). MB/s of fp16 KV input through the whole
  `fibquant compress` and `decompress`: reading, checking, digests, encoding, the error
  statistics of the restored values, packing and an atomic write. `1 job` uses one encoder
  thread, `auto jobs` the default. `core encode` is the encoder alone. `Q4_0 same rounds` is
  the gguf package's Q4_0 quantizer on the same K and V, timed in the same interleaved
  rounds; `1 job / Q4_0` and `auto / Q4_0` are the ratios to read for compress speed, and
  `decompress / auto` and `decompress / 1 job` for how much faster restoring is. The scalar
  and Q4_0 rows have no file step: `core encode` is their encode (quantize) speed and
  `decompress` their decode (dequantize) speed. The second table repeats `--bits 3` on a
  dump of many small tensors, where per-tensor costs show.
* **Transform table** (`bench_transform.py`). MB/s of fp16 KV input through `compress` and
  `decompress` (whole files, in this process) and `api.decompress` (decoded into memory: no
  output written or fsynced) for the per-vector codec at `--bits 3` and the transform codec at
  `--ratio 8`, on the sample grown by tokens, best of interleaved rounds; the last row is their
  ratio. The basis is fitted on the sample itself (speed does not depend on the text it came
  from; quality numbers are in docs/transform.md).
* **Peak RSS table** (`bench_pipeline.py`). Peak resident memory of one fresh `compress` and
  one fresh `decompress` process per dump. Compare rows: grown by layers, the dump gets more
  tensors of the same size and the peak should stay nearly flat; grown by tokens, the largest
  tensor grows and the peak follows it, not the dump size.
* **Batch table** (`bench_batch.py`). Wall time of whole commands on one folder of dumps, as a
  user runs them: `fibquant batch compress` with a local cluster of 1 and of 2 workers
  (cluster start-up, worker imports and the summary included) and `make -j1`/`-j2
  compress-all` (one `fibquant compress --jobs 1` process per dump), best of the rounds, each
  round running the four in turn. `/ batch 1 worker` is the ratio to read: 2 workers should
  take at most 0.65 of 1 worker's time on 2 free cores. The lines below it check that all four
  wrote the same bytes, that a rerun skips every dump, that a corrupt dump is reported while
  the others are done (exit 3), and time one large dump encoded whole or as layer ranges on 2
  workers (the pre-pass and the writer stay on one worker, so the gain is below 2x).
"""


def cpu_description() -> str:
    """'<model name>, N cores' from /proc/cpuinfo and the scheduler (no paths)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {usable} cores usable ({os.cpu_count()} online)"


def short_head() -> str:
    """``git rev-parse --short HEAD``, plus a note when tracked files differ from it."""
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".",
                            ":(exclude)docs/benchmarks.md"], cwd=ROOT).returncode != 0
    return res.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def load_average() -> str:
    """The 1-minute load average: other jobs on the machine slow every timing."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"


def scrub(text: str) -> str:
    """Replace this machine's paths (checkout, home) by neutral names."""
    return text.replace(str(ROOT), ".").replace(str(Path.home()), "~")


def run_script(script: str) -> str:
    """stdout of ``script`` run with this Python; stderr passes through; raises on failure."""
    env = dict(os.environ, COLUMNS=COLUMNS)
    print(f"bench_report: running {script}", file=sys.stderr, flush=True)
    res = subprocess.run([sys.executable, script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         text=True)
    if res.returncode != 0:
        sys.stdout.write(res.stdout)
        raise SystemExit(f"bench_report: {script} exited with {res.returncode}; "
                         "docs/benchmarks.md left unchanged")
    sys.stdout.write(res.stdout)
    return scrub(res.stdout.rstrip("\n"))


def render(outputs: dict[str, str], facts: dict[str, str]) -> str:
    parts = [
        "# Benchmarks\n",
        "Generated by `scripts/bench_report.py`; do not edit by hand. Regenerate with "
        "`make bench` (several minutes; it installs the bench extras first).\n",
        "".join(f"* {key}: {value}\n" for key, value in facts.items()),
    ]
    for script, text in outputs.items():
        parts.append(f"## `{script}`\n\n```\n{text}\n```\n")
    parts.append(HOW_TO_READ)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = ap.parse_args(argv)
    # The commit is read before the run: it names the code that was measured.
    facts = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
             "commit": f"`{short_head()}`", "CPU": cpu_description(),
             "load average (1 min) at start": load_average()}
    outputs = {script: run_script(script) for script in SCRIPTS}
    facts["load average (1 min) at end"] = load_average()
    page = render(outputs, facts)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, args.output)
    shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
    print(f"bench_report: wrote {shown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
