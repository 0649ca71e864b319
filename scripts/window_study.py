"""The recent-window study of docs/transform.md ("A recent window"), for any model and texts.

    .venv/bin/python scripts/window_study.py MODEL BASIS TEXT... [--prefix 4096]
        [--ratios 8,16] [--windows 0,16,32] [--json out.json]

For each text: the model's KL, ΔNLL and top-1 agreement (``eval --model``'s scoring, one model
load and one reference per text) of the transform codec at every ratio and ``--keep-last``
window, then per ratio and window the geometric mean over the texts of the KL against no
window (0 is always run). BASIS should come from another text than every TEXT (``calibrate``).
Slow: SmolLM2-135M took 2-4 minutes a text at 4,096 tokens and six points on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from fibquant_cli.ops import process

    process.start()  # as the command line does at start-up
    from fibquant_cli.hf.evaluate import evaluate_model
    from fibquant_cli.ops.spec import resolve_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("basis")
    ap.add_argument("texts", nargs="+", type=Path)
    ap.add_argument("--prefix", type=int, default=4096)
    ap.add_argument("--continuation", type=int, default=512)
    ap.add_argument("--ratios", default="8,16")
    ap.add_argument("--windows", default="0,16,32")
    ap.add_argument("--json", type=Path, help="Also write every point here.")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    windows = sorted({0, *(int(w) for w in args.windows.split(","))})
    points = []
    for text in args.texts:
        specs = [resolve_spec(basis=args.basis, ratio=r, keep_last=w)
                 for r in ratios for w in windows]
        rep = evaluate_model(args.model, text=text, specs=specs, prefix=args.prefix,
                             continuation=args.continuation, skip_failed=False)
        for spec, p in zip(specs, rep.points[1:]):  # points[0] is the uncompressed reference
            points.append({"text": text.name, "ratio": spec.ratio, "window": spec.keep_last,
                           "kl": p.kl, "delta_nll": p.delta_nll, "top1": p.top1})
            print(f"{text.name:24s} {spec.ratio:5g}x last {spec.keep_last:4d}: KL {p.kl:.4f}  "
                  f"ΔNLL {p.delta_nll:+.4f}  top-1 {p.top1:.3f}", flush=True)
    kl = {(p["text"], p["ratio"], p["window"]): p["kl"] for p in points}
    print(f"\nKL against no window, geometric mean over {len(args.texts)} texts "
          f"({args.prefix} tokens of prefix):")
    for r in ratios:
        for w in windows[1:]:
            logs = [math.log(kl[t.name, r, w] / kl[t.name, r, 0]) for t in args.texts
                    if kl[t.name, r, 0] > 0]
            share = w * r / args.prefix
            print(f"  {r:5g}x last {w:4d} (1/{1 / share:.0f} of the file): "
                  f"{math.exp(sum(logs) / len(logs)):.2f}" if logs else "  (no KL)")
    if args.json:
        args.json.write_text(json.dumps({"prefix": args.prefix, "points": points}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
