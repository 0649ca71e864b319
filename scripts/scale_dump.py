"""Make a bigger KV dump from the sample by repeating its tokens (for memory and speed tests).

    python scripts/scale_dump.py SRC.safetensors OUT.safetensors --times 4

Every KV and query tensor gets ``times`` x the tokens (the sample's tokens repeated, each copy
perturbed by a little seeded noise so no two copies are identical); other tensors are copied.
The manifest is rewritten to match.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--times", type=int, default=4)
    args = ap.parse_args()
    manifest = json.loads(args.src.with_suffix("").with_suffix(".manifest.json").read_text()
                          if args.src.name.endswith(".safetensors") else "")
    names = {n for e in manifest["entries"] for n in e["tensors"]}
    names |= set(manifest.get("attention", {}).get("query_tensors", []))
    rng = np.random.default_rng(0)
    tensors = {}
    for name, arr in load_file(args.src).items():
        if name in names:  # [b, h, t, d]: repeat along tokens
            reps = [arr]
            for _ in range(args.times - 1):
                noise = rng.standard_normal(arr.shape).astype(np.float32) * 0.01 * np.abs(arr).mean()
                reps.append((arr.astype(np.float32) + noise).astype(arr.dtype))
            arr = np.concatenate(reps, axis=2)
        tensors[name] = np.ascontiguousarray(arr)
    for entry in manifest["entries"]:
        entry["shape"]["tokens"] *= args.times
    save_file(tensors, str(args.out))
    args.out.with_suffix("").with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
