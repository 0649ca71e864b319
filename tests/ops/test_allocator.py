"""ops/allocator: freed memory is kept for reuse, so a codec's per-layer arrays stop faulting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from fibquant_cli.ops.allocator import keep_freed_memory
changed = keep_freed_memory() if sys.argv[1] == "tuned" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def layer():  # what a codec does per layer: a few arrays of megabytes, written, freed
    return [np.ones(3 << 17) for _ in range(4)]  # 3 MiB each
for _ in range(3):  # warm: numpy, the heap
    layer()
before = faults()
for _ in range(10):
    layer()
print(changed, faults() - before)
"""


def probe(mode: str, **env) -> tuple[bool, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={**environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_arrays_are_reused_without_page_faults():
    changed, tuned = probe("tuned")
    _, default = probe("default")
    assert changed
    assert default > 10 * 3 * 256  # most of the 12 MiB faulted in again per layer (4 KiB pages)
    assert tuned < default / 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_users_own_malloc_settings_are_left_alone():
    changed, _ = probe("tuned", MALLOC_TRIM_THRESHOLD_="65536")
    assert not changed
