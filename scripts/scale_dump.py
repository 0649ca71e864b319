"""Make a bigger KV dump from the sample, for memory and speed measurements.

    python scripts/scale_dump.py SRC.safetensors OUT.safetensors --times 4 [--axis layers|tokens]
        [--kv-only]

``--axis layers`` (default) repeats the layers: the dump grows, its largest tensor does not,
which is what a flat-memory claim is about. ``--axis tokens`` repeats the tokens of every KV
and query tensor instead. Each copy gets a little seeded noise, so no two are identical; other
tensors are copied, or with ``--kv-only`` dropped along with the queries (a dump of K and V
alone, so a speed test sees exactly the bytes a bare quantizer would). The manifest is
rewritten to match.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def manifest_path(p: Path) -> Path:
    return p.with_name(p.name.removesuffix(".safetensors") + ".manifest.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--times", type=int, default=4)
    ap.add_argument("--axis", choices=("layers", "tokens"), default="layers")
    ap.add_argument("--kv-only", action="store_true", help="drop queries and other tensors")
    args = ap.parse_args()
    manifest = json.loads(manifest_path(args.src).read_text())
    arrays = load_file(args.src)
    rng = np.random.default_rng(0)

    def noisy(arr: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal(arr.shape).astype(np.float32) * 0.01 * float(np.abs(arr).mean())
        return (arr.astype(np.float32) + noise).astype(arr.dtype)

    kv = {n for e in manifest["entries"] for n in e["tensors"]}
    queries = list(manifest.get("attention", {}).get("query_tensors", []))
    if args.kv_only:
        arrays = {n: a for n, a in arrays.items() if n in kv}
        manifest.pop("attention", None)
        queries = []
    tensors = {}
    if args.axis == "tokens":
        for name, arr in arrays.items():
            if name in kv or name in queries:  # [b, h, t, d]
                arr = np.concatenate([arr] + [noisy(arr) for _ in range(args.times - 1)], axis=2)
            tensors[name] = np.ascontiguousarray(arr)
        for entry in manifest["entries"]:
            entry["shape"]["tokens"] *= args.times
    else:
        groups = [list(e["tensors"]) for e in manifest["entries"]] + ([queries] if queries else [])
        for name, arr in arrays.items():
            if name not in kv and name not in queries:
                tensors[name] = arr
        new_groups = []
        for names in groups:
            out = []
            for copy in range(args.times):
                for name in names:
                    new = name if copy == 0 else f"{name}.copy{copy}"
                    tensors[new] = arrays[name] if copy == 0 else noisy(arrays[name])
                    out.append(new)
            new_groups.append(out)
        for entry, names in zip(manifest["entries"], new_groups):
            entry["tensors"] = names
            entry["shape"]["layers"] *= args.times
        if queries:
            manifest["attention"]["query_tensors"] = new_groups[-1]
    save_file(tensors, str(args.out))
    manifest_path(args.out).write_text(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
