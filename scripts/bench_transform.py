"""Transform codec throughput next to the per-vector codec, in the same interleaved rounds.

    .venv/bin/python scripts/bench_transform.py [--times 16] [--rounds 7]

Grows the sample dump by tokens (``scale_dump.py --axis tokens --kv-only``), fits a basis on
the sample itself (``calibrate``: throughput does not depend on which text the basis came
from), then times, round by round, ``compress --bits 3`` and ``compress --basis B --ratio 8``
(no attention scoring), the ``decompress`` of each to a file, and ``api.decompress`` of each
into memory (the decode without the disk: writing and fsyncing the output), in this process.
The previous round's outputs are deleted untimed (replacing a file is the file system's cost,
not the codec's). Prints MB/s of fp16 KV input (best of the rounds) and the transform /
per-vector ratios: read the ratios, the machine may be shared (docs/benchmarks.md, "How to
read it").
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
SAMPLE = ROOT / "sample_data" / "kv_sample.safetensors"
SMOLLM2_ROPE = {"theta": 100000.0, "style": "half", "first_position": 0}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    from fibquant_cli.ops import process

    process.start()  # as the command line does at start-up
    from rich.console import Console
    from rich.table import Table

    from fibquant_cli import api
    from fibquant_cli.ops.calibrate import calibrate
    from fibquant_cli.ops.compress import compress
    from fibquant_cli.ops.decompress import decompress
    from fibquant_cli.ops.spec import resolve_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--times", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fibquant-bench-transform-") as tmp:
        tmp = Path(tmp)
        big = tmp / "big.safetensors"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "scale_dump.py"), str(SAMPLE),
                        str(big), "--times", str(args.times), "--axis", "tokens", "--kv-only"],
                       check=True, stdout=subprocess.DEVNULL)
        sample = tmp / "sample.safetensors"
        shutil.copyfile(SAMPLE, sample)
        shutil.copyfile(SAMPLE.with_name("kv_sample.manifest.json"),
                        tmp / "sample.manifest.json")
        for dump in (sample, big):  # the sample is SmolLM2-135M's: RoPE theta 1e5, rotate-half
            mpath = dump.with_name(dump.name.removesuffix(".safetensors") + ".manifest.json")
            manifest = json.loads(mpath.read_text())
            for entry in manifest["entries"]:
                if entry["shape"]["role"] == "key":
                    entry["rope"] = SMOLLM2_ROPE
            mpath.write_text(json.dumps(manifest))
        basis = tmp / "sample.basis.safetensors"
        calibrate([str(sample)], output=str(basis))
        mb = big.stat().st_size / 1e6
        specs = {"per-vector --bits 3": resolve_spec(bits=3),
                 "transform --ratio 8": resolve_spec(basis=str(basis), ratio=8.0)}
        best: dict[tuple[str, str], float] = {}
        ratios: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, spec in specs.items():
                out = tmp / "out.fq.safetensors"
                rep = None

                def enc(spec=spec, out=out):
                    nonlocal rep
                    rep = compress(big, output=out, spec=spec, force=True, attention=False)

                restored = tmp / "r.safetensors"
                out.unlink(missing_ok=True)
                t_enc = timed(enc)
                ratios[name] = rep.total.ratio
                restored.unlink(missing_ok=True)
                t_dec = timed(lambda spec=spec, out=out: decompress(
                    out, output=restored, force=True, basis=spec.decode_basis))
                t_mem = timed(lambda spec=spec, out=out: api.decompress(
                    out, basis=spec.decode_basis))
                for what, t in (("compress", t_enc), ("decompress", t_dec), ("memory", t_mem)):
                    best[name, what] = max(best.get((name, what), 0.0), mb / t)
        whole = whole_commands(big, basis, tmp, rounds=3)
    width = None if sys.stdout.isatty() else 160
    table = Table(title=f"transform vs per-vector: sample x{args.times} by tokens, {mb:.1f} MB "
                        f"fp16 KV, best of {args.rounds} interleaved rounds, "
                        f"{os.cpu_count()} cores")
    whats = ("compress", "decompress", "memory")
    for col in ("codec", "ratio", "compress MB/s", "decompress MB/s", "decode to memory MB/s"):
        table.add_column(col, justify="right" if col != "codec" else "left")
    for name in specs:
        table.add_row(name, f"{ratios[name]:.2f}x", *(f"{best[name, w]:.1f}" for w in whats))
    names = list(specs)
    table.add_row("transform / per-vector", "",
                  *(f"{best[names[1], w] / best[names[0], w]:.2f}" for w in whats))
    Console(width=width).print(table)
    print(f"whole command in a fresh process (what one 'fibquant compress ... --no-attention' "
          f"costs, start-up included), best of 3: per-vector --bits 3 --own-basis never "
          f"{whole['per-vector']:.2f} s, transform --ratio 8 {whole['transform']:.2f} s; "
          f"start-up alone ('fibquant --help') {whole['start-up']:.2f} s")


def whole_commands(big: Path, basis: Path, tmp: Path, rounds: int) -> dict[str, float]:
    """Best wall seconds of whole ``fibquant compress`` commands, each in a new process: the
    fixed costs (imports, tables, search grids) a user pays per command, which the in-process
    rounds above leave out."""
    exe = str(Path(sys.executable).with_name("fibquant"))
    out = str(tmp / "cli.fq.safetensors")
    commands = {
        "per-vector": [exe, "compress", str(big), "--bits", "3", "--own-basis", "never",
                       "--no-attention", "--force", "-o", out],  # the command line's default
        # would first try an own basis on a dump this long (docs/transform.md): not this codec
        "transform": [exe, "compress", str(big), "--basis", str(basis), "--ratio", "8",
                      "--no-attention", "--force", "-o", out],
        "start-up": [exe, "--help"],
    }
    best = dict.fromkeys(commands, float("inf"))
    for _ in range(rounds):
        for name, cmd in commands.items():
            Path(out).unlink(missing_ok=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
