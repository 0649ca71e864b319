"""Train the codebooks shipped inside the package (fibquant_cli/codebooks/).

Run by hand after a change to the codebook algorithm or the profile defaults:
    .venv/bin/python scripts/build_codebooks.py
Every entry is keyed by its profile digest, so a stale entry is never picked up.
"""

from __future__ import annotations

import sys
import time

from fibquant_cli.core.codebook import train_codebook
from fibquant_cli.core.params import Profile
from fibquant_cli.storage.codebook_cache import SHIPPED_DIR, entry_name, save_entry

# Spec section 4 table at d = 64, and the common points at d = 128.
SHIPPED_POINTS = [
    (64, 2, 4), (64, 2, 16), (64, 2, 64), (64, 2, 256), (64, 4, 256),
    (64, 8, 256), (64, 8, 16), (64, 32, 128),  # (3, 64) of the table: 3 does not divide 64
    (64, 2, 1024),  # the 5-bit preset
    (64, 4, 4096),  # 3 bits with k = 4 (trained with the fast search)
    (128, 2, 16), (128, 2, 64), (128, 2, 256), (128, 4, 256), (128, 8, 256),
]


def main() -> int:
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    for d, k, n in SHIPPED_POINTS:
        profile = Profile(d, k, n)
        path = SHIPPED_DIR / entry_name(profile)
        if path.exists():
            print(f"have  {path.name}")
            continue
        start = time.perf_counter()
        save_entry(path, profile, train_codebook(profile))
        print(f"built {path.name} in {time.perf_counter() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
